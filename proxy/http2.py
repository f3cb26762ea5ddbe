"""HTTP/2 relay logic, sans-IO: two `h2` connections joined stream by stream.

    client ──h2──▶ [down: H2Connection(server side)] ─┐          ┌─ [up: H2Connection(client side)] ──h2──▶ origin
                                                      └ H2Bridge ┘
Fed bytes with `client_data()` / `server_data()`, the bridge returns nothing: what must be sent is
taken with `to_client()` / `to_server()`, and every finished stream is handed to `emit` as one Flow
(the HTTP/1 record plus `stream_id`). No sockets, no awaiting, no clock of its own.

Rules it keeps (RFC 9113):
- Each client stream is one origin stream; request and response headers go on unchanged (names,
  values and order as received; HTTP/2 names are lower case on the wire), trailers too.
- Flow control end to end: DATA received from one side is acknowledged (its window reopened) only
  once it has been handed to the other side within that side's window. A slow reader therefore stops
  the writer through the protocol's own windows, and what the proxy holds per stream is bounded by
  the window it advertises (`STREAM_WINDOW`), whatever the body's size.
- RST_STREAM goes on to the other side with the same code; a GOAWAY from the origin refuses the
  streams it did not process (REFUSED_STREAM: the client may retry them) and is passed on as a
  GOAWAY; the origin is never allowed to push (SETTINGS_ENABLE_PUSH = 0).
- When the origin allows fewer concurrent streams than the client opens, requests wait in order.
- An error before the response started becomes an HTTP response (status from errors.py) on that
  stream, after that a reset; either way the flow carries the error record.
"""

from __future__ import annotations

import collections
from typing import Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PushedStreamReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset as H2StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from .errors import BadRequest, ClientError, ProxyError, StreamReset, UpstreamProtocolError
from .flow import Flow, Request, Response

__all__ = ["H2Bridge", "STREAM_WINDOW", "CONNECTION_WINDOW", "MAX_CONCURRENT_STREAMS"]

STREAM_WINDOW = 1 << 18  # what either peer may send us per stream before we pass it on (256 KiB)
MAX_CONCURRENT_STREAMS = 100  # advertised to the client (RFC 9113 §6.5.2 recommends at least 100)
# The connection window covers every stream's window at once: a stream whose reader stalls holds at
# most STREAM_WINDOW of it, so it can never starve the other streams (no head-of-line blocking).
CONNECTION_WINDOW = STREAM_WINDOW * MAX_CONCURRENT_STREAMS
_CODE_NAMES = {int(c): c.name for c in ErrorCodes}


def _code_name(code) -> str:
    return _CODE_NAMES.get(int(code), f"0x{int(code):x}") if code is not None else "unknown"


class _Connection(H2Connection):
    """h2's connection, except that a GOAWAY received does not end it at once. RFC 9113 §6.8: the
    streams up to the GOAWAY's last_stream_id are still answered (an origin such as nginx sends a
    graceful GOAWAY after its 1000th request, with responses still on the way), but h2 moves to CLOSED
    on any GOAWAY and would refuse their frames. The bridge itself opens no new stream afterwards."""

    def _receive_goaway_frame(self, frame):
        event = ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _config(client_side: bool) -> H2Configuration:
    # Inbound headers are validated (malformed messages never reach the other side) but not
    # normalised, and outbound ones go out as they came: what is relayed and logged is the wire.
    return H2Configuration(client_side=client_side, header_encoding=None, validate_inbound_headers=True,
                           normalize_inbound_headers=False, validate_outbound_headers=False,
                           normalize_outbound_headers=False, split_outbound_cookies=False)


class _Pending:
    """Bytes for one direction of one stream that the receiver's window did not take yet."""

    __slots__ = ("chunks", "size", "end", "trailers")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.end = False  # END_STREAM is due once the chunks are out
        self.trailers: list | None = None  # ... carried by these trailers


