"""proxy/http2.py (H2Bridge), sans-IO: a real h2 client and a real h2 origin (the `h2` library's own
state machines, byte for byte) on either side of the bridge, pumped in memory. The end-to-end tests
with curl, Chromium and TLS are in test_e2e_http2.py."""

from __future__ import annotations

import itertools

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from proxy.flow import Flow
from proxy.http2 import STREAM_WINDOW, H2Bridge, _Connection


class Pair:
    """client <-> bridge <-> origin, with every event each peer saw."""

    def __init__(self, origin_settings: dict | None = None):
        self.flows: list[Flow] = []
        self.t = itertools.count()
        self.bridge = H2Bridge(new_flow=self._new_flow, emit=self.flows.append, clock=lambda: next(self.t) / 1000,
                               wall=lambda: 1.0, host="origin.test", port=443)
        # the client keeps reading after a GOAWAY, as browsers do (h2's own class would stop)
        self.client = _Connection(H2Configuration(client_side=True, header_encoding=None))
        self.origin = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.client_events: list = []
        self.origin_events: list = []
        self.client.initiate_connection()
        self.origin.initiate_connection()
        if origin_settings:
            self.origin.update_settings(origin_settings)
        self.bridge.start()
        # (the bridge's origin connection, the test origin's h2 state, its events)
        self.origins = [(self.bridge.origin, self.origin, self.origin_events)]
        self.pump()

    def reconnect(self):
        """What the shell does when the bridge wants an origin connection: a second test origin."""
        peer = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        peer.initiate_connection()
        events: list = []
        self.origins.append((self.bridge.add_origin(), peer, events))
        self.pump()
        return peer, events

    def _new_flow(self, sid: int) -> Flow:
        return Flow(client_addr="127.0.0.1:1", mode="https", stream_id=sid)

    def pump(self) -> None:
        for _ in range(100):
            moved = False
            data = self.client.data_to_send()
            if data:
                moved = True
                self.bridge.client_data(data)
            for o, peer, events in self.origins:
                data = peer.data_to_send()
                if data:
                    moved = True
                    self.bridge.server_data(data, o)
            data = self.bridge.to_client()
            if data:
                moved = True
                self.client_events += self.client.receive_data(data)
            for o, peer, events in self.origins:
                data = self.bridge.to_server(o)
                if data:
                    moved = True
                    events += peer.receive_data(data)
            if not moved:
                return
        raise AssertionError("the peers never went quiet")

    def of(self, events, cls, stream_id=None):
        return [e for e in events if isinstance(e, cls) and (stream_id is None or e.stream_id == stream_id)]

    def get(self, path: bytes = b"/", extra=(), end=True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"origin.test"),
                                       (b":path", path), *extra], end_stream=end)
        self.pump()
        return sid

    def respond(self, origin_sid: int, body: bytes = b"", status: bytes = b"200", extra=(), end=True) -> None:
        self.origin.send_headers(origin_sid, [(b":status", status), *extra], end_stream=not body and end)
        if body:
            self.origin.send_data(origin_sid, body, end_stream=end)
        self.pump()


def body_of(events, sid) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def test_request_and_response_pass_unchanged_and_one_flow_per_stream():
    p = Pair()
    sid = p.get(b"/a?b=1", extra=[(b"x-first", b"1"), (b"accept", b"*/*"), (b"x-last", b"z")])
    (req,) = p.of(p.origin_events, RequestReceived)
    assert req.headers == [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"origin.test"),
                           (b":path", b"/a?b=1"), (b"x-first", b"1"), (b"accept", b"*/*"), (b"x-last", b"z")]
    p.respond(req.stream_id, b"hello", extra=[(b"content-type", b"text/plain"), (b"x-b", b"2"), (b"x-a", b"1")])
    (resp,) = p.of(p.client_events, ResponseReceived, sid)
    assert resp.headers == [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-b", b"2"), (b"x-a", b"1")]
    assert body_of(p.client_events, sid) == b"hello"
    assert p.of(p.client_events, StreamEnded, sid)
    (flow,) = p.flows
    rec = flow.to_dict()
    assert rec["stream_id"] == sid and rec["error"] is None
    assert rec["request"]["url"] == "https://origin.test/a?b=1" and rec["request"]["http_version"] == "2"
    assert rec["request"]["headers"] == [["x-first", "1"], ["accept", "*/*"], ["x-last", "z"]]
    assert rec["response"]["status"] == 200 and rec["response"]["headers"][1] == ["x-b", "2"]
    assert flow.response.body.size == 5 and bytes(flow.response.body.captured) == b"hello"


def test_trailers_both_ways():
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"o.test"),
                                (b":path", b"/up"), (b"te", b"trailers")])
    p.client.send_data(sid, b"abc")
    p.client.send_headers(sid, [(b"x-req-sum", b"1")], end_stream=True)
    p.pump()
    (req,) = p.of(p.origin_events, RequestReceived)
    assert body_of(p.origin_events, req.stream_id) == b"abc"
    assert p.of(p.origin_events, TrailersReceived)[0].headers == [(b"x-req-sum", b"1")]
    p.origin.send_headers(req.stream_id, [(b":status", b"200")])
    p.origin.send_data(req.stream_id, b"xyz")
    p.origin.send_headers(req.stream_id, [(b"x-checksum", b"42")], end_stream=True)
    p.pump()
    assert p.of(p.client_events, TrailersReceived, sid)[0].headers == [(b"x-checksum", b"42")]
    (flow,) = p.flows
    assert flow.request.trailers == [(b"x-req-sum", b"1")] and flow.response.trailers == [(b"x-checksum", b"42")]


