"""Real origin servers for the tests: HTTP/1.1 (keep-alive) over TLS (Python's ssl module) or plain TCP,
each on 127.0.0.1 with an ephemeral port, served from background threads.

The HTTP handling is written out by hand (not http.server) so that the tests control the wire exactly:
headers are recorded as received (order and case), request bodies may be Content-Length or chunked
and are read as a stream, and `Expect: 100-continue` is answered with an interim response.

Routes (GET unless said; HEAD works on every route and sends the same headers without a body):

* ``/hello``            small text/plain body, headers in a fixed order with mixed case (HELLO_HEADERS)
* ``/json``             a small JSON document (JSON_BODY)
* ``/chunked``          Transfer-Encoding: chunked, the pieces of CHUNKS (CHUNKED_BODY joined)
* ``/gzip`` ``/deflate`` ``/br`` ``/zstd``  TEXT encoded; the exact bytes sent are ENCODED[name]
* ``/bytes?n=N``        N bytes of a deterministic pattern (pattern_sha256(N)), Content-Length, 64 KiB writes
* ``/upload``           any method: reads the body (Content-Length or chunked) and replies JSON
                        {"size", "sha256", "chunked", "expect_continue", "method"}
* ``/status/N``         status N (no body for 1xx/204/304)
* ``/headers``          the request's header lines as received, one per line
* ``/close``            no Content-Length: the body (CLOSE_BODY) ends when the connection closes
* ``/slow?ms=M``        waits M ms (default 300) before answering /hello's body

Every request received is recorded (method, target, headers ...) in a thread-safe list; see
`OriginServer.requests`, `mark()` and `requests_since()`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
import socketserver
import ssl
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import brotli
import zstandard

__all__ = [
    "OriginServer", "RecordedRequest", "HELLO_BODY", "HELLO_HEADERS", "JSON_BODY", "CHUNKS", "CHUNKED_BODY",
    "TEXT", "ENCODED", "CLOSE_BODY", "pattern_chunks", "pattern_sha256", "server_context",
]

HELLO_BODY = b"hello, world\n"
# (name, value) in the exact order and case the origin sends them for /hello (plus Content-Length last).
HELLO_HEADERS = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("X-Origin-First", "1"),
    ("x-MiXeD-CaSe", "Keep Me"),
    ("x-origin-last", "3"),
]
JSON_BODY = json.dumps({"hello": "world", "n": 42, "list": [1, 2, 3], "unicode": "h\u00e9llo"}).encode()
CHUNKS = [b"chunk one\n", b"chunk two, a bit longer\n", b"x" * 3000 + b"\n", b"fourth\n", b"the last chunk\n"]
CHUNKED_BODY = b"".join(CHUNKS)
TEXT = (
    "The quick brown fox jumps over the lazy dog. \u00e9t\u00e9 \u2603\n" * 200
    + "".join(f"line {i}: httpsdump decodes every Content-Encoding it relays\n" for i in range(300))
).encode("utf-8")
ENCODED = {
    "gzip": gzip.compress(TEXT, mtime=0),
    "deflate": zlib.compress(TEXT),  # HTTP "deflate" is the zlib format (RFC 9110 8.4.1.2)
    "br": brotli.compress(TEXT),
    "zstd": zstandard.ZstdCompressor(level=3).compress(TEXT),
}
CLOSE_BODY = b"this body ends when the connection closes\n" * 50

_BLOCK = bytes(range(256)) * 256  # 64 KiB
_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    304: "Not Modified", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 418: "I'm a teapot",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}
MAX_HEADER_BYTES = 256 * 1024


def pattern_chunks(n: int, size: int = len(_BLOCK)):
    """The /bytes?n=N body as a stream of at most `size`-byte pieces (never the whole body at once)."""
    assert size <= len(_BLOCK)
    left = n
    while left > 0:
        piece = _BLOCK[: min(size, left)]
        left -= len(piece)
        yield piece


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    for piece in pattern_chunks(n):
        h.update(piece)
    return h.hexdigest()


def server_context(serve: Path | str, key: Path | str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(serve), str(key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass
class RecordedRequest:
    conn_id: int
    method: str
    target: str
    http_version: str
    headers: list[tuple[str, str]]  # as received: order and case kept
    raw_head: bytes                 # the request line and header lines exactly as received
    body_size: int = 0
    expect_continue: bool = False
    at: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class _Closed(Exception):
    pass


class _BadRequest(Exception):
    pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, origin: "OriginServer"):
        self.origin = origin
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request, client_address):
        # Runs in the connection's own thread: the TLS handshake must not hold up accept().
        origin = self.origin
        conn_id = origin._new_conn(request)
        try:
            request.settimeout(30)
            if origin.ssl_context is not None:
                try:
                    request = origin.ssl_context.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    origin._tls_failed(e)
                    return
                origin._tls_ok()
            self.RequestHandlerClass(request, client_address, self, conn_id)
        finally:
            origin._end_conn(conn_id)

    def shutdown_request(self, request):
        try:
            request.close()
        except OSError:
            pass


class _Handler:
    """One connection: read requests in a loop (HTTP/1.1 keep-alive) and answer each."""

    def __init__(self, sock: socket.socket, client_address, server: _Server, conn_id: int):
        self.sock = sock
        self.server = server
        self.origin = server.origin
        self.conn_id = conn_id
        self.rfile = sock.makefile("rb", buffering=65536)
        try:
            self.serve()
        except (_Closed, OSError, ssl.SSLError):
            pass
        finally:
            self._close()

    # --- wire helpers ------------------------------------------------------------------------

    def _close(self) -> None:
        try:
            self.rfile.close()
        except OSError:
            pass
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket):
            # Send close_notify without waiting for the peer's (like a normal server does).
            try:
                sock.setblocking(False)
                sock.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
        try:
            sock.close()
        except OSError:
            pass

    def _readline(self, limit: int = 65536) -> bytes:
        line = self.rfile.readline(limit + 1)
        if len(line) > limit:
            raise _BadRequest("line too long")
        return line

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _respond(self, req: RecordedRequest, status: int, headers: list[tuple[str, str]], body: bytes = b"",
                 *, length: bool = True) -> None:
        headers = list(headers)
        no_body = status in (204, 304) or 100 <= status < 200
        if length and not no_body:
            headers.append(("Content-Length", str(len(body))))
        out = self._head(status, headers)
        if req.method != "HEAD" and not no_body:
            out += body
        self._send(out)

    # --- request reading ----------------------------------------------------------------------

    def _read_head(self) -> tuple[bytes, list[bytes]] | None:
        line = self._readline()
        while line in (b"\r\n", b"\n"):  # tolerate empty lines between requests (RFC 9112 2.2)
            line = self._readline()
        if not line:
            return None
        raw = [line]
        total = len(line)
        while True:
            h = self._readline()
            if not h:
                raise _Closed()
            raw.append(h)
            total += len(h)
            if total > MAX_HEADER_BYTES:
                raise _BadRequest("header block too large")
            if h in (b"\r\n", b"\n"):
                break
        return line, raw

    def _body_chunks(self, req: RecordedRequest):
        """Yield the request body as it arrives (Content-Length or chunked)."""
        te = (req.header("Transfer-Encoding") or "").lower()
        cl = req.header("Content-Length")
        if "chunked" in te:
            while True:
                size_line = self._readline()
                if not size_line:
                    raise _Closed()
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self._readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return
                yield from self._read_exactly(size)
                if self._readline() not in (b"\r\n", b"\n"):
                    raise _BadRequest("bad chunk end")
        elif cl is not None:
            yield from self._read_exactly(int(cl))

    def _read_exactly(self, n: int):
        while n:
            data = self.rfile.read(min(n, 65536))
            if not data:
                raise _Closed()
            n -= len(data)
            yield data

    def _has_body(self, req: RecordedRequest) -> bool:
        te = req.header("Transfer-Encoding")
        cl = req.header("Content-Length")
        return bool(te) or (cl is not None and cl.strip() != "0")

    # --- the loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            head = self._read_head()
            if head is None:
                return
            line, raw = head
            parts = line.decode("latin-1").rstrip("\r\n").split(" ")
            if len(parts) != 3:
                self._send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            method, target, version = parts
            headers: list[tuple[str, str]] = []
            for h in raw[1:-1]:
                name, _, value = h.decode("latin-1").rstrip("\r\n").partition(":")
                headers.append((name, value.strip()))
            req = RecordedRequest(conn_id=self.conn_id, method=method, target=target, http_version=version,
                                  headers=headers, raw_head=b"".join(raw))
            req.expect_continue = (req.header("Expect") or "").lower() == "100-continue"
            self.origin._record(req)

            # An interim 100 before reading a body the client is holding back.
            if req.expect_continue and self._has_body(req):
                self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

            keep = version == "HTTP/1.1" and (req.header("Connection") or "").lower() != "close"
            keep = self.dispatch(req) and keep
            if not keep:
                return

    def _drain(self, req: RecordedRequest) -> None:
        for data in self._body_chunks(req):
            req.body_size += len(data)

    def dispatch(self, req: RecordedRequest) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        url = urlsplit(req.target)
        path, query = url.path, parse_qs(url.query)
        origin_hdr = ("X-Origin", self.origin.name)

        if path == "/upload":
            h = hashlib.sha256()
            chunked = "chunked" in (req.header("Transfer-Encoding") or "").lower()
            for data in self._body_chunks(req):
                h.update(data)
                req.body_size += len(data)
            body = json.dumps({"size": req.body_size, "sha256": h.hexdigest(), "chunked": chunked,
                               "expect_continue": req.expect_continue, "method": req.method}).encode()
            self._respond(req, 200, [("Content-Type", "application/json"), origin_hdr], body)
            return True

        self._drain(req)
        if path == "/hello":
            self._respond(req, 200, HELLO_HEADERS, HELLO_BODY)
        elif path == "/json":
            self._respond(req, 200, [("Content-Type", "application/json"), origin_hdr], JSON_BODY)
        elif path == "/slow":
            time.sleep(int(query.get("ms", ["300"])[0]) / 1000)
            self._respond(req, 200, HELLO_HEADERS, HELLO_BODY)
        elif path == "/chunked":
            self._send(self._head(200, [("Content-Type", "text/plain"), origin_hdr, ("Transfer-Encoding", "chunked")]))
            if req.method != "HEAD":
                for piece in CHUNKS:  # one write per chunk: they reach the proxy as separate pieces
                    self._send(b"%x\r\n%s\r\n" % (len(piece), piece))
                self._send(b"0\r\n\r\n")
        elif path.lstrip("/") in ENCODED:
            enc = path.lstrip("/")
            self._respond(req, 200, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Encoding", enc),
                                     ("Vary", "Accept-Encoding"), origin_hdr], ENCODED[enc])
        elif path == "/bytes":
            n = int(query.get("n", ["1024"])[0])
            self._send(self._head(200, [("Content-Type", "application/octet-stream"), origin_hdr,
                                        ("Content-Length", str(n))]))
            if req.method != "HEAD":
                for piece in pattern_chunks(n):
                    self._send(piece)
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            self._respond(req, status, [("Content-Type", "text/plain"), origin_hdr], f"status {status}\n".encode())
        elif path == "/headers":
            body = b"".join(h.rstrip(b"\r\n") + b"\n" for h in req.raw_head.split(b"\n")[1:] if h.strip())
            self._respond(req, 200, [("Content-Type", "text/plain"), origin_hdr], body)
        elif path == "/close":
            self._send(self._head(200, [("Content-Type", "text/plain"), origin_hdr, ("Connection", "close")]))
            if req.method != "HEAD":
                self._send(CLOSE_BODY)
            return False
        else:
            self._respond(req, 404, [("Content-Type", "text/plain"), origin_hdr], b"no such route\n")
        return True


class RequestLog:
    """What a test origin received, in order, readable while it serves (the HTTP/1 origin here and the
    HTTP/2 one in h2origin.py). Requests have `target` (as received) and `path`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list = []

    def _record(self, req) -> None:
        with self._lock:
            self._requests.append(req)

    @property
    def requests(self) -> list:
        with self._lock:
            return list(self._requests)

    def mark(self) -> int:
        """A position in the request log; `requests_since(mark)` is what arrived after it."""
        with self._lock:
            return len(self._requests)

    def requests_since(self, mark: int) -> list:
        with self._lock:
            return list(self._requests[mark:])

    def requests_with(self, needle: str) -> list:
        """Requests whose target contains `needle` (tests put a unique token in the query)."""
        return [r for r in self.requests if needle in r.target]

    def wait_requests(self, count: int, since: int = 0, timeout: float = 10.0, path: str | None = None) -> list:
        """Poll until `count` requests (with that path, if given) arrived after `since`; returns what arrived."""
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.requests_since(since) if path is None or r.path == path]
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.01)


