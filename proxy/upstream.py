"""Connections to origins: TCP (directly or through an upstream proxy with CONNECT), then TLS verified
by M2Crypto. (asyncio shell)

Every way this can fail becomes a typed UpstreamError here (refused, unresolvable, timed out, the
upstream proxy's refusal, a certificate problem with its OpenSSL verify code, another handshake
failure), so the relay only maps errors to responses.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, urlsplit

from .errors import CertificateError, CertReason, ConfigError, UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from .flow import TlsSide
from .http1 import Limits, ResponseReader
from .streams import Conn, PlainStream, TLSStream, open_connection
from .tls.contexts import upstream_failure
from .tls.engine import TLSEngine, TLSFailure, cert_info_der, is_ip

__all__ = ["UpstreamProxy", "Upstream", "open_tcp"]

log = logging.getLogger("httpsdump.upstream")


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    """--upstream-proxy http://[user:pass@]host:port: every origin connection is a CONNECT through it."""

    host: str
    port: int
    authorization: bytes | None = None

    @classmethod
    def parse(cls, url: str) -> "UpstreamProxy":
        parts = urlsplit(url if "://" in url else "http://" + url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"upstream_proxy must look like http://[user:pass@]host:port (got {url!r})")
        try:
            port = parts.port or 8080
        except ValueError:
            raise ConfigError(f"upstream_proxy has an invalid port (got {url!r})") from None
        auth = None
        if parts.username is not None:
            cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode("utf-8")
            auth = b"Basic " + base64.b64encode(cred)
        return cls(parts.hostname, port, auth)


async def open_tcp(host: str, port: int, timeout: float, via: UpstreamProxy | None = None) -> Conn:
    """A connection to host:port, through `via` when given. Raises UpstreamError."""
    where = f"{host}:{port}"
    target_host, target_port = (via.host, via.port) if via else (host, port)
    conn = None
    try:
        async with asyncio.timeout(timeout):
            conn = await open_connection(target_host, target_port)
            if via is not None:
                await _connect_through(conn, host, port, via)
        return conn
    except BaseException as e:
        if conn is not None:
            conn.abort()  # timed out, refused or cancelled half-way: the socket must not outlive this call
        if isinstance(e, TimeoutError):
            raise UpstreamTimeout(f"connecting to {where} timed out after {timeout:g} s"
                                  + (f" (through the upstream proxy {via.host}:{via.port})" if via else "")) from None
        if isinstance(e, socket.gaierror):
            raise UpstreamConnectError(f"cannot resolve {target_host}: {e.strerror}") from None
        if isinstance(e, ConnectionRefusedError):
            what = f"the upstream proxy {target_host}:{target_port}" if via else where
            raise UpstreamConnectError(f"connection refused by {what}") from None
        if isinstance(e, OSError):
            raise UpstreamConnectError(f"cannot connect to {target_host}:{target_port}: {e.strerror or e}") from None
        raise


async def _connect_through(conn: Conn, host: str, port: int, via: UpstreamProxy) -> None:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if via.authorization:
        lines.append("Proxy-Authorization: " + via.authorization.decode("ascii"))
    conn.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    # Read exactly the answer's head, byte-exact: what follows belongs to the tunnel. The proxy sends
    # nothing after its head until we speak (TLS client first), so whole reads never overshoot.
    head = b""
    while b"\r\n\r\n" not in head:
        data = await conn.read()
        if not data or len(head) > 65536:
            await conn.close()
            raise UpstreamConnectError(f"the upstream proxy {via.host}:{via.port} closed the connection "
                                       f"instead of answering CONNECT {authority}")
        head += data
    head, _, extra = head.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if extra or len(parts) < 2 or not parts[1].isdigit() or not 200 <= int(parts[1]) < 300:
        await conn.close()
        raise UpstreamConnectError(f"the upstream proxy {via.host}:{via.port} refused CONNECT {authority}: "
                                   f"{status_line or 'no status line'}")


