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
    __slots__ = ("cid", "sid", "flow", "t0", "request_headers", "request_end", "to_server", "to_client",
                 "request_done", "response_done", "response_started", "finished")

    def __init__(self, cid: int, flow: Flow, t0: float) -> None:
        self.cid = cid  # the client's stream id
        self.sid: int | None = None  # the origin's, once the request went out
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


class H2Bridge:
    """One client HTTP/2 connection relayed onto one origin HTTP/2 connection."""

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
        self.down = H2Connection(_config(False))
        self.up = H2Connection(_config(True))
        self.by_cid: dict[int, _Stream] = {}
        self.by_sid: dict[int, _Stream] = {}
        self.waiting: collections.deque[_Stream] = collections.deque()  # over the origin's stream limit
        self.client_gone = False  # the client sent GOAWAY, closed or broke the protocol
        self.server_gone = False  # the same for the origin
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
        self.up.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,  # server push is refused (issue #7)
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: self._max_header_list_size,
        })
        self.down.initiate_connection()
        self.up.initiate_connection()
        for conn in (self.down, self.up):
            conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    # --- bytes in / out -------------------------------------------------------------------------

    def to_client(self) -> bytes:
        return self.down.data_to_send()

    def to_server(self) -> bytes:
        return self.up.data_to_send()

    @property
    def idle(self) -> bool:
        """No stream is open: the shell may apply its idle timeout."""
        return not self.by_cid

    def client_data(self, data: bytes) -> None:
        if self.client_gone:
            return
        try:
            events = self.down.receive_data(data)
        except ProtocolError as e:
            self._client_broke(f"the client broke the HTTP/2 protocol: {e}")
            return
        for event in events:
            self._client_event(event)
        self._after()

    def server_data(self, data: bytes) -> None:
        if self.server_gone:
            return
        try:
            events = self.up.receive_data(data)
        except ProtocolError as e:
            self._server_broke(f"the origin broke the HTTP/2 protocol: {e}")
            return
        for event in events:
            self._server_event(event)
        self._after()

    def client_eof(self, why: str = "the client closed the connection") -> None:
        if not self.client_gone:
            self.client_gone = True
            for st in list(self.by_cid.values()):
                self._fail(st, ClientError(f"{why} before the stream ended"), reset_client=False)
            self._goaway_server()
        self._after()

    def server_eof(self, why: str = "the origin closed the connection") -> None:
        if not self.server_gone:
            self.server_gone = True
            for st in list(self.by_cid.values()):
                self._fail(st, UpstreamProtocolError(f"{why} before the response ended"), reset_server=False)
            self._goaway_client()
        self._after()

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
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.down.acknowledge_received_data(padding, event.stream_id)
            if st is None:  # a stream we already failed: give the window back, drop the bytes
                if event.data:
                    self.down.acknowledge_received_data(len(event.data), event.stream_id)
                return
            if event.data:
                st.flow.request.body.feed(event.data, self.cap)
                st.to_server.chunks.append(event.data)
                st.to_server.size += len(event.data)
            if event.stream_ended is not None:
                st.to_server.end = True
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
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for st in list(self.by_cid.values()):
                    self._flush_to_client(st)
            else:
                st = self.by_cid.get(event.stream_id)
                if st is not None:
                    self._flush_to_client(st)
        elif isinstance(event, RemoteSettingsChanged):
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for st in list(self.by_cid.values()):
                    self._flush_to_client(st)
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
        if self.server_gone:
            self._fail(st, StreamReset("the origin's connection is closing (GOAWAY): retry on a new connection",
                                       "upstream", int(ErrorCodes.REFUSED_STREAM)))
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
        return self.up.open_outbound_streams < self.up.remote_settings.max_concurrent_streams

    def _send_request(self, st: _Stream) -> None:
        sid = self.up.get_next_available_stream_id()
        st.sid = sid
        self.by_sid[sid] = st
        end = st.request_end and not st.to_server.chunks
        try:
            self.up.send_headers(sid, st.request_headers, end_stream=end)
        except H2Error as e:
            self._fail(st, UpstreamProtocolError(f"cannot send the request to the origin over HTTP/2: {e}"))
            return
        st.request_headers = None
        if end:
            st.to_server.end = False
            st.request_done = True
            st.flow.timing.request_sent_ms = (self.clock() - st.t0) * 1000
        else:
            self._flush_to_server(st)

    # --- the origin's events ---------------------------------------------------------------------

    def _server_event(self, event) -> None:
        if isinstance(event, DataReceived):
            st = self.by_sid.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.up.acknowledge_received_data(padding, event.stream_id)
            if st is None:
                if event.data:
                    self.up.acknowledge_received_data(len(event.data), event.stream_id)
                return
            if event.data:
                st.flow.response.body.feed(event.data, self.cap)
                st.to_client.chunks.append(event.data)
                st.to_client.size += len(event.data)
            if event.stream_ended is not None:
                st.to_client.end = True
            self._flush_to_client(st)
        elif isinstance(event, ResponseReceived):
            st = self.by_sid.get(event.stream_id)
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
            st = self.by_sid.get(event.stream_id)
            if st is not None:
                if st.flow.timing.first_byte_ms is None:
                    st.flow.timing.first_byte_ms = (self.clock() - st.t0) * 1000
                self.down.send_headers(st.cid, event.headers)
        elif isinstance(event, TrailersReceived):
            st = self.by_sid.get(event.stream_id)
            if st is not None:
                st.flow.response.trailers = list(event.headers)
                st.to_client.trailers = list(event.headers)
                st.to_client.end = True
                self._flush_to_client(st)
        elif isinstance(event, StreamEnded):
            st = self.by_sid.get(event.stream_id)
            if st is not None and not st.to_client.end and not st.response_done:
                st.to_client.end = True
                self._flush_to_client(st)
        elif isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for st in list(self.by_sid.values()):
                    self._flush_to_server(st)
            else:
                st = self.by_sid.get(event.stream_id)
                if st is not None:
                    self._flush_to_server(st)
        elif isinstance(event, RemoteSettingsChanged):
            if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for st in list(self.by_sid.values()):
                    self._flush_to_server(st)
        elif isinstance(event, H2StreamReset):
            st = self.by_sid.get(event.stream_id)
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
            self.up.reset_stream(event.pushed_stream_id, ErrorCodes.REFUSED_STREAM)
        elif isinstance(event, ConnectionTerminated):
            self.server_gone = True
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for st in list(self.by_cid.values()):
                if st.sid is None or st.sid > last:  # never processed by the origin: safe to retry
                    self._fail(st, StreamReset("the origin did not process the stream (GOAWAY): retry it",
                                               "upstream", int(ErrorCodes.REFUSED_STREAM)),
                               reset_server=False, client_code=int(ErrorCodes.REFUSED_STREAM))
                elif event.error_code:
                    self._fail(st, StreamReset(f"the origin closed the connection with GOAWAY "
                                               f"({_code_name(event.error_code)})", "upstream",
                                               int(event.error_code)), reset_server=False)
            self._goaway_client()

    # --- moving data within the windows ---------------------------------------------------------

    def _flush_to_server(self, st: _Stream) -> None:
        if st.sid is None or st.request_done or st.finished:
            return
        pend = st.to_server
        if pend.chunks and not self._push(self.up, st.sid, pend, self.down, st.cid):
            return
        if pend.end:
            if pend.trailers is not None:
                self.up.send_headers(st.sid, pend.trailers, end_stream=True)
            else:
                self.up.end_stream(st.sid)
            pend.end = False
            st.request_done = True
            st.flow.timing.request_sent_ms = (self.clock() - st.t0) * 1000
            self._maybe_finish(st)

    def _flush_to_client(self, st: _Stream) -> None:
        if st.response_done or st.finished or not st.response_started:
            return
        pend = st.to_client
        if pend.chunks and not self._push(self.down, st.cid, pend, self.up, st.sid):
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
        if st.sid is not None:
            self.by_sid.pop(st.sid, None)
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
        if reset_server and st.sid is not None and not self.server_gone:
            with _suppress_h2():
                self.up.reset_stream(st.sid, server_code if server_code is not None else ErrorCodes.CANCEL)
        # Whatever the origin already sent us on this stream will not be passed on: reopen its window.
        if st.sid is not None and st.to_client.size and not self.server_gone:
            with _suppress_h2():
                self.up.acknowledge_received_data(st.to_client.size, st.sid)
        if st.to_server.size and not self.client_gone:
            with _suppress_h2():
                self.down.acknowledge_received_data(st.to_server.size, st.cid)
        if reset_client and not self.client_gone:
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
        self.client_gone = True  # h2 has already queued its GOAWAY (PROTOCOL_ERROR or the error's code)
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

    def _server_broke(self, message: str) -> None:
        self.server_gone = True  # h2 has already queued its GOAWAY
        for st in list(self.by_cid.values()):
            self._fail(st, UpstreamProtocolError(message), reset_server=False)
        self._goaway_client()
        self._after()

    def _goaway_client(self) -> None:
        if not self.client_gone:
            self.client_gone = True  # no new streams are accepted: the client opens a new connection
            with _suppress_h2():
                self.down.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self.max_client_stream)

    def _goaway_server(self) -> None:
        if not self.server_gone:
            self.server_gone = True
            with _suppress_h2():
                self.up.close_connection(ErrorCodes.NO_ERROR)

    def _after(self) -> None:
        while self.waiting and not self.server_gone and self._room_upstream():
            self._send_request(self.waiting.popleft())
        if (self.client_gone or self.server_gone) and not self.by_cid:
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
