"""HTTP/1 framing, bytes in → events out (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import (BadRequest, HeadersTooLarge, RequestLineTooLong, TooManyPipelined, UpstreamProtocolError,
                          VersionNotSupported)
from proxy.http1 import (
    Data,
    EndOfMessage,
    Limits,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    chunk,
    last_chunk,
    serialize_request_head,
    serialize_response_head,
    simple_response,
)


def events(reader) -> list:
    out = []
    while (ev := reader.next_event()) is not None:
        out.append(ev)
    return out


def body_of(evs) -> bytes:
    return b"".join(e.data for e in evs if isinstance(e, Data))


def test_pipelined_requests_keep_order_case_and_trailers():
    r = RequestReader()
    r.feed(b"GET /a HTTP/1.1\r\nHost: x\r\nX-MiXeD: 1\r\nx-mixed: 2\r\n\r\n"
           b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n")
    evs = events(r)
    assert isinstance(evs[0], RequestHead) and evs[0].target == "/a"
    assert evs[0].headers == [(b"Host", b"x"), (b"X-MiXeD", b"1"), (b"x-mixed", b"2")]
    assert isinstance(evs[1], EndOfMessage)
    assert evs[2].method == "POST" and evs[2].chunked
    assert body_of(evs[3:]) == b"abc"
    assert evs[-1].trailers == [(b"X-Trailer", b"t")]


def test_request_split_at_every_byte():
    raw = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    r = RequestReader()
    evs = []
    for i in range(len(raw)):
        r.feed(raw[i : i + 1])
        evs += events(r)
    assert evs[0].target == "/p" and evs[0].headers == [(b"Host", b"x"), (b"Content-Length", b"5")]
    assert body_of(evs) == b"hello" and isinstance(evs[-1], EndOfMessage)


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
    ids=["cl+te", "cl-conflict", "te-not-chunked", "bad-chunk-size", "space-before-colon", "obs-fold", "nul",
         "bare-cr", "negative-cl", "garbage"],
)
def test_smuggling_and_malformed_requests_are_400(raw):
    with pytest.raises(BadRequest):
        RequestReader().feed(raw)


def test_limits_give_414_and_431():
    with pytest.raises(RequestLineTooLong):
        RequestReader(Limits(max_request_line=100)).feed(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n")
    with pytest.raises(HeadersTooLarge):
        RequestReader().feed(b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: y\r\n" % i for i in range(101)) + b"\r\n")
    with pytest.raises(HeadersTooLarge):
        RequestReader(Limits(max_head=1000)).feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n")


def test_unfinished_huge_head_is_refused_before_it_completes():
    r = RequestReader(Limits(max_head=1000, max_request_line=100))
    r.feed(b"GET / HTTP/1.1\r\nX: ")
    with pytest.raises(HeadersTooLarge):
        for _ in range(100):
            r.feed(b"a" * 100)  # never a CRLF: llhttp would buffer it all


@pytest.mark.parametrize("side", ["request", "response"])
def test_an_endless_trailer_field_or_chunk_line_is_refused_before_it_grows(side):
    """httptools keeps a field's pieces until it ends: after the head, bytes that complete nothing are
    bounded like a head (431 from a client, a protocol error from an origin)."""
    limits = Limits(max_head=1000, max_request_line=100)
    if side == "request":
        make, error = (lambda: RequestReader(limits)), HeadersTooLarge
        head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    else:
        make, error = (lambda: ResponseReader("GET", limits)), UpstreamProtocolError
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for endless in (b"5\r\nhello\r\n0\r\nX-Trailer: ", b"5;ext=", b"0000000000"):
        r = make()
        r.feed(head + endless)
        fed = 0
        with pytest.raises(error, match="chunk-size line, chunk extension or trailer field"):
            for _ in range(100):
                r.feed(b"a" * 100 if endless != b"0000000000" else b"0" * 100)
                fed += 100
        assert fed <= 1100, f"{endless!r}: {fed} bytes taken before the refusal"


def test_chunked_bodies_that_make_progress_are_not_limited():
    limits = Limits(max_head=1000, max_request_line=100)
    r = RequestReader(limits)
    r.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % 50_000)
    for _ in range(500):  # one 50,000-byte chunk arriving 100 bytes at a time
        r.feed(b"b" * 100)
    r.feed(b"\r\n" + b"1\r\nc\r\n" * 5000 + b"0\r\nX-Sum: 1\r\nX-More: 2\r\n\r\n")  # many tiny chunks at once
    evs = events(r)
    assert len(body_of(evs)) == 55_000
    assert evs[-1].trailers == [(b"X-Sum", b"1"), (b"X-More", b"2")]


def test_connect_and_upgrade_hand_back_the_following_bytes():
    r = RequestReader()
    r.feed(b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n\x16\x03\x01")
    head = r.next_event()
    assert head.method == "CONNECT" and head.target == "a.test:443" and head.upgrade
    assert r.upgraded and r.leftover == b"\x16\x03\x01"
    r.feed(b"more")
    assert r.leftover == b"\x16\x03\x01more"


def test_response_1xx_then_final_and_unsolicited_data():
    rr = ResponseReader("POST")
    rr.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    evs = events(rr)
    assert evs[0].status == 100 and evs[0].informational
    assert evs[1].status == 200 and not evs[1].informational
    assert body_of(evs) == b"ok" and rr.done and rr.unsolicited


@pytest.mark.parametrize("method,status", [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_responses_without_body(method, status):
    rr = ResponseReader(method)
    rr.feed(b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status)
    evs = events(rr)
    assert evs[0].status == status and isinstance(evs[-1], EndOfMessage) and rr.done and not rr.unsolicited
    assert body_of(evs) == b""


def test_a_reader_is_reused_for_the_next_response_only_after_a_clean_persistent_end():
    rr = ResponseReader("GET")
    rr.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert body_of(events(rr)) == b"ok"
    for method, raw, body in (("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"abc"),
                              ("POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx", b"x")):
        assert rr.reset(method)  # same parser, fresh state
        rr.feed(raw[:17])
        rr.feed(raw[17:])
        evs = events(rr)
        assert body_of(evs) == body and isinstance(evs[-1], EndOfMessage) and rr.done and not rr.unsolicited
    assert rr.reset("HEAD")
    rr.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    assert events(rr)[0].status == 200 and rr.done
    assert not rr.reset("GET")  # parsing stopped at the HEAD response's head: never reused
    for raw in (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",  # not persistent
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n",  # unsolicited bytes
                b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"):  # HTTP/1.0 without keep-alive
        rr = ResponseReader("GET")
        rr.feed(raw)
        events(rr)
        assert rr.done and not rr.reset("GET"), raw
    rr = ResponseReader("GET")
    with pytest.raises(UpstreamProtocolError):
        rr.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert not rr.reset("GET")


def test_101_switches_and_keeps_the_bytes_after_the_head():
    rr = ResponseReader("GET")
    rr.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi")
    evs = events(rr)
    assert evs[0].status == 101 and rr.switched and rr.leftover == b"\x81\x02hi"


def test_close_delimited_ends_at_eof_and_truncation_is_an_error():
    rr = ResponseReader("GET")
    rr.feed(b"HTTP/1.1 200 OK\r\n\r\npart1")
    rr.feed(b"part2")
    rr.feed_eof()
    evs = events(rr)
    assert evs[0].close_delimited and not evs[0].keep_alive and body_of(evs) == b"part1part2"
    for raw in (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                b"HTTP/1.1 200 OK\r\nContent-"):
        rr = ResponseReader("GET")
        rr.feed(raw)
        with pytest.raises(UpstreamProtocolError):
            rr.feed_eof()
    with pytest.raises(UpstreamProtocolError, match="without sending a response"):
        ResponseReader("GET").feed_eof()


def test_ambiguous_responses_are_upstream_errors():
    with pytest.raises(UpstreamProtocolError):
        ResponseReader("GET").feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")


def test_serialisers_round_trip():
    head = serialize_request_head("GET", "/x?y", "1.1", [(b"Host", b"h"), (b"X-A", b"1")])
    r = RequestReader()
    r.feed(head)
    ev = r.next_event()
    assert (ev.method, ev.target, ev.headers) == ("GET", "/x?y", [(b"Host", b"h"), (b"X-A", b"1")])
    rr = ResponseReader("GET")
    rr.feed(serialize_response_head(200, "Fine", "1.1", [(b"Transfer-Encoding", b"chunked")])
            + chunk(b"abc") + chunk(b"de") + last_chunk([(b"T", b"v")]))
    evs = events(rr)
    assert evs[0].reason == "Fine" and body_of(evs) == b"abcde" and evs[-1].trailers == [(b"T", b"v")]
    msg = simple_response(502, "Bad Gateway", "certificate has expired\n")
    rr = ResponseReader("GET")
    rr.feed(msg)
    evs = events(rr)
    assert evs[0].status == 502 and body_of(evs) == b"certificate has expired\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_declared_errors(data):
    try:
        RequestReader().feed(data)
    except (BadRequest, HeadersTooLarge, RequestLineTooLong, TooManyPipelined, VersionNotSupported):
        pass
    try:
        rr = ResponseReader("GET")
        rr.feed(data)
        rr.feed_eof()
    except UpstreamProtocolError:
        pass


@pytest.mark.parametrize("line", [b"GET /\r\n\r\n", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", b"GET / HTTP/0.9\r\n\r\n"])
def test_other_http_versions_are_505(line):
    with pytest.raises(VersionNotSupported) as info:
        RequestReader().feed(line)
    assert info.value.status == 505