class Upstream:
    """One connection to an origin, opened on first use and reused while it stays alive."""

    def __init__(self, host: str, port: int, tls_name: str | None, *, sni: bool, ctx_for: Callable,
                 policy, clock: Callable[[], float], alpn: tuple[str, ...] = ("http/1.1",)) -> None:
        self.host, self.port = host, port
        self.alpn = alpn  # offered to the origin (the client's own list: ALPN mirroring)
        self.tls_name, self.sni = tls_name, sni
        self._ctx_for, self._policy, self._clock = ctx_for, policy, clock
        self.stream: PlainStream | TLSStream | None = None
        self.tls: TlsSide | None = None
        self.connect_ms: float | None = None
        self.tls_ms: float | None = None
        self._reader: ResponseReader | None = None
        # Set by the relay while it waits for open() with a request to send: the handshake's last
        # flight (our Finished) then leaves with the request, in one write (TLSStream.handshake)
        self.request_ready = False

    def response_reader(self, request_method: str, limits: Limits) -> ResponseReader:
        """A reader for the next response on this connection: the previous one reset when it ended
        cleanly (ResponseReader.reset), else a new one."""
        r = self._reader
        if r is None or not r.reset(request_method):
            r = self._reader = ResponseReader(request_method, limits)
        return r

    async def open(self) -> None:
        pol = self._policy
        self._reader = None
        t0 = self._clock()
        conn = await open_tcp(self.host, self.port, pol.connect_timeout, pol.upstream_proxy)
        self.connect_ms = (self._clock() - t0) * 1000
        if self.tls_name is None:
            self.stream = PlainStream(conn, error=UpstreamProtocolError)
            return
        try:
            await self._tls(conn)
        except BaseException:
            # Failed, or cancelled (the client gave up during its own handshake): nothing may keep the
            # origin's socket open, and no one else holds it yet.
            conn.abort()
            raise

    async def _tls(self, conn: Conn) -> None:
        pol = self._policy
        t1 = self._clock()
        ctx = self._ctx_for(self.tls_name)
        sessions = getattr(ctx, "_httpsdump_sessions", None)  # tls/sessions.py, unless turned off
        key = (self.tls_name, self.port, self.sni, self.alpn)
        sends_sni = self.sni and not is_ip(self.tls_name)
        group = None
        if sessions is not None and sends_sni and pol.upstream_proxy is None:
            peer = conn.peer_host()
            if peer:  # sibling sessions: other names served at this very address (tls/sessions.py)
                group = (peer, self.port, self.alpn)
        engine = TLSEngine(ctx, server_side=False, hostname=self.tls_name, sni=self.sni, alpn=self.alpn,
                           sessions=sessions, session_key=key, session_group=group)
        stream = TLSStream(conn, engine, error=UpstreamProtocolError)
        side = TlsSide(sni=self.tls_name if sends_sni else None, insecure=pol.insecure,
                       alpn_offer=tuple(self.alpn))
        self.tls = side
        try:
            await stream.handshake(timeout=pol.handshake_timeout)
        except TimeoutError:
            engine.free()
            raise UpstreamTimeout(f"TLS handshake with {self.tls_name} timed out after {pol.handshake_timeout:g} s") from None
        except TLSFailure as f:
            err = upstream_failure(f, self.tls_name, engine.leaf_der)
            _record_cert(side, engine, f.verify_code)
            engine.free()
            raise err from None
        if not self.request_ready:
            stream.flush()  # no request to carry our Finished: the origin must not wait for it
        self.tls_ms = (self._clock() - t1) * 1000
        if sessions is not None:
            if engine.session_reused:  # no certificate this time: the one the session was verified with
                side.resumed = True
                engine.leaf_der = engine.offered_leaf
                sessions.remember_leaf(key, engine.leaf_der)  # its new sessions rest on the same one
            elif engine.verify_code == 0:
                sessions.remember_leaf(key, engine.leaf_der)
        _record_cert(side, engine, engine.verify_code)
        side.version, side.cipher, side.alpn = engine.version, engine.cipher, engine.alpn
        if pol.insecure and engine.verify_code:
            log.warning("--insecure: %s's certificate failed verification (%s) and is used anyway",
                        self.tls_name, side.verify_result)
        if not pol.insecure and side.cert is not None and not side.cert.sans:
            # CA/B Forum BR §7.1.2.7.12 and every browser: names come from subjectAltName only.
            engine.free()
            raise CertificateError(CertReason.NO_SAN, 0, f"the certificate for {self.tls_name} names only "
                                   f"{side.cert.subject}")
        self.stream = stream

    async def close(self) -> None:
        self._reader = None
        if self.stream is not None:
            await self.stream.close()
            self.stream = None


def _record_cert(side: TlsSide, engine: TLSEngine, code: int) -> None:
    side.verify_code = code
    side.verified = code == 0
    side.verify_result = "ok" if code == 0 else CertReason.from_verify_code(code).value
    if engine.leaf_der:
        with contextlib.suppress(Exception):
            side.cert = cert_info_der(engine.leaf_der)
