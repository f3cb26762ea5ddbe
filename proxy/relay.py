"""Per-connection orchestration: the only module that knows the whole sequence. (asyncio shell)

    first request ─┬─ CONNECT host:port ─ 200 ─ peek ─┬─ TLS ClientHello → mint leaf for SNI → client TLS
                   │                                  │      (upstream connect+verify runs meanwhile)
                   │                                  └─ plain bytes → HTTP inside the tunnel
                   └─ GET http://host/… (absolute form) → plain forward proxy
    then, per request: read head → get the upstream (502 with the cause if it failed: the request is
    never sent) → stream the request body while reading the response → relay the response (1xx,
    HEAD, 204/304, chunked, close-delimited, 101 → raw two-way relay) → one Flow to the sinks.

Bodies stream with backpressure (every send awaits drain()); only a capped prefix is kept for the log,
so memory per connection does not depend on body size. Every failure is a ProxyError (errors.py),
mapped once, in `_fail`, to the client's response and the flow's error record.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Callable

from . import clienthello, installpage
from .errors import (
    BadRequest,
    ClientError,
    ClientTimeout,
    ClientTLSError,
    ProxyAuthRequired,
    ProxyError,
    UpstreamError,
    UpstreamProtocolError,
)
from .flow import Flow, Request, Response, TlsSide
from .http1 import (
    Data,
    EndOfMessage,
    Limits,
    RequestHead,
    RequestReader,
    ResponseHead,
    chunk,
    last_chunk,
    serialize_request_head,
    serialize_response_head,
    simple_response,
)
from .hostmatch import HostPolicy
from .streams import Conn, PlainStream, TLSStream
from .tls.contexts import client_failure
from .tls.engine import TLSEngine, TLSFailure
from .relay_h2 import relay_h2
from .upstream import Upstream, UpstreamProxy, open_tcp
from .websocket import WebSocketObserver

__all__ = ["Relay", "RelayPolicy"]

log = logging.getLogger("httpsdump.relay")

_HOP_BY_HOP_PROXY = (b"proxy-connection", b"proxy-authorization")


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    limits: Limits = Limits()
    body_capture_limit: int = 1 << 20
    handshake_timeout: float = 10.0
    header_timeout: float = 30.0
    idle_timeout: float = 120.0
    connect_timeout: float = 10.0
    insecure: bool = False
    http2: bool = True  # ALPN mirroring: h2 end to end when the client offers it and the origin selects it
    own_addresses: frozenset = frozenset()  # (host, port) pairs the proxy listens on: never a target
    proxy_auth: bytes | None = None  # b"user:password" every client must present (Basic)
    upstream_proxy: UpstreamProxy | None = None
    hosts: HostPolicy = HostPolicy()  # which hosts are intercepted; the others are tunnelled untouched
    stream_announce: float = 1.0  # a response still streaming this long after its head is announced


def _check_proxy_auth(head: RequestHead, expected: bytes | None) -> None:
    """RFC 9110 §11.7.2 / RFC 7617 Basic credentials, compared in constant time."""
    if expected is None:
        return
    for k, v in head.headers:
        if k.lower() == b"proxy-authorization":
            scheme, _, cred = v.strip().partition(b" ")
            if scheme.lower() == b"basic":
                try:
                    got = base64.b64decode(cred.strip(), validate=True)
                except (binascii.Error, ValueError):
                    break
                if hmac.compare_digest(got, expected):
                    return
            break
    raise ProxyAuthRequired("proxy authentication required: send the credentials given to --proxy-auth")


@functools.lru_cache(maxsize=1024)  # per request (Host): a client sends the same value over and over
def _split_host_port(authority: str, default_port: int) -> tuple[str, int]:
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, port = authority.split(":")
    else:
        host, port = authority, ""
    if not host:
        raise BadRequest(f"no host in {authority!r}")
    try:
        p = int(port) if port else default_port
    except ValueError:
        raise BadRequest(f"invalid port in {authority!r}") from None
    if not 0 < p < 65536:
        raise BadRequest(f"invalid port in {authority!r}")
    return host.lower().rstrip("."), p


class Relay:
    """Serves one client connection at a time per `handle()` call; shared state is read-only."""

    def __init__(self, policy: RelayPolicy, *, upstream_ctx_for, leaf_certs, server_ctx, emit: Callable[[Flow], None],
                 started: Callable[[Flow], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 ca=None) -> None:
        self.ca = ca  # the local CA, for the install page at http(s)://httpsdump.invalid/ (installpage.py)
        self.policy = policy
        self.upstream_ctx_for = upstream_ctx_for  # host -> verifying client SSL.Context
        self.leaf_certs = leaf_certs  # host -> minted X509 (ca.store.LeafStore)
        self.server_ctx = server_ctx  # the one client-facing context (tls/contexts.server_context)
        self.emit = emit
        self.started = started  # told about responses that are still streaming (see RelayPolicy)
        self.clock = clock
        self.wall = wall

    # --- entry ---------------------------------------------------------------------------------

    async def handle(self, conn: Conn) -> None:
        peer = conn.get_extra_info("peername") or ("?", 0)
        client_addr = f"{peer[0]}:{peer[1]}"
        client = PlainStream(conn)
        rr = RequestReader(self.policy.limits)
        try:
            head = await self._read_head(client, rr, self.policy.header_timeout)
            if head is None:
                return
            if head.method == "CONNECT":
                _check_proxy_auth(head, self.policy.proxy_auth)
                await self._connect(client, rr, head, client_addr)
            elif head.target.startswith("http://"):
                await self._exchanges(client, rr, client_addr, "http", None, first=head)
            else:
                raise BadRequest(
                    f"httpsdump is a proxy: use it with CONNECT or an absolute URL (got {head.method} {head.target[:100]})"
                )
        except ProxyError as e:
            await self._fail_connection(client, e, client_addr)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must never take the proxy down, and must be visible
            log.exception("internal error while serving %s", client_addr)
            with contextlib.suppress(Exception):
                await client.send(simple_response(500, "Internal Server Error", "httpsdump: internal error (see the proxy's log)\n"))
        finally:
            await client.close()

    async def _fail_connection(self, client, e: ProxyError, client_addr: str) -> None:
        """A failure before any exchange could start (bad first request, bad CONNECT)."""
        await self._failed_exchange(client, Flow(client_addr=client_addr, mode="http"), e, None, self.clock())

    async def _read_head(self, stream, rr: RequestReader, timeout: float) -> RequestHead | None:
        """Next request head, or None on a clean EOF between requests."""
        ev = rr.next_event()
        if ev is not None:
            return ev
        loop_deadline = self.clock() + timeout
        while True:
            remaining = loop_deadline - self.clock()
            if remaining <= 0:
                raise ClientTimeout(f"no complete request head within {timeout:g} s")
            try:
                data = await stream.recv(remaining)  # a timer, cheaper than asyncio.timeout per request
            except TimeoutError:
                if rr.in_head:
                    raise ClientTimeout(f"no complete request head within {timeout:g} s") from None
                return None  # an idle connection: just close it
            if not data:
                if rr.in_head:
                    raise BadRequest("the client closed the connection in the middle of a request head")
                return None
            rr.feed(data)
            ev = rr.next_event()
            if ev is not None:
                return ev

    # --- CONNECT ---------------------------------------------------------------------------------

    async def _connect(self, client: PlainStream, rr: RequestReader, head: RequestHead, client_addr: str) -> None:
        host, port = _split_host_port(head.target, 443)
        if (host, port) in self.policy.own_addresses:
            raise BadRequest(f"refusing to CONNECT to the proxy itself ({host}:{port})")
        rr.next_event()  # the CONNECT's EndOfMessage
        await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
        t0 = self.clock()
        buf = rr.leftover
        hello = None
        while True:
            if buf and buf[0] != 0x16:
                break
            if buf:
                try:
                    hello = clienthello.parse(buf)
                    break
                except clienthello.NeedMore:
                    pass
                except clienthello.NotTLS as e:
                    raise ClientTLSError(f"not a TLS ClientHello: {e}") from None
            try:
                data = await client.recv(self.policy.handshake_timeout)  # a timer, not wait_for's task
            except TimeoutError:
                if not buf:
                    return  # CONNECT opened and never used: nothing to log
                raise ClientTimeout("the client's TLS ClientHello did not arrive in time") from None
            if not data:
                if buf:
                    raise ClientTLSError("the client closed the connection during the TLS handshake")
                return
            buf += data
        if hello is None:  # plain HTTP inside the tunnel
            client.unread(buf)
            await self._exchanges(client, RequestReader(self.policy.limits), client_addr, "tunnel-http",
                                  (host, port, None, False))
            return
        name = hello.sni or host
        ctls = TlsSide(sni=hello.sni, alpn_offer=tuple(hello.alpn))
        local = self.ca is not None and installpage.is_install_host(host)  # answered here, never forwarded
        if not local and not self.policy.hosts.intercept(name, port):
            await self._passthrough(client, buf, host, port, ctls, client_addr)
            return
        try:
            cert = self.leaf_certs.get(name)
        except ValueError as e:  # mint refuses names that cannot be a certificate's subject
            raise ClientTLSError(f"cannot mint a certificate for {name!r}: {e}") from None
        engine = TLSEngine(self.server_ctx, server_side=True, cert=cert)
        stream = TLSStream(client.conn, engine)
        # Connect and verify upstream while the client handshake runs; the request waits for both.
        # ALPN mirroring: the origin is offered the client's list; when h2 is in it, the client's
        # answer depends on the origin's, so the origin's handshake finishes first. A failure there
        # still lets the client's handshake complete (http/1.1), and its first request gets the 502.
        alpn = _mirrored_alpn(ctls.alpn_offer, self.policy.http2)
        upstream = None if local else self._upstream(host, port, name, True, alpn)
        connecting = None if local else asyncio.ensure_future(upstream.open())
        try:
            if connecting is not None and "h2" in alpn:
                with contextlib.suppress(Exception):
                    await connecting
                h2 = upstream.stream is not None and upstream.tls is not None and upstream.tls.alpn == "h2"
                engine.choose_alpn(("h2",) if h2 else ("http/1.1",))
                upstream.alpn = ("h2",) if h2 else ("http/1.1",)  # a reconnect speaks what was chosen
            try:
                await stream.handshake(buf, self.policy.handshake_timeout)
            except TimeoutError:
                raise ClientTimeout(f"the client's TLS handshake for {name} did not complete in time") from None
            except TLSFailure as f:
                raise client_failure(f, hello.sni or host) from None
            ctls.version, ctls.cipher, ctls.alpn = engine.version, engine.cipher, engine.alpn
            client_tls_ms = (self.clock() - t0) * 1000
            if ctls.alpn == "h2":
                await self._h2(stream, upstream, client_addr, ctls, client_tls_ms, name, port)
                return
            await self._exchanges(stream, RequestReader(self.policy.limits), client_addr, "https",
                                  (host, port, name, True), upstream=upstream, connecting=connecting,
                                  client_tls=(ctls, client_tls_ms))
        except ClientError as e:
            flow = Flow(client_addr=client_addr, mode="https")
            flow.timing.start = self.wall()
            flow.tls.client = ctls
            flow.error = e.to_record()
            self.emit(flow)
            log.info("%s: %s", client_addr, e.message)
        finally:
            if connecting is not None:
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                await upstream.close()
            await stream.close()  # close_notify, then TCP close; frees the engine

    async def _h2(self, client: TLSStream, upstream: Upstream, client_addr: str, ctls: TlsSide,
                  client_tls_ms: float, name: str, port: int) -> None:
        """HTTP/2 on both sides (the origin selected h2): relay_h2.py and http2.py, one flow per stream."""
        first = [True]

        def new_flow(stream_id: int) -> Flow:
            flow = Flow(client_addr=client_addr, mode="https", stream_id=stream_id)
            flow.tls.client, flow.tls.upstream = ctls, upstream.tls
            flow.insecure = self.policy.insecure
            if first[0] and stream_id:  # the handshakes belong to the connection's first stream
                first[0] = False
                t = flow.timing
                t.client_tls_ms, t.connect_ms, t.upstream_tls_ms = client_tls_ms, upstream.connect_ms, upstream.tls_ms
            return flow

        async def open_origin():
            """Another h2 connection to the same origin (after it retired the current one with GOAWAY)."""
            more = self._upstream(upstream.host, upstream.port, name, True, ("h2",))
            await more.open()
            if more.tls is None or more.tls.alpn != "h2":
                await more.close()
                raise UpstreamProtocolError(f"{name} no longer selects HTTP/2 on a new connection")
            return more.stream, more.tls, more.close

        await relay_h2(client, upstream.stream, new_flow=new_flow, emit=self.emit, policy=self.policy,
                       clock=self.clock, wall=self.wall, host=name, port=port, started=self.started,
                       open_origin=open_origin, close_first=upstream.close)

    # --- HTTP exchanges ------------------------------------------------------------------------

    async def _exchanges(self, client, rr: RequestReader, client_addr: str, mode: str, target,
                         *, first: RequestHead | None = None, upstream: Upstream | None = None,
                         connecting: asyncio.Future | None = None, client_tls=None) -> None:
        """Serve requests on one client connection until it or the origin stops keeping it alive."""
        try:
            while True:
                flow = Flow(client_addr=client_addr, mode=mode)
                if client_tls is not None:
                    flow.tls.client, flow.timing.client_tls_ms = client_tls[0], client_tls[1]
                t0 = self.clock()
                try:
                    head = first if first is not None else await self._read_head(client, rr, self.policy.idle_timeout)
                    first = None
                    if head is None:
                        return
                    flow.timing.start = self.wall()
                    t0 = self.clock()
                    if client_tls is not None:
                        client_tls = (client_tls[0], None)  # the handshake belongs to the first flow only
                    flow.request, dest = self._request_record(head, mode, target)
                    if self.ca is not None and installpage.is_install_host(dest[0]):
                        keep = await self._install_page(client, rr, head, flow)
                        flow.timing.total_ms = (self.clock() - t0) * 1000
                        self.emit(flow)
                        if not keep:
                            return
                        continue
                    if not (connecting is not None and connecting.done() and upstream.stream is not None
                            and not upstream.stream.at_eof()):  # else: the tunnel's open connection, as is
                        upstream, connecting = await self._upstream_for(upstream, connecting, dest, t0)
                    flow.tls.upstream = upstream.tls
                    flow.insecure = self.policy.insecure and upstream.tls is not None
                    if upstream.connect_ms is not None and connecting is not None:
                        flow.timing.connect_ms, flow.timing.upstream_tls_ms = upstream.connect_ms, upstream.tls_ms
                        upstream.connect_ms = None  # reused connections report no connect time
                    keep = await self._forward(client, rr, head, upstream, flow, t0)
                    if keep is True and (not head.keep_alive or rr.upgraded):
                        keep = False  # the client asked to close, or an Upgrade the origin declined
                except ProxyError as e:
                    await self._failed_exchange(client, flow, e, upstream, t0)
                    return
                flow.timing.total_ms = (self.clock() - t0) * 1000
                if isinstance(keep, _Switched):
                    await self._upgraded(client, upstream.stream, flow, rr.leftover, keep.server_bytes, t0)
                    return
                self.emit(flow)
                if not keep:
                    return
        finally:
            if upstream is not None:
                await upstream.close()

    async def _failed_exchange(self, client, flow: Flow, e: ProxyError, upstream, t0: float) -> None:
        """The one place an error becomes a response to the client and an error record."""
        if not flow.timing.start:
            flow.timing.start = self.wall()
        flow.error = e.to_record()
        if upstream is not None and upstream.tls is not None and flow.tls.upstream is None:
            flow.tls.upstream = upstream.tls
        flow.timing.total_ms = (self.clock() - t0) * 1000
        self.emit(flow)
        log.info("%s %s: %s", flow.client_addr, flow.request.url if flow.request else "-", e.message)
        if not getattr(e, "_response_started", False):
            with contextlib.suppress(Exception):
                await client.send(simple_response(e.status, _reason(e.status), f"httpsdump: {e.message}\n",
                                                  extra=e.headers))

    def _request_record(self, head: RequestHead, mode: str, target) -> tuple[Request, tuple]:
        if head.method == "CONNECT":
            raise BadRequest("CONNECT inside a tunnel is not supported")
        req = Request(method=head.method, http_version=head.http_version, headers=head.headers, target=head.target)
        if mode == "http":
            from urllib.parse import urlsplit

            _check_proxy_auth(head, self.policy.proxy_auth)
            parts = urlsplit(head.target)
            if parts.scheme != "http" or not parts.netloc:
                raise BadRequest(f"unsupported request target {head.target[:100]!r} (only http:// URLs and CONNECT)")
            host, port = _split_host_port(parts.netloc.rpartition("@")[2], 80)
            req.scheme, req.host, req.port = "http", host, port
            if (host, port) in self.policy.own_addresses:
                raise BadRequest(f"refusing to forward a request to the proxy itself ({host}:{port})")
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            req.target = path
            req.headers = [(k, v) for k, v in head.headers if k.lower() not in _HOP_BY_HOP_PROXY]
            return req, (host, port, None, False)
        host, port, tls_name, _ = target
        req.scheme = "https" if tls_name else "http"
        req.port = port
        req.host = tls_name or host
        hosthdr = req.header(b"host")
        if hosthdr:  # the URL a person expects to see is the one their client asked for
            try:  # (not contextlib.suppress: an object and two calls per request)
                req.host, req.port = _split_host_port(hosthdr.decode("latin-1"), 443 if tls_name else 80)
            except ProxyError:
                pass
        return req, target

    async def _install_page(self, client, rr: RequestReader, head: RequestHead, flow: Flow) -> bool:
        """Answer a request for httpsdump.invalid with installpage.serve(); returns keep-alive."""
        has_body = head.chunked or bool(head.content_length)
        if not has_body and rr.events and isinstance(rr.events[0], EndOfMessage):
            rr.next_event()
        close = has_body or not head.keep_alive  # a body is not read: close after answering
        status, reason, headers, body = installpage.serve(head.target, self.ca, method=head.method)
        if close:
            headers = [*headers, (b"Connection", b"close")]
        await client.send(serialize_response_head(status, reason, "1.1", headers) + body)
        flow.response = Response(status=status, reason=reason, http_version="1.1", headers=headers)
        flow.response.body.feed(body, self.policy.body_capture_limit)
        return not close

    def _upstream(self, host: str, port: int, tls_name: str | None, sni: bool,
                  alpn: tuple[str, ...] = ("http/1.1",)) -> Upstream:
        return Upstream(host, port, tls_name, sni=sni, ctx_for=self.upstream_ctx_for, policy=self.policy,
                        clock=self.clock, alpn=alpn)

    async def _upstream_for(self, upstream, connecting, dest, t0):
        host, port, tls_name, sni = dest
        if connecting is not None:  # CONNECT: the tunnel's one upstream, opened during the handshake
            upstream.request_ready = True  # this request goes out as soon as it is open
            if not connecting.done() or upstream.stream is None:
                await connecting
            elif upstream.stream.at_eof():  # the origin closed the idle connection: reopen it
                await upstream.close()
                await upstream.open()
            return upstream, connecting
        if upstream is not None and (upstream.host, upstream.port) == (host, port) and upstream.stream and not upstream.stream.at_eof():
            upstream.connect_ms = None
            return upstream, None
        if upstream is not None:
            await upstream.close()
        upstream = self._upstream(host, port, tls_name, sni)
        upstream.request_ready = True
        await upstream.open()
        return upstream, None

    async def _forward(self, client, rr: RequestReader, head: RequestHead, upstream: Upstream, flow: Flow,
                       t0: float):
        """Send the request (streaming its body) and relay the response. Returns True (the origin
        keeps the connection), False (close) or _Switched."""
        up = upstream.stream
        req = flow.request
        await up.send(serialize_request_head(head.method, req.target, head.http_version, req.headers))
        if not head.chunked and not head.content_length and isinstance(rr.events[0] if rr.events else None,
                                                                       EndOfMessage):
            rr.next_event()  # no body (the common GET): no pump task needed
            flow.timing.request_sent_ms = (self.clock() - t0) * 1000
            return await self._relay_response(client, upstream, head, flow, t0)
        # The request body and the response run side by side (100-continue, early answers such as 413).
        # Whichever side fails first ends the exchange: a client that vanishes mid-body must not leave
        # us waiting for a response the origin will never send.
        body_task = asyncio.ensure_future(self._pump_request_body(client, rr, head, up, flow, t0))
        resp_task = asyncio.ensure_future(self._relay_response(client, upstream, head, flow, t0))
        try:
            await asyncio.wait((body_task, resp_task), return_when=asyncio.FIRST_COMPLETED)
            if body_task.done() and body_task.exception() is not None:
                raise body_task.exception()
            result = await resp_task
        except BaseException:
            for task in (body_task, resp_task):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            raise
        if not body_task.done():
            # The origin answered before the request body ended (e.g. 413): stop here, close both.
            body_task.cancel()
            with contextlib.suppress(BaseException):
                await body_task
            return False
        body_task.result()  # re-raises a request-side failure
        return result

    async def _pump_request_body(self, client, rr: RequestReader, head: RequestHead, up, flow: Flow, t0: float) -> bool:
        cap = self.policy.body_capture_limit
        req = flow.request
        while True:
            ev = rr.next_event()
            if ev is None:
                try:
                    data = await client.recv(self.policy.idle_timeout)
                except TimeoutError:
                    raise ClientTimeout(f"the request body stalled for {self.policy.idle_timeout:g} s") from None
                if not data:
                    raise ClientError("the client closed the connection before sending the whole request body")
                rr.feed(data)
                continue
            if isinstance(ev, Data):
                req.body.feed(ev.data, cap)
                await up.send(chunk(ev.data) if head.chunked else ev.data)
            elif isinstance(ev, EndOfMessage):
                req.trailers = ev.trailers
                if head.chunked:
                    await up.send(last_chunk(ev.trailers))
                flow.timing.request_sent_ms = (self.clock() - t0) * 1000
                return True
            else:  # a pipelined request head: put it back for the exchange loop
                rr.push_back(ev)
                return True

    async def _relay_response(self, client, upstream: Upstream, head: RequestHead, flow: Flow, t0: float):
        """Relay the origin's answer. Output for the client is gathered while parsed events are at hand
        and sent in one write before waiting for more input: a small response is one TLS record and one
        send() instead of three (the syscalls dominated the profile)."""
        cap = self.policy.body_capture_limit
        up = upstream.stream
        resp_reader = upstream.response_reader(head.method, self.policy.limits)
        resp: ResponseHead | None = None
        out: list[bytes] = []
        queued = 0
        sent = False
        announce = self.started is not None and self.policy.stream_announce > 0
        # The "still streaming" announcement: armed when the final head has been relayed and the rest of
        # the response is not at hand yet (a small response never needs one: no timer per exchange).
        timer = None
        try:
            while True:
                ev = resp_reader.next_event()
                if ev is None:
                    if announce and resp is not None and timer is None:
                        timer = up.conn.loop.call_later(self.policy.stream_announce, self.started, flow)
                    if out:
                        sent = True
                        await client.send(b"".join(out) if len(out) > 1 else out[0])
                        out.clear()
                        queued = 0
                    data = await up.recv()
                    if flow.timing.first_byte_ms is None and data:
                        flow.timing.first_byte_ms = (self.clock() - t0) * 1000
                    try:
                        if data:
                            resp_reader.feed(data)
                        else:
                            if getattr(up, "truncated", False) and resp is not None and resp.close_delimited:
                                raise UpstreamProtocolError("the origin's TLS stream was cut short (no close_notify): "
                                                            "the response may be truncated")
                            resp_reader.feed_eof()
                    except UpstreamError as e:
                        e._response_started = sent
                        raise
                    continue
                if isinstance(ev, Data):
                    flow.response.body.feed(ev.data, cap)
                    out.append(chunk(ev.data) if resp.chunked else ev.data)
                    queued += len(ev.data)
                    if queued >= 262144:  # keep memory per connection bounded (backpressure below)
                        sent = True
                        await client.send(b"".join(out))
                        out.clear()
                        queued = 0
                elif isinstance(ev, ResponseHead):
                    if not ev.informational:
                        resp = ev
                        flow.response = Response(status=ev.status, reason=ev.reason, http_version=ev.http_version,
                                                 headers=ev.headers)
                    out.append(serialize_response_head(ev.status, ev.reason, ev.http_version, ev.headers))
                elif isinstance(ev, EndOfMessage):
                    flow.response.trailers = ev.trailers
                    if resp.chunked:
                        out.append(last_chunk(ev.trailers))
                    if resp_reader.switched:
                        upgrade = flow.response.header(b"upgrade")
                        flow.upgraded = "yes" if upgrade is None else upgrade.decode("latin-1")
                        out.append(resp_reader.leftover)  # the new protocol's first bytes, unchanged
                    keep = resp.keep_alive and not resp_reader.unsolicited
                    # The answer that ends the connection carries the close_notify in its write
                    await client.send(b"".join(out), not resp_reader.switched and not (keep and head.keep_alive))
                    if resp_reader.switched:
                        return _Switched(resp_reader.leftover)
                    return keep
        finally:
            if timer is not None:
                timer.cancel()

    async def _upgraded(self, client, up, flow: Flow, client_bytes: bytes, server_bytes: bytes, t0: float) -> None:
        """After a 101: relay raw bytes both ways; for WebSocket, also parse the frames for the log.
        The flow is emitted when the connection ends, carrying its messages."""
        observer = None
        if (flow.upgraded or "").lower() == "websocket":
            observer = WebSocketObserver(flow.request.headers, flow.response.headers)
            observer.feed("server", server_bytes)
            observer.feed("client", client_bytes)
        try:
            if client_bytes:
                await up.send(client_bytes)
            await self._raw_relay(client, up, observer)
        finally:
            if observer is not None:
                flow.websocket = observer.to_dict()
            flow.timing.total_ms = (self.clock() - t0) * 1000
            self.emit(flow)

    async def _raw_relay(self, client, up, observer=None) -> tuple[int, int]:
        """Copy bytes both ways until both sides are done (after a 101, or for a passthrough tunnel).
        Returns (bytes client→server, bytes server→client)."""
        counts = [0, 0]

        async def pipe(src, dst, i):
            direction = ("client", "server")[i]
            with contextlib.suppress(ProxyError):
                while True:
                    data = await src.recv()
                    if not data:
                        if observer is not None:
                            observer.feed_eof(direction)
                        await dst.send_eof()
                        return
                    counts[i] += len(data)
                    if observer is not None:
                        observer.feed(direction, data)  # never raises; the bytes go on unchanged
                    await dst.send(data)

        tasks = [asyncio.ensure_future(pipe(client, up, 0)), asyncio.ensure_future(pipe(up, client, 1))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        return counts[0], counts[1]

    async def _passthrough(self, client: PlainStream, hello_bytes: bytes, host: str, port: int, ctls: TlsSide,
                           client_addr: str) -> None:
        """--ignore-hosts / --allow-hosts: the TLS bytes go through untouched, decided from the SNI."""
        flow = Flow(client_addr=client_addr, mode="passthrough")
        flow.timing.start = self.wall()
        flow.tls.client = ctls
        t0 = self.clock()
        try:
            conn = await open_tcp(host, port, self.policy.connect_timeout, self.policy.upstream_proxy)
        except ProxyError as e:
            flow.error = e.to_record()
            flow.tunnel = {"host": host, "port": port, "bytes_from_client": 0, "bytes_from_server": 0}
            self.emit(flow)
            return
        flow.timing.connect_ms = (self.clock() - t0) * 1000
        server = PlainStream(conn, error=UpstreamProtocolError)
        try:
            await server.send(hello_bytes)
            up, down = await self._raw_relay(client, server)
        finally:
            await server.close()
        flow.tunnel = {"host": host, "port": port, "bytes_from_client": up + len(hello_bytes),
                       "bytes_from_server": down}
        flow.timing.total_ms = (self.clock() - t0) * 1000
        self.emit(flow)


@dataclass(frozen=True, slots=True)
class _Switched:
    """The origin answered 101: the connection now speaks another protocol."""

    server_bytes: bytes  # what the origin sent after its 101 head, already relayed to the client


def _mirrored_alpn(offer: tuple[str, ...], http2: bool) -> tuple[str, ...]:
    """What the origin is offered: the client's own list, in its order, limited to the protocols this
    proxy relays (h2 only when enabled); http/1.1 when that leaves nothing."""
    relayable = ("h2", "http/1.1") if http2 else ("http/1.1",)
    return tuple(p for p in offer if p in relayable) or ("http/1.1",)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
