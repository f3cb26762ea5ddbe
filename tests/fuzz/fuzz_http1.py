#!/usr/bin/env python3
"""atheris (libFuzzer) harness for proxy.http1: RequestReader and ResponseReader.

    python tests/fuzz/fuzz_http1.py [libFuzzer flags] CORPUS_DIR [SEED_DIR...]
    python tests/fuzz/fuzz_http1.py --write-seeds DIR      # a few valid requests and responses

Input layout: byte 0 picks the reader (request, or a response to GET / HEAD / POST) and the limits
(defaults, or tight ones so the 414/431 paths are reachable with small inputs); bytes 1-4 are split
points; the rest is fed to the reader in those pieces, then (responses) EOF.
A crash is any exception other than the declared ones (BadRequest, HeadersTooLarge, RequestLineTooLong,
TooManyPipelined for requests; UpstreamProtocolError for responses), or a broken invariant
(AssertionError): with the default limits, the events, the error and the reader's flags are the same
whether the bytes come in one piece or split.
"""

from __future__ import annotations

import contextlib
import sys

try:
    import atheris
except ImportError:  # the regression tests replay inputs through TestOneInput without it
    atheris = None

import _harness  # noqa: E402  (tests/fuzz is the script's directory)

_seeds_only = len(sys.argv) == 3 and sys.argv[1] == "--write-seeds"
with atheris.instrument_imports() if atheris and not _seeds_only else contextlib.nullcontext():
    from proxy.errors import (BadRequest, HeadersTooLarge, RequestLineTooLong, TooManyPipelined,
                              UpstreamProtocolError, VersionNotSupported)
    from proxy.http1 import Data, Limits, RequestReader, ResponseReader

REQUEST_ERRORS = (BadRequest, HeadersTooLarge, RequestLineTooLong, TooManyPipelined, VersionNotSupported)
TIGHT = Limits(max_request_line=32, max_head=256, max_headers=4)
METHODS = ("GET", "HEAD", "POST")


def _drain(reader, events: list) -> None:
    while (ev := reader.next_event()) is not None:
        if isinstance(ev, Data) and events and isinstance(events[-1], Data):
            events[-1] = Data(events[-1].data + ev.data)  # how a body is cut into events is free
        else:
            events.append(ev)


def run(kind: int, limits: Limits, parts: list[bytes]):
    events: list = []
    if kind == 0:
        r = RequestReader(limits)
        try:
            for p in parts:
                r.feed(p)
                _drain(r, events)
        except REQUEST_ERRORS as e:
            _drain(r, events)
            return events, type(e), r.leftover
        _drain(r, events)
        return events, None, r.leftover
    r = ResponseReader(METHODS[kind - 1], limits)
    try:
        for p in parts:
            r.feed(p)
            _drain(r, events)
        r.feed_eof()
    except UpstreamProtocolError as e:
        _drain(r, events)
        return events, type(e), (r.done, r.switched)
    _drain(r, events)
    # After a 101 the rest is the new protocol's (leftover); otherwise it is unsolicited, whenever it came.
    return events, None, (r.done, r.switched, r.leftover if r.switched else r.unsolicited)


def TestOneInput(data: bytes) -> None:
    if len(data) < 5:
        return
    kind, limits = data[0] % 4, (TIGHT if data[0] & 0x80 else Limits())
    body = data[5:]
    cuts = sorted({c % (len(body) + 1) for c in data[1:5]})
    parts, prev = [], 0
    for c in cuts + [len(body)]:
        if c > prev:
            parts.append(body[prev:c])
            prev = c
    whole = run(kind, limits, [body] if body else [])
    split = run(kind, limits, parts)
    if limits is TIGHT:
        return  # with tight limits, how much of an unfinished head is buffered depends on the split
    if TooManyPipelined in (whole[1], split[1]):
        return  # the queue depth depends on how fast events are taken, hence on the split: by design
    if whole != split:
        e = AssertionError(f"outcome depends on the split {cuts}: {whole!r} != {split!r}")
        e.category = "split:" + "/".join(getattr(x[1], "__name__", "ok") for x in (whole, split))
        raise e


SEEDS = {
    "get": b"\x00\x05\x11\x30\x40GET /a?b=c HTTP/1.1\r\nHost: a.test\r\nX-MiXeD: 1\r\n\r\n",
    "post-cl": b"\x00\x03\x20\x31\x50POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    "post-chunked": (b"\x00\x07\x22\x33\x44POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: t\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n"),
    "connect": b"\x00\x01\x02\x03\x04CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n\x16\x03\x01\x00\x05hello",
    "upgrade": b"\x00\x09\x10\x20\x30GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00",
    "tight-req": b"\x80\x09\x10\x20\x30GET /" + b"a" * 40 + b" HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n",
    "resp-cl": b"\x01\x05\x11\x30\x40HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "resp-chunked": (b"\x01\x05\x11\x30\x40HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nT: v\r\n\r\n"),
    "resp-close": b"\x01\x05\x11\x30\x40HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
    "resp-head": b"\x02\x05\x11\x30\x40HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
    "resp-204": b"\x01\x05\x11\x30\x40HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
    "resp-304": b"\x03\x05\x11\x30\x40HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
    "resp-101": b"\x01\x05\x11\x30\x40HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi",
    "resp-103": b"\x01\x05\x11\x30\x40HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
}


def seeds() -> dict[str, bytes]:
    return dict(SEEDS)


if __name__ == "__main__":
    _harness.main(TestOneInput, seeds)