def test_a_client_that_does_not_read_stops_the_origin_within_one_window():
    p = Pair()
    sid = p.get(b"/big")
    (req,) = p.of(p.origin_events, RequestReceived)
    osid = req.stream_id
    p.respond(osid, end=False)
    sent = 0
    block = b"x" * 16384
    while True:  # the origin writes while its window lets it; the client never acknowledges anything
        room = min(p.origin.local_flow_control_window(osid), len(block))
        if room <= 0:
            break
        p.origin.send_data(osid, block[:room])
        sent += room
        p.pump()
        assert sent < 4 * STREAM_WINDOW, "the origin was never stopped: the proxy is buffering"
    got = len(body_of(p.client_events, sid))
    assert got == 65535  # the client's window (h2 default), no more
    held = sum(st.to_client.size for st in p.bridge.by_cid.values())
    assert held == sent - got and held <= STREAM_WINDOW
    # The client reads everything it got: the rest flows, and the origin's window opens again.
    p.client.acknowledge_received_data(got, sid)
    p.pump()
    assert len(body_of(p.client_events, sid)) > got
    assert p.origin.local_flow_control_window(osid) > 0


def test_request_body_is_flow_controlled_too():
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"o.test"),
                                (b":path", b"/up")])
    p.pump()
    sent = 0
    while p.client.local_flow_control_window(sid) > 0:
        n = min(p.client.local_flow_control_window(sid), 16384)
        p.client.send_data(sid, b"u" * n)
        sent += n
        p.pump()
        assert sent < 4 * STREAM_WINDOW
    (req,) = p.of(p.origin_events, RequestReceived)
    assert len(body_of(p.origin_events, req.stream_id)) == 65535  # the origin's default window
    assert sent <= 65535 + STREAM_WINDOW


def test_client_reset_is_passed_to_the_origin_with_its_code():
    p = Pair()
    sid = p.get(b"/slow")
    (req,) = p.of(p.origin_events, RequestReceived)
    p.client.reset_stream(sid, ErrorCodes.CANCEL)
    p.pump()
    (reset,) = p.of(p.origin_events, StreamReset, req.stream_id)
    assert reset.error_code == ErrorCodes.CANCEL
    (flow,) = p.flows
    assert flow.error["kind"] == "stream_reset" and flow.error["side"] == "client"
    assert flow.error["h2_error_code"] == int(ErrorCodes.CANCEL)


def test_origin_reset_is_passed_to_the_client_with_its_code():
    p = Pair()
    sid = p.get(b"/r")
    (req,) = p.of(p.origin_events, RequestReceived)
    p.origin.send_headers(req.stream_id, [(b":status", b"200")])
    p.origin.reset_stream(req.stream_id, ErrorCodes.ENHANCE_YOUR_CALM)
    p.pump()
    (reset,) = p.of(p.client_events, StreamReset, sid)
    assert reset.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    (flow,) = p.flows
    assert flow.error["side"] == "upstream" and "ENHANCE_YOUR_CALM" in flow.error["message"]
    assert flow.response.status == 200