class _Stream:
    __slots__ = ("cid", "sid", "origin", "flow", "t0", "request_headers", "request_end", "to_server", "to_client",
                 "request_done", "response_done", "response_started", "finished", "body_sent")

    def __init__(self, cid: int, flow: Flow, t0: float) -> None:
        self.cid = cid  # the client's stream id
        self.sid: int | None = None  # the origin's, once the request went out
        self.origin: _Origin | None = None  # ... on this origin connection
        self.body_sent = False  # request DATA went to the origin (a refused stream can then not be replayed)
        self.flow = flow
        self.t0 = t0
        self.request_headers: list | None = None
        self.request_end = False  # the request had no body (END_STREAM on its HEADERS)
        self.to_server = _Pending()
        self.to_client = _Pending()
        self.request_done = False  # END_STREAM sent to the origin
        self.response_done = False  # END_STREAM sent to the client
        self.response_started = False  # the final response's HEADERS went to the client
        self.finished = False


class _Origin:
    """One HTTP/2 connection to the origin. A graceful GOAWAY from it retires it: its remaining streams
    finish on it while new ones go to a fresh connection that the shell opens (`wants_origin`)."""

    __slots__ = ("conn", "out", "by_sid", "gone", "dead", "retired", "tls")

    def __init__(self) -> None:
        self.conn = _Connection(_config(True))
        self.out = bytearray()  # output taken from h2 early, to put a graceful GOAWAY after it
        self.by_sid: dict[int, _Stream] = {}
        self.gone = False  # no new streams on it (its GOAWAY, or ours)
        self.dead = False  # closed or broken: nothing more to read or send
        self.retired = False  # gone and drained: the shell closes its socket
        self.tls = None  # the TLS facts of its connection, for the flows sent on it (set by the shell)

    def start(self, max_header_list_size: int) -> None:
        self.conn.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,  # server push is refused (issue #7)
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def room(self) -> bool:
        c = self.conn
        return not (self.gone or self.dead) and c.open_outbound_streams < c.remote_settings.max_concurrent_streams