class OriginServer(RequestLog):
    """A TLS (or plain, when `serve`/`key` are None) HTTP/1.1 origin on 127.0.0.1:<ephemeral>."""

    def __init__(self, name: str, serve: Path | str | None = None, key: Path | str | None = None):
        super().__init__()
        self.name = name
        self.ssl_context = server_context(serve, key) if serve is not None else None
        self._conns: dict[int, socket.socket] = {}
        self._next_conn = 0
        self.connections = 0        # TCP connections accepted
        self.tls_ok = 0             # TLS handshakes completed
        self.tls_failures: list[str] = []  # TLS handshakes that failed (e.g. the client refused our cert)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "OriginServer":
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"origin-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            conns = list(self._conns.values())
        for s in conns:  # unblock the connection threads still waiting for a request
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        self._server = None

    def __enter__(self) -> "OriginServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "origin not started"
        return self._server.server_address[1]

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<OriginServer {self.name} {self.url if self._server else '(stopped)'}>"

    # --- recording --------------------------------------------------------------------------------

    def _new_conn(self, sock) -> int:
        with self._lock:
            self._next_conn += 1
            self.connections += 1
            self._conns[self._next_conn] = sock
            return self._next_conn

    def _end_conn(self, conn_id: int) -> None:
        with self._lock:
            self._conns.pop(conn_id, None)

    def _tls_ok(self) -> None:
        with self._lock:
            self.tls_ok += 1

    def _tls_failed(self, e: Exception) -> None:
        with self._lock:
            self.tls_failures.append(f"{type(e).__name__}: {e}")

