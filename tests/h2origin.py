"""A real HTTP/2 origin server for the end-to-end tests, built on ``h2`` (sans-IO) and Python's ``ssl``.

It listens on 127.0.0.1:<ephemeral>, serves TLS with the test PKI's origin certificate and offers ALPN
(default ``["h2", "http/1.1"]``, configurable), and runs its own asyncio loop in a background thread.
Its h2 configuration keeps request headers exactly as received::

    H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True,
                    normalize_inbound_headers=False)

so cookie crumbs are not joined, duplicates are kept, and the order on the wire is the recorded order.

Protocol choice per connection:

* ALPN ``h2``                      HTTP/2 (the routes below).
* ALPN ``http/1.1`` or no ALPN     a *minimal HTTP/1.1 fallback*: ONE request per connection (head, plus a
                                   Content-Length body if any) is recorded (``stream_id == 0``,
                                   ``http_version`` from the request line, ``alpn`` as negotiated) and
                                   answered ``200`` with ``H1_FALLBACK_BODY``, header
                                   ``x-h2origin-fallback: <alpn or none>`` and ``Connection: close``; then the
                                   connection closes. Routes are NOT served over HTTP/1.1 (use
                                   tests/origin.py for that). A client that sends the HTTP/2 preface
                                   without having negotiated ``h2`` gets ``505`` (recorded with method ``PRI``).
* plain TCP (``serve=None``)       HTTP/2 with prior knowledge (h2c), no TLS, ``alpn is None``.

Routes (any method; HEAD sends the same headers without a body; response header names are lowercase):

* ``/hello``             200 ``HELLO_BODY`` with ``H2_HELLO_HEADERS`` (fixed order) + content-length
* ``/json``              200 ``JSON_BODY`` (tests/origin.py's)
* ``/echo``              200, the request body as the response body; the request's headers (pseudo-headers
                         included, wire order) as JSON ``[[name, value], ...]`` in the response header
                         ``x-echo-headers``; the request's trailers likewise in ``x-echo-trailers`` (if any)
* ``/bytes/N``           (or ``/bytes?n=N``) N bytes of tests/origin.py's pattern (``pattern_sha256(N)``),
                         sent strictly within the client's HTTP/2 flow-control windows: the sender waits for
                         WINDOW_UPDATE (or a SETTINGS change) and never queues more than the window allows.
                         ``H2Request.data_sent`` counts the DATA payload bytes written so far (to the asyncio
                         transport, i.e. on their way to the kernel; never more than the client's windows
                         allowed), ``H2Request.window_blocked`` is True while the sender waits for a window
                         and ``H2Request.window_waits`` counts those waits.
* ``/slow?ms=M``         waits M ms (default 300), then answers like /hello (keeps streams open concurrently)
* ``/trailers``          200 ``TRAILERS_BODY`` then trailers ``x-checksum: <sha256 hex of the body>`` and
                         ``x-request-body-sha256: <sha256 hex of the request body>``; request trailers are
                         recorded in ``H2Request.trailers`` (on every route)
* ``/reset?code=C&bytes=K``  sends 200 headers (and K pattern bytes, default 0), then RST_STREAM with error
                         code C (default 2 INTERNAL_ERROR; 8 is CANCEL)
* ``/goaway?code=C``     answers like /hello, then sends GOAWAY(last_stream_id = this stream, error C,
                         default 0). Streams <= that id still complete; later new streams are refused
                         (RST_STREAM REFUSED_STREAM, recorded with ``refused=True``); the origin closes the
                         connection once no stream <= last_stream_id is still being answered.
* ``/push``              if the client allows push (SETTINGS_ENABLE_PUSH), PUSH_PROMISE ``GET /pushed`` then
                         the 200 ``PUSH_PARENT_BODY`` response, then the pushed 200 ``PUSHED_BODY``;
                         otherwise just the 200 response. ``H2Request.push_allowed`` / ``pushed_stream_id``
                         record what happened.
* ``/pushed``            200 ``PUSHED_BODY`` (what a push would have delivered)
* ``/status/N``          status N with body ``status N\\n`` (none for 204/304); 1xx (N != 101): an interim
                         N response, then a final 200 /hello response
* ``/headers``           200 JSON ``[[name, value], ...]``: the request's headers in wire order, pseudo-headers
                         included
* ``/gzip`` ``/deflate`` ``/br`` ``/zstd``  tests/origin.py's ``TEXT`` encoded; the exact bytes are ``ENCODED[name]``
* ``pages``              ``H2Origin(pages={path: (content_type, body)})`` serves these first (body: bytes, or a
                         function of the H2Request returning bytes): a small site for browser tests
* anything else          404

Request bodies are read (and their flow-control windows reopened) as they arrive; a route is answered once
the request stream has ended (END_STREAM), each in its own task, so many streams can be open at once.

Use from a test module (tests/ is on sys.path, like the other helpers). Either load this module as a plugin,
which registers its fixtures (see tests/test_h2origin.py; registering it for assertion rewriting first avoids
pytest's "already imported" warning when the module also imports names from here)::

    pytest.register_assert_rewrite("h2origin")
    from h2origin import H2Client, H2Origin  # noqa: E402
    pytest_plugins = ["h2origin"]

or import the fixtures by name: ``from h2origin import h2origin, start_h2origin  # noqa: F401, F811``.

* fixture ``h2origin``        (function) a started ``H2Origin`` with the PKI's "good" leaf (SAN localhost,
                              good.test, 127.0.0.1) and the default ALPN list; stopped after the test.
* fixture ``start_h2origin``  (function) factory ``start_h2origin(flavour="good", **H2Origin kwargs)``; every
                              origin it started is stopped after the test. ``flavour=None`` → plain h2c.
                              Both need the ``pki`` fixture of tests/conftest.py, and both fail the test at
                              teardown if the origin itself raised (``H2Origin.errors``).

``H2Origin(name="h2", serve=None, key=None, *, alpn=("h2", "http/1.1"), max_concurrent_streams=None,
initial_window_size=None, max_frame_size=None)`` (the last three go into the origin's SETTINGS): ``start()``
(returns self) / ``stop()`` / context manager, ``port``, ``url`` (``https://127.0.0.1:<port>``),
``url_for(host="good.test")`` and ``resolve_args(host)`` (curl's ``--resolve``), ``requests`` (``H2Request``
list), ``mark()``, ``requests_since(mark)``, ``requests_with(needle)``, ``request(stream_id, conn_id=None)``,
``wait_requests(count, since=0, timeout=10, path=None)``, ``wait_request(path, timeout=10)``; per-connection
records ``conns`` (conn_id -> ``H2Conn``: alpn, sni, tls_version, protocol, client_settings, streams,
open_streams / max_open_streams, goaway_received / goaway_sent, protocol_error, closed); counters
``connections``, ``tls_ok``, ``tls_failures``; ``errors`` (the origin's own exceptions).

A GOAWAY is graceful both ways (h2 itself would drop the connection state on receiving one, see
``_GracefulH2Connection``): streams <= last_stream_id are still answered/received to the end.

``H2Client`` is a small blocking HTTP/2 client (h2 + an ``ssl`` socket) with manual flow control, for tests
that must drive frames precisely (windows, resets, pushes); it works over any connected TLS socket (e.g.
one tunnelled through the proxy).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import GoAwayFrame

from origin import ENCODED, HELLO_BODY, JSON_BODY, RequestLog, pattern_chunks, pattern_sha256

__all__ = [
    "H2Origin", "H2Request", "H2Conn", "H2Client", "ClientStream", "h2origin", "start_h2origin",
    "DEFAULT_ALPN", "H2_HELLO_HEADERS", "HELLO_BODY", "H1_FALLBACK_BODY", "TRAILERS_BODY", "PUSHED_BODY",
    "PUSH_PARENT_BODY", "pattern_sha256", "h2_server_context",
]

DEFAULT_ALPN = ("h2", "http/1.1")
# (name, value) in the exact order the origin sends them for /hello (content-length is appended last).
H2_HELLO_HEADERS = [
    ("content-type", "text/plain; charset=utf-8"),
    ("x-origin-first", "1"),
    ("x-mixed-case", "Keep Me"),
    ("x-origin-last", "3"),
]
H1_FALLBACK_BODY = b"h2origin: HTTP/1.1 fallback (h2 was not negotiated)\n"
TRAILERS_BODY = b"a body followed by trailers\n" * 10
PUSH_PARENT_BODY = b"the page that pushed /pushed\n"
PUSHED_BODY = b"pushed by the origin\n"
PUSHED_PATH = "/pushed"

_H2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"


def h2_server_context(serve: Path | str, key: Path | str, alpn=DEFAULT_ALPN) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 9113 9.2: TLS 1.2 or later
    ctx.load_cert_chain(str(serve), str(key))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _dec(pairs) -> list[tuple[str, str]]:
    # latin-1 maps every byte to one code point: lossless, so str comparisons see the exact wire bytes.
    return [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in pairs]


class _GracefulH2Connection(h2.connection.H2Connection):
    """h2's H2Connection, except that a received GOAWAY does not end the connection at once.

    h2 moves its state machine to CLOSED on any GOAWAY it receives, after which every frame (even on the
    streams <= last_stream_id that the sender promised to finish, RFC 9113 6.8) raises ProtocolError and
    pending output is dropped. Here the ConnectionTerminated event is still emitted, but the connection
    stays usable so a graceful GOAWAY can be observed to the end by both the origin and H2Client.
    """

    def _receive_goaway_frame(self, frame):
        ev = h2.events.ConnectionTerminated()
        try:
            ev.error_code = h2.errors.ErrorCodes(frame.error_code)
        except ValueError:
            ev.error_code = frame.error_code
        ev.last_stream_id = frame.last_stream_id
        ev.additional_data = frame.additional_data or None
        return [], [ev]


def _graceful_connection(client_side: bool) -> _GracefulH2Connection:
    """Headers as bytes, validated but not normalised: recorded (and sent) exactly as on the wire."""
    return _GracefulH2Connection(config=h2.config.H2Configuration(
        client_side=client_side, header_encoding=None, validate_inbound_headers=True,
        normalize_inbound_headers=False))


# --- what the origin records ----------------------------------------------------------------------


@dataclass
class H2Request:
    """One request as the origin received it (HTTP/2 stream, or the HTTP/1.1 fallback's single request).

    Fields are updated by the origin's loop thread while the exchange runs (body, trailers, ended,
    data_sent ...); poll them with a deadline (helpers.poll) rather than assuming they are final.
    """

    conn_id: int
    stream_id: int                       # 0 for the HTTP/1.1 fallback
    alpn: str | None                     # "h2", "http/1.1" or None (no ALPN / plain h2c)
    method: str
    scheme: str | None                   # :scheme (None on HTTP/1.1)
    authority: str | None                # :authority (the Host header on HTTP/1.1)
    target: str                          # :path exactly as received (path + query); `path` drops the query
    headers: list[tuple[str, str]]       # every header as received, wire order, pseudo-headers included
    http_version: str = "HTTP/2"
    trailers: list[tuple[str, str]] | None = None
    ended: bool = False                  # the client ended its side (END_STREAM)
    reset_code: int | None = None        # the client reset the stream (RST_STREAM error code)
    refused: bool = False                # arrived after our GOAWAY with a higher id: refused, not answered
    status: int | None = None            # the final status the origin sent
    reset_sent: int | None = None        # the origin reset the stream with this error code (/reset)
    push_allowed: bool | None = None     # /push: did the client's SETTINGS_ENABLE_PUSH allow a push
    pushed_stream_id: int | None = None  # /push: the promised stream id, when pushed
    data_sent: int = 0                   # response DATA payload bytes handed to the socket so far
    window_blocked: bool = False         # the sender is waiting for the client's flow-control window
    window_waits: int = 0                # how many times it had to wait
    response_done: bool = False          # the origin's handler for this stream has finished (any outcome)
    at: float = field(default_factory=time.monotonic)
    _body: bytearray = field(default_factory=bytearray, repr=False)

    @property
    def body(self) -> bytes:
        return bytes(self._body)

    @property
    def body_size(self) -> int:
        return len(self._body)

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)

    @property
    def pseudo_headers(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.headers if k.startswith(":")]

    @property
    def regular_headers(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.headers if not k.startswith(":")]

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), pseudo-headers included."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class H2Conn:
    """One accepted connection."""

    conn_id: int
    alpn: str | None = None
    sni: str | None = None                          # the server name the client sent (TLS), if any
    tls_version: str | None = None
    protocol: str | None = None                     # "h2", "http/1.1" (the fallback) or None (TLS failed)
    client_settings: dict[int, int] = field(default_factory=dict)  # the client's SETTINGS (code -> value)
    streams: int = 0                                # request streams opened by the client
    open_streams: int = 0                           # streams currently open (received, not yet answered)
    max_open_streams: int = 0                       # the most streams open at the same time
    goaway_received: tuple[int, int] | None = None  # (error_code, last_stream_id) from the client
    goaway_sent: tuple[int, int] | None = None      # (error_code, last_stream_id) we sent
    protocol_error: str | None = None               # h2 refused the client's frames
    closed: bool = False

    @property
    def push_enabled(self) -> bool:
        return bool(self.client_settings.get(h2.settings.SettingCodes.ENABLE_PUSH, 1))


class _StreamGone(Exception):
    pass


# --- one HTTP/2 connection (runs on the origin's loop) ----------------------------------------------


class _H2Session:
    def __init__(self, origin: "H2Origin", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 info: H2Conn):
        self.origin = origin
        self.reader = reader
        self.writer = writer
        self.info = info
        self.conn = _graceful_connection(client_side=False)
        self.reqs: dict[int, H2Request] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.window_events: dict[int, asyncio.Event] = {}
        self.active: set[int] = set()
        self.goaway_last: int | None = None
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()

    # -- wire --

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        self.flush()
        await self.writer.drain()

    def _wake(self, stream_id: int) -> None:
        if stream_id == 0:
            for ev in self.window_events.values():
                ev.set()
        elif stream_id in self.window_events:
            self.window_events[stream_id].set()

    # -- the read loop --

    async def serve(self) -> None:
        settings = {}
        o = self.origin
        if o.max_concurrent_streams is not None:
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = o.max_concurrent_streams
        if o.initial_window_size is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = o.initial_window_size
        if o.max_frame_size is not None:
            settings[h2.settings.SettingCodes.MAX_FRAME_SIZE] = o.max_frame_size
        self.conn.initiate_connection()
        if settings:  # a second SETTINGS frame: h2 applies its values once the client acknowledges them
            self.conn.update_settings(settings)
        self.flush()
        try:
            while True:
                read = asyncio.ensure_future(self.reader.read(65536))
                await asyncio.wait([read, self.finished], return_when=asyncio.FIRST_COMPLETED)
                if self.finished.done():  # a graceful GOAWAY completed: close (see _closed_stream)
                    read.cancel()
                    return
                data = read.result()
                if not data:
                    return
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    self.info.protocol_error = f"{type(e).__name__}: {e}"
                    self.flush()  # h2 queued a GOAWAY
                    return
                for ev in events:
                    self._event(ev)
                self.flush()
                if self.info.goaway_received is not None and not self.active:
                    return
        finally:
            for t in self.tasks.values():
                t.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _event(self, ev) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._request(ev)
        elif isinstance(ev, h2.events.DataReceived):
            req = self.reqs.get(ev.stream_id)
            if req is not None:
                req._body += ev.data
            try:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
        elif isinstance(ev, h2.events.TrailersReceived):
            req = self.reqs.get(ev.stream_id)
            if req is not None:
                req.trailers = _dec(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            req = self.reqs.get(ev.stream_id)
            if req is not None and not req.refused:
                req.ended = True
                self.tasks[ev.stream_id] = asyncio.get_running_loop().create_task(self._handle(req))
        elif isinstance(ev, h2.events.StreamReset):
            req = self.reqs.get(ev.stream_id)
            if req is not None and ev.remote_reset:
                req.reset_code = int(ev.error_code)
                if ev.stream_id not in self.tasks:  # reset before the request ended: nothing will answer it
                    self._closed_stream(req)
            self._wake(ev.stream_id)
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                for code, setting in ev.changed_settings.items():
                    self.info.client_settings[int(code)] = setting.new_value
            self._wake(getattr(ev, "stream_id", 0) or 0)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.info.goaway_received = (int(ev.error_code), ev.last_stream_id)
            self._wake(0)

    def _request(self, ev: h2.events.RequestReceived) -> None:
        headers = _dec(ev.headers)
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        req = H2Request(conn_id=self.info.conn_id, stream_id=ev.stream_id, alpn=self.info.alpn,
                        method=pseudo.get(":method", ""), scheme=pseudo.get(":scheme"),
                        authority=pseudo.get(":authority"), target=pseudo.get(":path", ""), headers=headers)
        self.reqs[ev.stream_id] = req
        self.info.streams += 1
        if self.goaway_last is not None and ev.stream_id > self.goaway_last:
            req.refused = True
            req.response_done = True
            self.conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        else:
            self.active.add(ev.stream_id)
            self.info.open_streams = len(self.active)
            self.info.max_open_streams = max(self.info.max_open_streams, len(self.active))
        self.origin._record(req)

    def _closed_stream(self, req: H2Request) -> None:
        req.window_blocked = False
        req.response_done = True
        self.active.discard(req.stream_id)
        self.info.open_streams = len(self.active)
        self.window_events.pop(req.stream_id, None)
        if ((self.goaway_last is not None and not any(s <= self.goaway_last for s in self.active))
                or (self.info.goaway_received is not None and not self.active)):
            # Graceful GOAWAY done (ours or the client's): every stream still promised has been answered.
            self.flush()
            if not self.finished.done():
                self.finished.set_result(None)

    # -- sending --

    async def send_headers(self, sid: int, status: int, headers, *, end: bool = False,
                           req: H2Request | None = None) -> None:
        if req is not None and req.reset_code is not None:
            raise _StreamGone()
        self.conn.send_headers(sid, [(":status", str(status)), *headers], end_stream=end)
        if req is not None and status >= 200:
            req.status = status
        await self.drain()

    async def send_body(self, sid: int, pieces, *, end: bool = True, req: H2Request | None = None) -> None:
        """Send `pieces` as DATA, never more than the flow-control windows allow at that moment."""
        for piece in pieces:
            view = memoryview(piece)
            while view:
                if req is not None and req.reset_code is not None:
                    raise _StreamGone()
                window = self.conn.local_flow_control_window(sid)
                if window <= 0:
                    ev = self.window_events.setdefault(sid, asyncio.Event())
                    ev.clear()
                    if req is not None:
                        req.window_blocked = True
                        req.window_waits += 1
                    try:
                        await ev.wait()
                    finally:
                        if req is not None:
                            req.window_blocked = False
                    continue
                n = min(len(view), window, self.conn.max_outbound_frame_size)
                self.conn.send_data(sid, view[:n].tobytes())
                view = view[n:]
                if req is not None:
                    req.data_sent += n
                await self.drain()
        if end:
            self.conn.end_stream(sid)
            await self.drain()

    async def respond(self, req: H2Request, status: int, headers, body: bytes = b"", *,
                      length: bool = True) -> None:
        headers = list(headers)
        no_body = status in (204, 304)
        if length and not no_body:
            headers.append(("content-length", str(len(body))))
        if req.method == "HEAD" or no_body or not body:
            await self.send_headers(req.stream_id, status, headers, end=True, req=req)
        else:
            await self.send_headers(req.stream_id, status, headers, req=req)
            await self.send_body(req.stream_id, [body], req=req)

    def send_goaway(self, last_stream_id: int, code: int = 0) -> None:
        # Written by hand: h2 moves its state machine to CLOSED on close_connection() and would then refuse
        # to finish the streams <= last_stream_id that a graceful GOAWAY promises to complete.
        self.flush()
        f = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=code)
        self.writer.write(f.serialize())
        self.goaway_last = last_stream_id
        self.info.goaway_sent = (code, last_stream_id)

    # -- routes --

    async def _handle(self, req: H2Request) -> None:
        try:
            await self._route(req)
        except (_StreamGone, h2.exceptions.StreamClosedError, ConnectionError, ssl.SSLError):
            pass
        except h2.exceptions.ProtocolError as e:
            self.info.protocol_error = f"{type(e).__name__}: {e}"
        except Exception:  # a bug in the origin itself: reported by the fixtures at teardown
            self.origin._error(f"stream {req.stream_id} {req.method} {req.target}")
        finally:
            self.tasks.pop(req.stream_id, None)
            self._closed_stream(req)

    async def _route(self, req: H2Request) -> None:
        path, query = req.path, req.query
        sid = req.stream_id

        def q(name: str, default: str) -> str:
            return query.get(name, [default])[0]

        page = self.origin.pages.get(path)
        if page is not None:  # pages given to H2Origin(pages=...): a site for browser tests
            ctype, body = page
            if callable(body):
                body = body(req)
            await self.respond(req, 200, [("content-type", ctype), ("cache-control", "no-store")], body)
        elif path == "/hello":
            await self.respond(req, 200, H2_HELLO_HEADERS, HELLO_BODY)
        elif path == "/json":
            await self.respond(req, 200, [("content-type", "application/json")], JSON_BODY)
        elif path == "/echo":
            hdrs = [("content-type", req.header("content-type") or "application/octet-stream"),
                    ("x-echo-headers", json.dumps([list(h) for h in req.headers]))]
            if req.trailers is not None:
                hdrs.append(("x-echo-trailers", json.dumps([list(h) for h in req.trailers])))
            await self.respond(req, 200, hdrs, req.body)
        elif path == "/bytes" or path.startswith("/bytes/"):
            n = int(path.split("/", 2)[2]) if path.startswith("/bytes/") else int(q("n", "1024"))
            head = [("content-type", "application/octet-stream"), ("content-length", str(n))]
            if req.method == "HEAD" or n == 0:
                await self.send_headers(sid, 200, head, end=True, req=req)
            else:
                await self.send_headers(sid, 200, head, req=req)
                await self.send_body(sid, pattern_chunks(n), req=req)
        elif path == "/slow":
            await asyncio.sleep(int(q("ms", "300")) / 1000)
            await self.respond(req, 200, H2_HELLO_HEADERS, HELLO_BODY)
        elif path == "/trailers":
            await self.send_headers(sid, 200, [("content-type", "text/plain"), ("trailer", "x-checksum")],
                                    end=req.method == "HEAD", req=req)
            if req.method != "HEAD":
                await self.send_body(sid, [TRAILERS_BODY], end=False, req=req)
                self.conn.send_headers(sid, [("x-checksum", hashlib.sha256(TRAILERS_BODY).hexdigest()),
                                             ("x-request-body-sha256", hashlib.sha256(req.body).hexdigest())],
                                       end_stream=True)
                await self.drain()
        elif path == "/reset":
            code = int(q("code", str(int(h2.errors.ErrorCodes.INTERNAL_ERROR))))
            await self.send_headers(sid, 200, [("content-type", "application/octet-stream")], req=req)
            n = int(q("bytes", "0"))
            if n:
                await self.send_body(sid, pattern_chunks(n), end=False, req=req)
            self.conn.reset_stream(sid, code)
            req.reset_sent = code
            await self.drain()
        elif path == "/goaway":
            await self.respond(req, 200, H2_HELLO_HEADERS, HELLO_BODY)
            self.send_goaway(sid, int(q("code", "0")))
            await self.drain()
        elif path == "/push":
            req.push_allowed = bool(self.conn.remote_settings.enable_push)
            pid = None
            if req.push_allowed:
                pid = self.conn.get_next_available_stream_id()
                self.conn.push_stream(sid, pid, [(":method", "GET"), (":scheme", req.scheme or "https"),
                                                 (":authority", req.authority or f"127.0.0.1:{self.origin.port}"),
                                                 (":path", PUSHED_PATH)])
                req.pushed_stream_id = pid
                await self.drain()
            await self.respond(req, 200, [("content-type", "text/plain")], PUSH_PARENT_BODY)
            if pid is not None:
                try:
                    await self.send_headers(pid, 200, [("content-type", "text/plain"),
                                                       ("content-length", str(len(PUSHED_BODY)))])
                    await self.send_body(pid, [PUSHED_BODY])
                except h2.exceptions.StreamClosedError:
                    pass  # the client refused the push (RST_STREAM): fine
                finally:
                    self.window_events.pop(pid, None)
        elif path == PUSHED_PATH:
            await self.respond(req, 200, [("content-type", "text/plain")], PUSHED_BODY)
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            if 100 <= status < 200 and status != 101:
                await self.send_headers(sid, status, [("x-interim", str(status))], req=req)
                await self.respond(req, 200, H2_HELLO_HEADERS, HELLO_BODY)
            else:
                await self.respond(req, status, [("content-type", "text/plain")], f"status {status}\n".encode())
        elif path == "/headers":
            await self.respond(req, 200, [("content-type", "application/json")],
                               json.dumps([list(h) for h in req.headers]).encode())
        elif path.lstrip("/") in ENCODED:
            enc = path.lstrip("/")
            await self.respond(req, 200, [("content-type", "text/plain; charset=utf-8"), ("content-encoding", enc),
                                          ("vary", "accept-encoding")], ENCODED[enc])
        else:
            await self.respond(req, 404, [("content-type", "text/plain")], b"no such route\n")


# --- the minimal HTTP/1.1 fallback ----------------------------------------------------------------------


async def _serve_h1(origin: "H2Origin", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    info: H2Conn) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError):
        return
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    method, target, version = (parts + ["", "", ""])[:3]
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    host = next((v for k, v in headers if k.lower() == "host"), None)
    req = H2Request(conn_id=info.conn_id, stream_id=0, alpn=info.alpn, method=method, scheme=None,
                    authority=host, target=target, headers=headers, http_version=version)
    origin._record(req)
    if head.startswith(_H2_PREFACE_LINE):
        status, reason, body = 505, "HTTP Version Not Supported", b"h2 was not negotiated with ALPN\n"
    else:
        cl = next((v for k, v in headers if k.lower() == "content-length"), None)
        if cl is not None and int(cl) > 0:
            req._body += await reader.readexactly(int(cl))
        req.ended = True
        status, reason, body = 200, "OK", H1_FALLBACK_BODY
    req.status = status
    out = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
           f"x-h2origin-fallback: {info.alpn or 'none'}\r\nContent-Length: {len(body)}\r\n"
           "Connection: close\r\n\r\n").encode("latin-1")
    writer.write(out + (b"" if method == "HEAD" else body))
    req.data_sent = len(body)
    await writer.drain()
    req.response_done = True


# --- the server -----------------------------------------------------------------------------------------


class H2Origin(RequestLog):
    """An HTTP/2 origin on 127.0.0.1:<ephemeral> (TLS with `serve`/`key`; plain h2c when they are None)."""

    def __init__(self, name: str = "h2", serve: Path | str | None = None, key: Path | str | None = None, *,
                 alpn=DEFAULT_ALPN, max_concurrent_streams: int | None = None,
                 initial_window_size: int | None = None, max_frame_size: int | None = None,
                 pages: dict | None = None):
        self.name = name
        # path -> (content type, body bytes or a function of the H2Request): served before the routes
        self.pages = dict(pages or {})
        self.alpn = tuple(alpn) if alpn else ()
        self.ssl_context = h2_server_context(serve, key, self.alpn) if serve is not None else None
        if self.ssl_context is not None:
            self.ssl_context.sni_callback = self._sni
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size   # our SETTINGS: the window for request bodies
        self.max_frame_size = max_frame_size
        RequestLog.__init__(self)
        self._conns: dict[int, H2Conn] = {}
        self._sni_names: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.connections = 0                 # TCP connections accepted
        self.tls_ok = 0                      # TLS handshakes completed
        self.tls_failures: list[str] = []    # TLS handshakes that failed
        self.errors: list[str] = []          # unexpected exceptions in the origin (its own bugs), with traceback
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._port: int | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> "H2Origin":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._main(ready))
            except BaseException as e:  # noqa: BLE001 - reported to start()
                failure.append(e)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"h2origin-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"h2origin {self.name} did not start: {failure[:1]}")
        return self

    async def _main(self, ready: threading.Event) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(128)
        lsock.setblocking(False)
        self._port = lsock.getsockname()[1]
        accept = loop.create_task(self._accept(lsock))
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            accept.cancel()
            lsock.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(accept, *self._tasks, return_exceptions=True)

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(lsock)
            task = loop.create_task(self._on_socket(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop already stopped
                pass
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "H2Origin":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._port is not None, "h2origin not started"
        return self._port

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url_for(self, host: str = "good.test") -> str:
        """A URL naming `host` (curl then needs ``--resolve host:port:127.0.0.1``, see resolve_args)."""
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def resolve_args(self, host: str = "good.test") -> list[str]:
        return ["--resolve", f"{host}:{self.port}:127.0.0.1"]

    def __repr__(self) -> str:
        return f"<H2Origin {self.name} {self.url if self._thread else '(stopped)'}>"

    # --- connections ------------------------------------------------------------------------------------

    def _sni(self, sslobj, server_name, ctx) -> None:
        if server_name is not None:
            self._sni_names[sslobj] = server_name
        return None

    async def _on_socket(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            self.connections += 1
            info = H2Conn(conn_id=self.connections)
            self._conns[info.conn_id] = info
        # The TLS handshake is done by connect_accepted_socket (a failure raises here, so it can be recorded;
        # StreamWriter.start_tls after the fact could lose a ClientHello the stream reader already buffered).
        reader = asyncio.StreamReader(limit=1 << 20)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock, ssl=self.ssl_context,
                                                              ssl_handshake_timeout=15 if self.tls else None)
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
            sock.close()
            info.closed = True
            if self.tls:
                with self._lock:
                    self.tls_failures.append(f"{type(e).__name__}: {e}")
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            if self.tls:
                sslobj = writer.get_extra_info("ssl_object")
                info.alpn = sslobj.selected_alpn_protocol()
                info.tls_version = sslobj.version()
                info.sni = self._sni_names.get(sslobj)
                with self._lock:
                    self.tls_ok += 1
                if info.alpn != "h2":
                    info.protocol = "http/1.1"
                    await _serve_h1(self, reader, writer, info)
                    return
            info.protocol = "h2"
            await _H2Session(self, reader, writer, info).serve()
        except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a bug in the origin itself: reported by the fixtures at teardown
            self._error(f"connection {info.conn_id}")
        finally:
            info.closed = True
            if self._stopping is not None and self._stopping.is_set():
                transport.abort()
            else:
                writer.close()
                try:
                    await asyncio.wait_for(writer.wait_closed(), 2)
                except (asyncio.TimeoutError, ConnectionError, ssl.SSLError, OSError):
                    transport.abort()

    # --- recording --------------------------------------------------------------------------------------

    def _error(self, where: str) -> None:
        with self._lock:
            self.errors.append(f"{where}:\n{traceback.format_exc()}")

    @property
    def conns(self) -> dict[int, H2Conn]:
        with self._lock:
            return dict(self._conns)

    def request(self, stream_id: int, conn_id: int | None = None) -> H2Request:
        found = [r for r in self.requests if r.stream_id == stream_id and conn_id in (None, r.conn_id)]
        if len(found) != 1:
            raise LookupError(f"{len(found)} requests with stream id {stream_id} (conn {conn_id})")
        return found[0]

    def wait_request(self, path: str, timeout: float = 10.0) -> H2Request:
        got = self.wait_requests(1, path=path, timeout=timeout)
        if not got:
            raise AssertionError(f"h2origin: no request for {path} within {timeout}s")
        return got[0]


# --- a small blocking HTTP/2 client for precise tests ----------------------------------------------------


@dataclass
class ClientStream:
    stream_id: int
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)       # the final response's headers
    informational: list[list[tuple[str, str]]] = field(default_factory=list)  # 1xx header blocks
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[str, str]] | None = None
    ended: bool = False
    reset_code: int | None = None
    pushed_from: int | None = None                                     # a pushed stream: its parent
    promised_headers: list[tuple[str, str]] | None = None              # a pushed stream: the promise

    @property
    def done(self) -> bool:
        return self.ended or self.reset_code is not None

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None


class H2Client:
    """Blocking HTTP/2 client over a connected TLS (or plain) socket. Not thread-safe.

    With ``auto_ack=False`` received DATA is never acknowledged: the server's windows only grow through
    `open_window()`, so a test decides exactly how much the server may send.
    """

    def __init__(self, sock: socket.socket, authority: str, *, enable_push: bool = True,
                 initial_window_size: int | None = None, auto_ack: bool = True, timeout: float = 10):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.authority = authority
        self.auto_ack = auto_ack
        self.conn = _graceful_connection(client_side=True)
        self.streams: dict[int, ClientStream] = {}
        self.events: list = []                       # every h2 event received, in order
        self.goaway: tuple[int, int] | None = None   # (error_code, last_stream_id)
        self.closed = False                          # the server closed the connection
        self.conn.initiate_connection()
        settings = {h2.settings.SettingCodes.ENABLE_PUSH: int(enable_push)}
        if initial_window_size is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = initial_window_size
        self.conn.update_settings(settings)  # a second SETTINGS frame, before any request
        self._flush()

    @classmethod
    def connect(cls, port: int, cafile: Path | str, *, host: str = "good.test", alpn=("h2",),
                timeout: float = 10, **kw) -> "H2Client":
        ctx = ssl.create_default_context(cafile=str(cafile))
        ctx.set_alpn_protocols(list(alpn))
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        if sock.selected_alpn_protocol() != "h2":
            sock.close()
            raise AssertionError(f"ALPN negotiated {sock.selected_alpn_protocol()!r}, not h2")
        return cls(sock, f"{host}:{port}", timeout=timeout, **kw)

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "H2Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests --

    def request(self, path: str, method: str = "GET", headers=(), body: bytes = b"", trailers=None, *,
                pseudo=None) -> int:
        """Open a stream; returns its id. `pseudo` replaces the default pseudo-headers (order kept)."""
        sid = self.conn.get_next_available_stream_id()
        if pseudo is None:
            pseudo = [(":method", method), (":scheme", "https"), (":authority", self.authority), (":path", path)]
        self.streams[sid] = ClientStream(sid)
        self.conn.send_headers(sid, [*pseudo, *headers], end_stream=not body and not trailers)
        self._flush()
        if body:
            view = memoryview(body)
            deadline = time.monotonic() + self.timeout
            while view:
                window = self.conn.local_flow_control_window(sid)
                if window <= 0:
                    if time.monotonic() > deadline or self.closed:
                        raise AssertionError(f"H2Client: no flow-control window to send stream {sid}'s body")
                    self.pump(0.2)
                    continue
                n = min(len(view), window, self.conn.max_outbound_frame_size)
                self.conn.send_data(sid, view[:n].tobytes())
                self._flush()
                view = view[n:]
            if not trailers:
                self.conn.end_stream(sid)
        if trailers:
            self.conn.send_headers(sid, list(trailers), end_stream=True)
        self._flush()
        return sid

    def get(self, path: str, timeout: float = 10, **kw) -> ClientStream:
        sid = self.request(path, **kw)
        return self.wait_stream(sid, timeout)

    def wait_stream(self, sid: int, timeout: float = 10) -> ClientStream:
        self.wait(lambda: self.streams[sid].done, timeout, f"stream {sid} to finish")
        return self.streams[sid]

    def reset(self, sid: int, code: int = 8) -> None:
        self.conn.reset_stream(sid, code)
        self._flush()

    def open_window(self, sid: int, n: int) -> None:
        """Send WINDOW_UPDATE(n) for the stream and for the connection."""
        self.conn.increment_flow_control_window(n, stream_id=sid)
        self.conn.increment_flow_control_window(n)
        self._flush()

    # -- receiving --

    def pump(self, timeout: float | None = None) -> bool:
        """Read once from the socket and process the frames; False when nothing came within `timeout`."""
        if self.closed:
            return False
        if timeout is not None:
            self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        for ev in self.conn.receive_data(data):
            self.events.append(ev)
            self._event(ev)
        self._flush()
        return True

    def wait(self, predicate, timeout: float = 10, what: str = "condition"):
        """Pump until `predicate()` is truthy; AssertionError at the deadline or if the server closed first."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"H2Client: timed out after {timeout}s waiting for {what}")
            if self.closed:
                raise AssertionError(f"H2Client: connection closed while waiting for {what}")
            self.pump(min(left, 0.2))

    def _stream(self, sid: int) -> ClientStream:
        return self.streams.setdefault(sid, ClientStream(sid))

    def _event(self, ev) -> None:
        if isinstance(ev, h2.events.InformationalResponseReceived):
            self._stream(ev.stream_id).informational.append(_dec(ev.headers))
        elif isinstance(ev, h2.events.ResponseReceived):
            s = self._stream(ev.stream_id)
            s.headers = _dec(ev.headers)
            s.status = int(dict(s.headers)[":status"])
        elif isinstance(ev, h2.events.DataReceived):
            self._stream(ev.stream_id).body += ev.data
            if self.auto_ack:
                try:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                except h2.exceptions.StreamClosedError:
                    pass
        elif isinstance(ev, h2.events.TrailersReceived):
            self._stream(ev.stream_id).trailers = _dec(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self._stream(ev.stream_id).ended = True
        elif isinstance(ev, h2.events.StreamReset):
            self._stream(ev.stream_id).reset_code = int(ev.error_code)
        elif isinstance(ev, h2.events.PushedStreamReceived):
            s = self._stream(ev.pushed_stream_id)
            s.pushed_from = ev.parent_stream_id
            s.promised_headers = _dec(ev.headers)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = (int(ev.error_code), ev.last_stream_id)


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture
def start_h2origin(pki):
    """Factory: ``start_h2origin(flavour="good", **kwargs)`` → a started H2Origin, stopped after the test."""
    started: list[H2Origin] = []

    def start(flavour: str | None = "good", **kwargs) -> H2Origin:
        if flavour is None:
            o = H2Origin("h2c", **kwargs)
        else:
            leaf = pki[flavour]
            o = H2Origin(f"h2-{flavour}", leaf.serve, leaf.key, **kwargs)
        started.append(o.start())
        return o

    yield start
    errors = []
    for o in started:
        o.stop()
        errors += o.errors
    if errors:
        pytest.fail("h2origin raised:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def h2origin(start_h2origin) -> H2Origin:
    """A started HTTP/2 origin with the "good" certificate and ALPN ["h2", "http/1.1"]."""
    return start_h2origin()