def test_origin_goaway_moves_unprocessed_streams_to_a_new_connection_unseen_by_the_client():
    p = Pair()
    s1 = p.get(b"/one")
    s2 = p.get(b"/two")
    reqs = p.of(p.origin_events, RequestReceived)
    assert len(reqs) == 2
    # A graceful GOAWAY (as nginx sends after its 1000th request): stream 1 will still be answered.
    # (Written by hand: the h2 library cannot keep answering after sending one.)
    p.bridge.server_data(GoAwayFrame(0, last_stream_id=reqs[0].stream_id, error_code=0).serialize())
    p.pump()
    assert not p.of(p.client_events, StreamReset) and not p.of(p.client_events, ConnectionTerminated)
    assert p.bridge.wants_origin  # stream 2 was not processed: it waits for a new origin connection
    p.respond(reqs[0].stream_id, b"done")  # answered after the GOAWAY, on the old connection
    assert body_of(p.client_events, s1) == b"done"
    peer, events = p.reconnect()
    (again,) = p.of(events, RequestReceived)
    assert dict(again.headers)[b":path"] == b"/two"
    s3 = p.get(b"/three")  # new requests go to the new connection too
    peer.send_headers(again.stream_id, [(b":status", b"200")])
    peer.send_data(again.stream_id, b"two", end_stream=True)
    p.pump()
    assert body_of(p.client_events, s2) == b"two"
    (r3,) = [e for e in p.of(events, RequestReceived) if dict(e.headers)[b":path"] == b"/three"]
    assert r3 and not p.bridge.closed
    assert sorted((f.stream_id, f.error is None) for f in p.flows) == [(s1, True), (s2, True)]
    assert p.bridge.origins[0].retired  # the old connection was drained and let go
    assert s3


def test_origin_goaway_refuses_a_stream_whose_body_was_already_sent():
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"o.test"),
                                (b":path", b"/up")])
    p.client.send_data(sid, b"part of a body")
    p.pump()
    (req,) = p.of(p.origin_events, RequestReceived)
    p.bridge.server_data(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
    p.pump()
    (reset,) = p.of(p.client_events, StreamReset, sid)
    assert reset.error_code == ErrorCodes.REFUSED_STREAM  # cannot be replayed: the client retries it
    assert not p.of(p.client_events, ConnectionTerminated)


def test_server_push_is_disabled_towards_the_origin():
    p = Pair()
    assert p.origin.remote_settings.enable_push == 0
    p.get(b"/")
    (req,) = p.of(p.origin_events, RequestReceived)
    with pytest.raises(Exception):  # the origin's own h2 refuses to push to a peer that disabled it
        p.origin.push_stream(req.stream_id, 2, [(b":method", b"GET"), (b":scheme", b"https"),
                                                (b":authority", b"o.test"), (b":path", b"/pushed")])


def test_origin_stream_limit_queues_requests_in_order():
    p = Pair(origin_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    sids = [p.get(f"/{i}".encode()) for i in range(3)]
    for i in range(3):
        reqs = p.of(p.origin_events, RequestReceived)
        assert len(reqs) == i + 1  # one at a time
        assert dict(reqs[-1].headers)[b":path"] == f"/{i}".encode()
        p.respond(reqs[-1].stream_id, f"r{i}".encode())
    assert [body_of(p.client_events, s) for s in sids] == [b"r0", b"r1", b"r2"]
    assert len(p.flows) == 3 and all(f.error is None for f in p.flows)


def test_client_protocol_error_is_a_goaway_and_a_record():
    p = Pair()
    p.bridge.client_data(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # WINDOW_UPDATE, increment 0
    p.client_events += p.client.receive_data(p.bridge.to_client())
    (term,) = p.of(p.client_events, ConnectionTerminated)
    assert term.error_code == ErrorCodes.PROTOCOL_ERROR
    (flow,) = p.flows
    assert flow.error["side"] == "client" and "HTTP/2" in flow.error["message"]


def test_origin_gone_before_the_response_is_a_502_after_it_a_reset():
    p = Pair()
    s1 = p.get(b"/started")
    s2 = p.get(b"/waiting")
    r1, _ = p.of(p.origin_events, RequestReceived)
    p.respond(r1.stream_id, b"part", end=False)
    p.bridge.server_eof()
    p.pump()
    assert p.of(p.client_events, StreamReset, s1)[0].error_code == ErrorCodes.INTERNAL_ERROR
    (resp,) = p.of(p.client_events, ResponseReceived, s2)
    assert dict(resp.headers)[b":status"] == b"502"
    assert b"origin closed the connection" in body_of(p.client_events, s2)
    assert {f.stream_id for f in p.flows} == {s1, s2} and all(f.error["status"] == 502 for f in p.flows)


def test_connect_inside_h2_is_refused_with_a_response():
    p = Pair()
    sid = p.client.get_next_available_stream_id()
    p.client.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"elsewhere.test:443")])
    p.pump()
    assert not p.of(p.origin_events, RequestReceived)
    (resp,) = p.of(p.client_events, ResponseReceived, sid)
    assert dict(resp.headers)[b":status"] == b"400"
    assert p.flows[0].error["kind"] == "client_protocol"