class H2Bridge:
    """One client HTTP/2 connection relayed onto HTTP/2 connections to the origin (one at a time; a
    new one when the origin retires the current with GOAWAY, invisibly to the client)."""

    def __init__(self, *, new_flow: Callable[[int], Flow], emit: Callable[[Flow], None],
                 clock: Callable[[], float], wall: Callable[[], float], host: str, port: int,
                 body_capture_limit: int = 1 << 20, max_header_list_size: int = 65536,
                 response_started: Callable[[Flow], None] | None = None) -> None:
        self.new_flow = new_flow  # stream id -> a Flow with the connection's facts (TLS, client, mode)
        self.emit = emit
        self.clock, self.wall = clock, wall
        self.host, self.port = host, port
        self.cap = body_capture_limit
        self.response_started_cb = response_started
        self.down = _Connection(_config(False))
        self.origin: _Origin | None = _Origin()  # where new requests go; None until the shell opens one
        self.origins: list[_Origin] = [self.origin]  # every origin connection not yet retired
        self._out_down = bytearray()  # output taken from h2 early, to put a graceful GOAWAY after it
        self.by_cid: dict[int, _Stream] = {}
        self.waiting: collections.deque[_Stream] = collections.deque()  # no origin room (limit, reconnecting)
        self.client_gone = False  # no new streams from the client (GOAWAY either way, EOF, protocol error)
        self.client_dead = False  # the client connection is over (EOF, protocol error): nothing more to read or send
        self.closed = False  # both connections are finished: the shell closes the sockets
        self.max_client_stream = 0
        self._max_header_list_size = max_header_list_size

    # --- setup ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Queue both connection prefaces (SETTINGS, window increments)."""
        self.down.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: self._max_header_list_size,
        })
        self.down.initiate_connection()
        self.down.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.origin.start(self._max_header_list_size)

    @property
    def up(self) -> _Connection | None:
        """The current origin connection's h2 state (None while a new one is being opened)."""
        return self.origin.conn if self.origin is not None else None

    @property
    def wants_origin(self) -> bool:
        """Requests wait and no origin connection takes new streams: the shell should open one."""
        return bool(self.waiting) and self.origin is None and not self.client_dead

    def add_origin(self) -> _Origin:
        """The shell opened a new origin connection (after a GOAWAY): new and waiting requests go there."""
        o = _Origin()
        o.start(self._max_header_list_size)
        self.origin = o
        self.origins.append(o)
        self._after()
        return o

    def origin_failed(self, err: ProxyError) -> None:
        """The new origin connection could not be opened: the waiting requests get the error."""
        for st in list(self.waiting):
            self._fail(st, err)
        self._after()

    # --- bytes in / out -------------------------------------------------------------------------

    def to_client(self) -> bytes:
        if self._out_down:
            out = bytes(self._out_down) + self.down.data_to_send()
            self._out_down.clear()
            return out
        return self.down.data_to_send()

    def to_server(self, origin: _Origin | None = None) -> bytes:
        o = origin or self.origin
        if o is None:
            return b""
        if o.out:
            out = bytes(o.out) + o.conn.data_to_send()
            o.out.clear()
            return out
        return o.conn.data_to_send()

    def _graceful_goaway(self, conn: H2Connection, buf: bytearray, last_stream_id: int) -> None:
        """GOAWAY(NO_ERROR) without closing h2's state: the streams up to last_stream_id still finish
        (h2's close_connection() would refuse every frame after it)."""
        buf += conn.data_to_send()
        buf += GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0).serialize()

    @property
    def idle(self) -> bool:
        """No stream is open: the shell may apply its idle timeout."""
        return not self.by_cid

    def client_data(self, data: bytes) -> None:
        if self.client_dead:
            return
        try:
            events = self.down.receive_data(data)
        except ProtocolError as e:
            self._client_broke(f"the client broke the HTTP/2 protocol: {e}")
            return
        for event in events:
            self._client_event(event)
        self._after()

    def server_data(self, data: bytes, origin: _Origin | None = None) -> None:
        o = origin or self.origin
        if o is None or o.dead:
            return
        try:
            events = o.conn.receive_data(data)
        except ProtocolError as e:
            self._server_broke(f"the origin broke the HTTP/2 protocol: {e}", o)
            return
        for event in events:
            self._server_event(event, o)
        self._after()

    def client_eof(self, why: str = "the client closed the connection") -> None:
        if not self.client_dead:
            self.client_gone = self.client_dead = True
            for st in list(self.by_cid.values()):
                self._fail(st, ClientError(f"{why} before the stream ended"), reset_client=False)
            self._goaway_server()
        self._after()

    def server_eof(self, why: str = "the origin closed the connection", origin: _Origin | None = None) -> None:
        o = origin or self.origin
        if o is not None and not o.dead:
            self._origin_down(o, UpstreamProtocolError(f"{why} before the response ended"))
        self._after()

    def _origin_down(self, o: _Origin, err: ProxyError) -> None:
        o.gone = o.dead = True
        if o is self.origin:
            self.origin = None  # the next request opens a new connection
        for st in list(o.by_sid.values()):
            self._fail(st, err, reset_server=False)

    def close_idle(self) -> None:
        """No stream for the idle timeout: GOAWAY both ways, then the shell closes."""
        self._goaway_client()
        self._goaway_server()
        self._after()

    def abandon(self, why: str = "the proxy stopped relaying this connection") -> None:
        """The shell is giving up (cancelled, shutting down): every open stream gets its record."""
        for st in list(self.by_cid.values()):
            if not st.finished:
                st.finished = True
                self._forget(st)
                st.flow.error = ProxyError(why).to_record()
                st.flow.timing.total_ms = (self.clock() - st.t0) * 1000
                self.emit(st.flow)
        self.closed = True

    # --- the client's events ---------------------------------------------------------------------

    def _client_event(self, event) -> None:
        if isinstance(event, DataReceived):
            st = self.by_cid.get(event.stream_id)
            if self._received(self.down, event, st):
                st.flow.request.body.feed(event.data, self.cap)
                self._queue(st.to_server, event)
                self._flush_to_server(st)
        elif isinstance(event, RequestReceived):
            self._request(event)
        elif isinstance(event, TrailersReceived):
            st = self.by_cid.get(event.stream_id)
            if st is not None:
                st.flow.request.trailers = list(event.headers)
                st.to_server.trailers = list(event.headers)
                st.to_server.end = True
                self._flush_to_server(st)
        elif isinstance(event, StreamEnded):
            st = self.by_cid.get(event.stream_id)
            if st is not None and not st.to_server.end:
                st.to_server.end = True
                self._flush_to_server(st)
        elif isinstance(event, (WindowUpdated, RemoteSettingsChanged)):
            self._reopened(event, self.by_cid, self._flush_to_client)
        elif isinstance(event, H2StreamReset):
            st = self.by_cid.get(event.stream_id)
            if st is not None:
                code = int(event.error_code)
                self._fail(st, StreamReset(f"the client reset the stream ({_code_name(code)})", "client", code),
                           reset_client=False, server_code=code)
        elif isinstance(event, ConnectionTerminated):
            # The client opens no new streams (its last_stream_id is about server pushes, which we never
            # make); open streams may finish unless it gave an error code.
            self.client_gone = True
            if event.error_code:
                for st in list(self.by_cid.values()):
                    self._fail(st, StreamReset(f"the client closed the connection with GOAWAY "
                                               f"({_code_name(event.error_code)})", "client",
                                               int(event.error_code)), reset_client=False)
            self._goaway_server()

    def _request(self, event: RequestReceived) -> None:
        cid = event.stream_id
        self.max_client_stream = max(self.max_client_stream, cid)
        flow = self.new_flow(cid)
        flow.timing.start = self.wall()
        st = _Stream(cid, flow, self.clock())
        self.by_cid[cid] = st
        pseudo = {}
        regular = []
        for k, v in event.headers:
            if k[:1] == b":":
                pseudo[k] = v
            else:
                regular.append((k, v))
        method = pseudo.get(b":method", b"").decode("latin-1")
        authority = pseudo.get(b":authority") or next((v for k, v in regular if k == b"host"), b"")
        scheme = pseudo.get(b":scheme", b"https").decode("latin-1")
        if authority:  # the URL a person expects is the one the client asked for (as with Host in HTTP/1)
            host, port = _authority(authority.decode("latin-1"), self.host, 80 if scheme == "http" else 443)
        else:
            host, port = self.host, self.port
        flow.request = Request(method=method, http_version="2", headers=regular, scheme=scheme, host=host, port=port,
                               target=pseudo.get(b":path", b"").decode("latin-1") or (authority.decode("latin-1")))
        if method == "CONNECT":  # RFC 8441 extended CONNECT is not offered; plain CONNECT is a proxy's job
            self._fail(st, BadRequest("CONNECT inside a tunnel is not supported"))
            return
        st.request_headers = list(event.headers)
        st.request_end = event.stream_ended is not None
        if event.stream_ended is not None:
            st.to_server.end = True
        if self.waiting or not self._room_upstream():
            self.waiting.append(st)
            return
        self._send_request(st)

    def _room_upstream(self) -> bool:
        return self.origin is not None and self.origin.room()

    def _send_request(self, st: _Stream) -> None:
        o = self.origin
        sid = o.conn.get_next_available_stream_id()
        st.sid, st.origin = sid, o
        o.by_sid[sid] = st
        if o.tls is not None:
            st.flow.tls.upstream = o.tls
        pend = st.to_server
        end = pend.end and not pend.chunks and pend.trailers is None
        try:
            o.conn.send_headers(sid, st.request_headers, end_stream=end)
        except H2Error as e:
            self._fail(st, UpstreamProtocolError(f"cannot send the request to the origin over HTTP/2: {e}"))
            return
        if end:
            st.to_server.end = False
            st.request_done = True
            st.flow.timing.request_sent_ms = (self.clock() - st.t0) * 1000
        else:
            self._flush_to_server(st)

    # --- the origin's events ---------------------------------------------------------------------

    def _server_event(self, event, o: _Origin) -> None:
        if isinstance(event, DataReceived):
            st = o.by_sid.get(event.stream_id)
            if self._received(o.conn, event, st):
                st.flow.response.body.feed(event.data, self.cap)
                self._queue(st.to_client, event)
                self._flush_to_client(st)
        elif isinstance(event, ResponseReceived):
            st = o.by_sid.get(event.stream_id)
            if st is None:
                return
            if st.flow.timing.first_byte_ms is None:
                st.flow.timing.first_byte_ms = (self.clock() - st.t0) * 1000
            status = next((v for k, v in event.headers if k == b":status"), b"0")
            st.flow.response = Response(status=int(status), reason="", http_version="2",
                                        headers=[(k, v) for k, v in event.headers if k[:1] != b":"])
            end = event.stream_ended is not None
            self.down.send_headers(st.cid, event.headers, end_stream=end)
            st.response_started = True
            if end:
                st.response_done = True
                self._maybe_finish(st)
            elif self.response_started_cb is not None:
                self.response_started_cb(st.flow)
        elif isinstance(event, InformationalResponseReceived):
            st = o.by_sid.get(event.stream_id)
            if st is not None:
                if st.flow.timing.first_byte_ms is None:
                    st.flow.timing.first_byte_ms = (self.clock() - st.t0) * 1000
                self.down.send_headers(st.cid, event.headers)
        elif isinstance(event, TrailersReceived):
            st = o.by_sid.get(event.stream_id)
            if st is not None:
                st.flow.response.trailers = list(event.headers)
                st.to_client.trailers = list(event.headers)
                st.to_client.end = True
                self._flush_to_client(st)
        elif isinstance(event, StreamEnded):
            st = o.by_sid.get(event.stream_id)
            if st is not None and not st.to_client.end and not st.response_done:
                st.to_client.end = True
                self._flush_to_client(st)
        elif isinstance(event, (WindowUpdated, RemoteSettingsChanged)):
            self._reopened(event, o.by_sid, self._flush_to_server)
        elif isinstance(event, H2StreamReset):
            st = o.by_sid.get(event.stream_id)
            if st is not None and st.response_done and not event.error_code:
                # RFC 9113 §8.1: a complete response, then "stop sending the request" (NO_ERROR).
                st.request_done = True
                with _suppress_h2():
                    self.down.reset_stream(st.cid, ErrorCodes.NO_ERROR)
                self._maybe_finish(st)
            elif st is not None:
                code = int(event.error_code)
                self._fail(st, StreamReset(f"the origin reset the stream ({_code_name(code)})", "upstream", code),
                           reset_server=False, client_code=code)
        elif isinstance(event, PushedStreamReceived):  # cannot happen with ENABLE_PUSH = 0 (h2 refuses it)
            o.conn.reset_stream(event.pushed_stream_id, ErrorCodes.REFUSED_STREAM)
        elif isinstance(event, ConnectionTerminated):
            # The origin retires this connection: no new streams on it. Streams it did not process go
            # again on a new connection when nothing of their body was sent yet (RFC 9113 §8.7: safe to
            # retry), else the client gets REFUSED_STREAM; the client's own connection goes on.
            o.gone = True
            if o is self.origin:
                self.origin = None
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for st in sorted(o.by_sid.values(), key=lambda x: -x.sid):
                if st.sid > last:
                    if not st.body_sent and not st.response_started and not self.client_dead:
                        o.by_sid.pop(st.sid, None)
                        st.sid = st.origin = None
                        if st.request_done:  # its end went out too: send it again with the request
                            st.request_done = False
                            st.to_server.end = True
                        self.waiting.appendleft(st)  # in their order, before the newer ones
                    else:
                        self._fail(st, StreamReset("the origin did not process the stream (GOAWAY): retry it",
                                                   "upstream", int(ErrorCodes.REFUSED_STREAM)),
                                   reset_server=False, client_code=int(ErrorCodes.REFUSED_STREAM))
                elif event.error_code:
                    self._fail(st, StreamReset(f"the origin closed the connection with GOAWAY "
                                               f"({_code_name(event.error_code)})", "upstream",
                                               int(event.error_code)), reset_server=False)

    # --- moving data within the windows ---------------------------------------------------------

    @staticmethod
    def _received(conn: H2Connection, event: DataReceived, st: _Stream | None) -> bool:
        """DATA from the peer of `conn`: padding is acknowledged at once, and so is the data of a
        stream that already ended here (st None). True when `st` should take the data."""
        padding = event.flow_controlled_length - len(event.data)
        if padding:
            conn.acknowledge_received_data(padding, event.stream_id)
        if st is None:
            if event.data:
                conn.acknowledge_received_data(len(event.data), event.stream_id)
            return False
        return True

    @staticmethod
    def _queue(pend: _Pending, event: DataReceived) -> None:
        """Keep the data for the other side until its window takes it (acknowledged then)."""
        if event.data:
            pend.chunks.append(event.data)
            pend.size += len(event.data)
        if event.stream_ended is not None:
            pend.end = True

    @staticmethod
    def _reopened(event, streams: dict, flush) -> None:
        """A WINDOW_UPDATE or a new INITIAL_WINDOW_SIZE from one peer: what waited for its window goes on."""
        if isinstance(event, WindowUpdated) and event.stream_id:
            st = streams.get(event.stream_id)
            if st is not None:
                flush(st)
        elif isinstance(event, WindowUpdated) or SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            for st in list(streams.values()):
                flush(st)

    def _flush_to_server(self, st: _Stream) -> None:
        if st.sid is None or st.request_done or st.finished:
            return
        pend = st.to_server
        conn = st.origin.conn
        if pend.chunks:
            st.body_sent = True
            if not self._push(conn, st.sid, pend, self.down, st.cid):
                return
        if pend.end:
            if pend.trailers is not None:
                conn.send_headers(st.sid, pend.trailers, end_stream=True)
            else:
                conn.end_stream(st.sid)
            pend.end = False
            st.request_done = True
            st.flow.timing.request_sent_ms = (self.clock() - st.t0) * 1000
            self._maybe_finish(st)

    def _flush_to_client(self, st: _Stream) -> None:
        if st.response_done or st.finished or not st.response_started:
            return
        pend = st.to_client
        if pend.chunks and not self._push(self.down, st.cid, pend, st.origin.conn, st.sid):
            return
        if pend.end:
            if pend.trailers is not None:
                self.down.send_headers(st.cid, pend.trailers, end_stream=True)
            else:
                self.down.end_stream(st.cid)
            pend.end = False
            st.response_done = True
            self._maybe_finish(st)

    @staticmethod
    def _push(dst: H2Connection, dst_id: int, pend: _Pending, src: H2Connection, src_id: int | None) -> bool:
        """Send what `dst`'s windows allow; acknowledge it to `src` (reopening its window). True when
        everything went."""
        limit = dst.max_outbound_frame_size
        while pend.chunks:
            room = min(dst.local_flow_control_window(dst_id), limit)
            if room <= 0:
                return False
            data = pend.chunks[0]
            if len(data) > room:
                pend.chunks[0] = data[room:]
                data = data[:room]
            else:
                pend.chunks.popleft()
            dst.send_data(dst_id, data)
            pend.size -= len(data)
            if src_id is not None:
                src.acknowledge_received_data(len(data), src_id)
        return True

    # --- endings ---------------------------------------------------------------------------------

    def _maybe_finish(self, st: _Stream) -> None:
        if st.request_done and st.response_done and not st.finished:
            st.finished = True
            self._forget(st)
            st.flow.timing.total_ms = (self.clock() - st.t0) * 1000
            self.emit(st.flow)

    def _forget(self, st: _Stream) -> None:
        self.by_cid.pop(st.cid, None)
        if st.sid is not None and st.origin is not None:
            st.origin.by_sid.pop(st.sid, None)
        with _suppress_h2():
            self.waiting.remove(st)

    def _fail(self, st: _Stream, err: ProxyError, *, reset_client: bool = True, reset_server: bool = True,
              client_code: int | None = None, server_code: int | None = None) -> None:
        """End one stream with an error: a response if none started yet (and the client is still
        there), else a reset; the origin's stream is cancelled; the flow records the error."""
        if st.finished:
            return
        st.finished = True
        self._forget(st)
        o = st.origin
        if reset_server and st.sid is not None and o is not None and not o.dead:
            with _suppress_h2():
                o.conn.reset_stream(st.sid, server_code if server_code is not None else ErrorCodes.CANCEL)
        # Whatever the origin already sent us on this stream will not be passed on: reopen its window.
        if st.sid is not None and st.to_client.size and o is not None and not o.dead:
            with _suppress_h2():
                o.conn.acknowledge_received_data(st.to_client.size, st.sid)
        if st.to_server.size and not self.client_dead:
            with _suppress_h2():
                self.down.acknowledge_received_data(st.to_server.size, st.cid)
        if reset_client and not self.client_dead:
            if client_code is None and not st.response_started and not isinstance(err, StreamReset):
                body = f"httpsdump: {err.message}\n".encode("utf-8")
                with _suppress_h2():
                    self.down.send_headers(st.cid, [(b":status", str(err.status).encode()),
                                                    (b"content-type", b"text/plain; charset=utf-8"),
                                                    (b"content-length", str(len(body)).encode())])
                    if len(body) <= self.down.local_flow_control_window(st.cid):
                        self.down.send_data(st.cid, body, end_stream=True)
                    else:
                        self.down.reset_stream(st.cid, ErrorCodes.INTERNAL_ERROR)
            else:
                code = client_code if client_code is not None else (
                    err.code if isinstance(err, StreamReset) else int(ErrorCodes.INTERNAL_ERROR))
                with _suppress_h2():
                    self.down.reset_stream(st.cid, code)
        flow = st.flow
        flow.error = err.to_record()
        flow.timing.total_ms = (self.clock() - st.t0) * 1000
        self.emit(flow)

    def _client_broke(self, message: str) -> None:
        self.client_gone = self.client_dead = True  # h2 has already queued its GOAWAY (PROTOCOL_ERROR or the error's code)
        err = ClientError(message)
        if not self.by_cid:  # nothing in flight: the connection itself gets the record
            flow = self.new_flow(0)
            flow.stream_id = None
            flow.timing.start = self.wall()
            flow.error = err.to_record()
            self.emit(flow)
        for st in list(self.by_cid.values()):
            self._fail(st, err, reset_client=False)
        self._goaway_server()
        self._after()

    def _server_broke(self, message: str, o: _Origin) -> None:
        self._origin_down(o, UpstreamProtocolError(message))  # h2 has already queued its GOAWAY
        self._after()

    def _goaway_client(self) -> None:
        if not self.client_gone:
            self.client_gone = True  # no new streams are accepted: the client opens a new connection
            if not self.client_dead:
                self._graceful_goaway(self.down, self._out_down, self.max_client_stream)

    def _goaway_server(self) -> None:
        """We open no new streams: a graceful GOAWAY to every origin connection (last id 0: we accept
        no pushed streams)."""
        for o in self.origins:
            self._retire(o)
        if self.origin is not None:
            self.origin = None

    def _retire(self, o: _Origin) -> None:
        if not o.gone:
            o.gone = True
            if not o.dead:
                self._graceful_goaway(o.conn, o.out, 0)

    def _after(self) -> None:
        while self.waiting and self._room_upstream():
            self._send_request(self.waiting.popleft())
        for o in self.origins:  # drained connections that the origin (or we) retired: the shell closes them
            if o.gone and not o.by_sid and o is not self.origin and not o.retired:
                self._retire(o)
                o.retired = True
        if self.client_gone and not self.by_cid:
            self._goaway_client()
            self._goaway_server()
            self.closed = True


class _suppress_h2:
    """h2 refuses frames on streams or connections that just closed; those races are harmless here."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        return typ is not None and issubclass(typ, (H2Error, ValueError, KeyError))


def _authority(authority: str, default_host: str, default_port: int) -> tuple[str, int]:
    if not authority:
        return default_host, default_port
    host, sep, port = authority.rpartition(":")
    if not sep or "]" in port or not port.isdigit():
        host, port = authority, ""
    host = host.strip("[]").lower() or default_host
    return host, int(port) if port else default_port
