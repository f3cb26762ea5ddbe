"""The asyncio server: wires the CA, the TLS contexts, the relay and the sinks, accepts connections,
tracks them, and shuts down gracefully. (asyncio shell)"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import resource
import socket
import time
from typing import Callable, Sequence

from ca.authority import CA
from ca.mint import mint, new_leaf_key, random_serial
from ca.store import LeafStore

from .config import Config
from .flow import Flow
from .hostmatch import HostPatterns, HostPolicy
from .http1 import Limits, simple_response
from .relay import Relay, RelayPolicy
from .streams import Conn, bytes_relayed
from .tls.contexts import server_context, upstream_context
from .upstream import UpstreamProxy

__all__ = ["ProxyServer", "is_loopback"]

log = logging.getLogger("httpsdump")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


@functools.lru_cache(maxsize=1024)
def _is_global(address: str) -> bool:
    """ipaddress's is_global (a walk over the special-purpose registries), once per client address."""
    return ipaddress.ip_address(address.split("%")[0]).is_global


class ProxyServer:
    def __init__(self, config: Config, ca: CA, sinks: Sequence, *, wall: Callable[[], float] = time.time,
                 keylog=None, leaf_key=None) -> None:
        self.config = config
        self._keylog = keylog.write if keylog is not None else None
        self.sinks = list(sinks)
        self._wall = wall
        # One key per run for every minted leaf (design.md); --workers share the parent's.
        self._leaf_key = leaf_key if leaf_key is not None else new_leaf_key()
        self._ca = ca
        # Minted certificates per name; one client-facing context serves them all (tls/contexts.py).
        self.leaf_certs = LeafStore(self._mint_leaf, cap=config.leaf_cache_size)
        self.server_ctx = server_context(self._leaf_key, keylog=self._keylog)
        # One shared verifying context: the trust store is loaded once (notes §1.5); plus one per
        # --client-cert file, chosen by host pattern (first match wins).
        self.upstream_ctx = upstream_context(config.upstream_ca, insecure=config.insecure, keylog=self._keylog,
                                             resumption=config.upstream_tls_resumption)
        self._client_cert_ctxs: list[tuple[HostPatterns, object]] = []
        for item in config.client_cert:
            pattern, _, path = item.partition("=")
            ctx = upstream_context(config.upstream_ca, insecure=config.insecure,
                                   client_cert=os.path.expanduser(path.strip()), keylog=self._keylog,
                                   resumption=config.upstream_tls_resumption)
            self._client_cert_ctxs.append((HostPatterns([pattern]), ctx))
        self._upstream_proxy = UpstreamProxy.parse(config.upstream_proxy) if config.upstream_proxy else None
        self._server: asyncio.base_events.Server | None = None
        self._status_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None
        self.flows_emitted = 0
        self._redact = frozenset(n.encode("latin-1") for n in config.redact)
        # Sinks that write the full record (JSONL, store, HAR) share one rendering, done here on the loop
        # thread before any sink's own thread can see the flow; the console renders its own line.
        self._render = any(getattr(s, "writes_records", True) for s in self.sinks)
        _raise_fd_limit()

    def add_sink(self, sink) -> None:
        """A sink known only after the server is made (a --workers worker's own log channel)."""
        self.sinks.append(sink)
        self._render = self._render or getattr(sink, "writes_records", True)

    def upstream_ctx_for(self, host: str):
        for patterns, ctx in self._client_cert_ctxs:
            if patterns.match(host):
                return ctx
        return self.upstream_ctx

    def _mint_leaf(self, host: str):
        return mint(self._ca, self._leaf_key, host, self._wall(), random_serial())

    def emit(self, flow: Flow) -> None:
        self.flows_emitted += 1
        if self._redact:
            _redact(flow, self._redact)
        if self._render:
            try:
                flow.rendered_line()  # once, here, for every sink that writes the record
            except Exception:
                log.exception("cannot render flow %s", flow.id)
        for sink in self.sinks:
            try:
                sink.emit(flow)
            except Exception:  # a broken sink must not break the relay; say so loudly
                log.exception("traffic sink %r failed on flow %s", sink, flow.id)

    def started(self, flow: Flow) -> None:
        """A response still streaming: sinks that show live progress (the console) hear of it now."""
        for sink in self.sinks:
            announce = getattr(sink, "started", None)
            if announce is not None:
                try:
                    announce(flow)
                except Exception:
                    log.exception("traffic sink %r failed on a streaming flow %s", sink, flow.id)

    def _policy(self, own: frozenset) -> RelayPolicy:
        c = self.config
        return RelayPolicy(
            limits=Limits(max_request_line=c.max_request_line, max_head=c.max_header_bytes, max_headers=c.max_headers,
                          max_pipelined=c.max_pipelined),
            body_capture_limit=c.body_capture_limit,
            handshake_timeout=c.handshake_timeout,
            header_timeout=c.header_timeout,
            idle_timeout=c.idle_timeout,
            connect_timeout=c.connect_timeout,
            insecure=c.insecure,
            http2=c.http2,
            own_addresses=own,
            proxy_auth=c.proxy_auth.encode("utf-8") if c.proxy_auth else None,
            upstream_proxy=self._upstream_proxy,
            hosts=HostPolicy(ignore=HostPatterns(c.ignore_hosts), allow=HostPatterns(c.allow_hosts)),
        )

    async def start(self, port: int | None = None, reuse_port: bool = False) -> None:
        """Listen on the configured address (or `port`); `reuse_port` (SO_REUSEPORT) lets --workers
        listen on the same port, each with its own accept queue."""
        c = self.config
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ClientConn(self._on_client), c.listen_host,
                                                c.listen_port if port is None else port, reuse_address=True,
                                                reuse_port=reuse_port or None)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        own = {(c.listen_host, self.port), ("127.0.0.1", self.port), ("localhost", self.port), ("::1", self.port)}
        if c.listen_host in ("0.0.0.0", "::"):
            with contextlib.suppress(OSError):
                own |= {(a[4][0], self.port) for a in socket.getaddrinfo(socket.gethostname(), None)}
        live = [s for s in self.sinks if getattr(s, "live", False)]
        if live:
            self._status_task = asyncio.get_running_loop().create_task(self._status_loop(live))
        self.relay = Relay(self._policy(frozenset(own)), upstream_ctx_for=self.upstream_ctx_for,
                           leaf_certs=self.leaf_certs, server_ctx=self.server_ctx, emit=self.emit, started=self.started,
                           ca=self._ca)

    async def _on_client(self, conn: Conn) -> None:
        refusal = self._refuse(conn)
        if refusal is not None:
            status, reason, why = refusal
            log.warning("refused %s: %s", _peer(conn), why)
            with contextlib.suppress(Exception):
                conn.write(simple_response(status, reason, f"httpsdump: {why}\n"))
            await conn.close()
            return
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self.relay.handle(conn)
        finally:
            self._tasks.discard(task)

    def _refuse(self, conn) -> tuple[int, str, str] | None:
        peer = conn.get_extra_info("peername")
        if peer and not self.config.allow_public_clients:
            with contextlib.suppress(ValueError):
                if _is_global(peer[0]):
                    # Like mitmproxy's block_global: a proxy answering the internet is an open relay.
                    return 403, "Forbidden", (f"clients from public addresses ({peer[0]}) are refused; "
                                              "set allow_public_clients = true to allow them")
        if len(self._tasks) >= self.config.max_connections:
            return 503, "Service Unavailable", f"too many connections (max_connections = {self.config.max_connections})"
        return None

    async def _status_loop(self, sinks, interval: float = 1.0) -> None:
        """On a terminal: open connections, flows per second and bytes relayed, redrawn in place."""
        flows, t = self.flows_emitted, time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            rate = (self.flows_emitted - flows) / (now - t)
            flows, t = self.flows_emitted, now
            text = (f"[{self.open_connections} open | {rate:.1f} flows/s | {self.flows_emitted} flows | "
                    f"{_human_bytes(bytes_relayed())} relayed]")
            for sink in sinks:
                sink.status(text)

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, give in-flight connections `grace` seconds, then cancel the rest."""
        if self._status_task is not None:
            self._status_task.cancel()
        if self._server is not None:
            self._server.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.close()


def _peer(conn) -> str:
    peer = conn.get_extra_info("peername") or ("?", 0)
    return f"{peer[0]}:{peer[1]}"


class _ClientConn(Conn):
    """A client connection: serving it starts as soon as it is accepted."""

    def __init__(self, serve) -> None:
        super().__init__()
        self._serve = serve
        self.task: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.task = asyncio.get_running_loop().create_task(self._serve(self))  # referenced until done


def _redact(flow: Flow, names: frozenset) -> None:
    """--redact: header values replaced in every sink; the traffic itself is untouched."""
    for msg in (flow.request, flow.response):
        if msg is not None:
            msg.headers = [(k, b"[redacted]") if k.lower() in names else (k, v) for k, v in msg.headers]
            msg.trailers = [(k, b"[redacted]") if k.lower() in names else (k, v) for k, v in msg.trailers]


def _raise_fd_limit() -> None:
    """Each intercepted connection costs two descriptors: use the hard limit, not the 1024 default."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
