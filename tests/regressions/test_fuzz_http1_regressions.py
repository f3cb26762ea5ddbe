"""Inputs the atheris harness tests/fuzz/fuzz_http1.py crashed on, kept as regression tests.

Each artifact is replayed through the harness's own TestOneInput (atheris not needed), and each finding
also has a readable test of the behaviour it broke.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

import fuzz_http1  # noqa: E402

from proxy.errors import UpstreamProtocolError  # noqa: E402
from proxy.http1 import EndOfMessage, Limits, ResponseHead, ResponseReader  # noqa: E402

# name: (minimised crash input, what it found). Byte 0 picks the reader and the limits, bytes 1-4 the splits.
ARTIFACTS = {
    # CI crash-710ce32a (seeded run, session 2): a HEAD response followed by a stray "\n" was unsolicited
    # when the "\n" came in the same read as the head, and tolerated (RFC 9112 §2.2) when it came later.
    "head-response-then-stray-newline": b"\x02\x05\x11\x31\x40HTTP/1.0 200 Oj\r\nCogt-:T: v\r\n\r\n\n",
    # libFuzzer crash-8000fb3f (minimised): a response with more header fields than the limit raised
    # HeadersTooLarge, a ClientError (431, side "client"), out of ResponseReader, whose only declared
    # error is UpstreamProtocolError. Through the proxy the client got "431 Request Header Fields Too
    # Large" for the origin's response (see test_smuggling_e2e over-100-header-fields).
    "response-over-header-limit": b"\x81\x05\x11\x30\x40HTTP/1.1 101\r\np:\r\np:\r\na:\r\ne:\r\ng:\r\n\r\n",
    # crash-2d9b6c09: a complete non-keep-alive response (HTTP/1.0 304) followed by bytes in the SAME read
    # raised "Data after `Connection: close`"; the same bytes in a later read were only unsolicited.
    "bytes-after-closing-response": b"\x03\x05\x11\x30\x40HTTP/1.0 304 ot\r\nETag: \"x\"\r\n\r\n\xc8.0",
    # crash-de808bfe (FUZZ_KEEP_GOING run): an interim (1xx) response that llhttp gives a chunked body,
    # its end in a later read than its head: ResponseReader took the end of the 1xx for the end of the
    # exchange (done, EndOfMessage, no final response), because it recognised a 1xx by peeking at its
    # event queue, which the consumer had drained meanwhile. In the relay: AttributeError on
    # flow.response (None), a traceback, a 500, and no flow record (test_smuggling_e2e reproduces it).
    # crash-85543f68 (after the harness also compared `unsolicited`): a HEAD response followed by bytes in
    # the SAME read: ResponseReader stops at the head and drops them, unsolicited stays False (the relay
    # would keep reusing a connection whose origin sent a body to HEAD); in a later read they are
    # unsolicited. Found within ~1,600 inputs.
    "bytes-after-head-response-in-one-read": (b"\x02\x05\x11\x30\x40HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n"
                                              b"\r\n200 OK\r\n\xff\xff\xff\xff\xff\xff\xff\x06P/1.1 200 OK\r\n"
                                              b"Tr\xfdans\nT: v\r\n\r\n"),
    # crash-723a81b3 (CI, 20 s run): a complete response, then stray empty lines: llhttp skips them within
    # the same read, but in a later read they counted as unsolicited bytes (outcome depended on the split).
    "empty-lines-after-response": (b"\x01\x05\x11\x30;HTTP/1.1 203 Enk: </a>K\r\nContent-Length: 0\r\n"
                                   b"\r\n\r\n\r\n\r\n"),
    # crash-b904ccfd (the suite's 20 s run, after bd26149 "stray empty lines after a response are
    # tolerated in any read"): after a 101, a later read holding only CR/LF bytes was dropped as a stray
    # empty line, although every byte after a 101 belongs to the new protocol (leftover lost "\r\n").
    "crlf-after-101-in-a-later-read": b"\x01\xfb\x2f\x30\x40HTTP/1.1 101 Swed\r\n\r\n3\r\nabc\r\n2;tx\x81*\x00",
    # A local 150 s run: after a 101, a later read holding only "\r" was taken for a stray empty line and
    # dropped instead of being handed to the new protocol.
    "bytes-after-101-in-a-later-read": b"\x01\x05\x110@HTTP/1.1 101 Pro\xffols\r\nUpgraed: w%bcs\r\nUpgrade: websockEt\r\n\r\n\x81\x02hi\r",
    "interim-with-body-across-reads": (b"\x01\x05\x26\x30\x40\n\r\nHTTP/1.1 196 OK\r\nTransfer-Encoding: chunked\r\n"
                                       b"\r\n0\r\nT:1\r\nHot: a\r\nHot: a\r\nTreger:v\r\n\r\n"),
}


@pytest.mark.parametrize("name", sorted(ARTIFACTS))
def test_artifact_replays_cleanly_through_the_harness(name):
    fuzz_http1.TestOneInput(ARTIFACTS[name])


@pytest.mark.parametrize("limits, head", [
    (Limits(max_headers=4), b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5))),
    (Limits(), b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101))),
    (Limits(), b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(9))),
], ids=["count-tight", "count-default", "size-default"])
def test_a_response_over_the_head_limits_is_the_origins_error(limits, head):
    r = ResponseReader("GET", limits)
    with pytest.raises(UpstreamProtocolError):
        r.feed(head + b"Content-Length: 2\r\n\r\nok")


CLOSING = [
    b"HTTP/1.0 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
]


@pytest.mark.parametrize("response", CLOSING, ids=["1.0-304", "close-200", "close-204"])
@pytest.mark.parametrize("after", [b"\xc8.0", b"HTTP/1.1 200 OK\r\n\r\n"], ids=["garbage", "another-response"])
def test_bytes_after_a_closing_response_give_the_same_outcome_in_one_read_or_two(response, after):
    """TCP segmentation must not decide whether a complete response reaches the client or becomes a 502."""

    def run(parts):
        r = ResponseReader("GET")
        events, error = [], None
        try:
            for p in parts:
                r.feed(p)
            r.feed_eof()
        except UpstreamProtocolError as e:
            error = e
        while (ev := r.next_event()) is not None:
            events.append(ev)
        return events, type(error), r.done, r.unsolicited

    one_read = run([response + after])
    two_reads = run([response, after])
    assert isinstance(two_reads[0][0], ResponseHead) and isinstance(two_reads[0][-1], EndOfMessage)
    assert one_read == two_reads, f"one read: {one_read}\ntwo reads: {two_reads}"


@pytest.mark.parametrize("status", [150, 196, 199])
def test_the_end_of_an_interim_response_is_not_the_end_of_the_exchange(status):
    """However the bytes are split and however promptly the events are taken, a 1xx never completes the
    exchange: only a final (2xx-5xx, or 101) response does."""
    head = b"HTTP/1.1 %d Interim\r\nTransfer-Encoding: chunked\r\n\r\n" % status
    for parts in ([head + b"0\r\n\r\n"], [head, b"0\r\n\r\n"]):
        r = ResponseReader("GET")
        events = []
        try:
            for p in parts:
                r.feed(p)
                while (ev := r.next_event()) is not None:  # taken as they come, as the relay does
                    events.append(ev)
        except UpstreamProtocolError:
            pass  # refusing a 1xx with a body is fine
        assert not r.done and not any(isinstance(ev, EndOfMessage) for ev in events), (parts, events)


@pytest.mark.parametrize("after", [b"hello", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], ids=["body", "response"])
def test_bytes_after_a_head_response_are_unsolicited_in_one_read_or_two(after):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    for parts in ([head + after], [head, after]):
        r = ResponseReader("HEAD")
        for p in parts:
            r.feed(p)
        assert r.done and r.unsolicited, f"{after!r} after a HEAD response went unnoticed when read as {parts}"


@pytest.mark.parametrize("later", [b"\r\n", b"\n", b"\r\n\r\n"])
def test_every_byte_after_a_101_is_the_new_protocols_whatever_the_read(later):
    r = ResponseReader("GET")
    r.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nab")
    r.feed(later)
    r.feed(b"cd")
    assert r.switched and r.leftover == b"ab" + later + b"cd", r.leftover
