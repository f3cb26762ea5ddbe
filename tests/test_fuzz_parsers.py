"""Property tests of the two parsers that face hostile bytes, and the coverage-guided fuzzers in CI.

Complements tests/test_http1.py and tests/test_clienthello.py (which feed arbitrary bytes in one piece
and flip one byte of one capture). Here:

* HTTP/1 readers, fed arbitrary bytes AND mutations of valid messages, split at arbitrary points: only
  the declared errors, and the same outcome (events, error class, flags) however the bytes are split.
* Valid requests and responses built by strategies (methods, targets, header case and order, Content-
  Length / chunked bodies with trailers, pipelining, 1xx, HEAD, 204, 304, 101, close-delimited) round-
  trip through the serialisers and the readers, whatever the split.
* ClientHello: every capture in tests/data, mutated (bytes set, inserted, deleted, lengths nudged,
  records re-fragmented), gives only NeedMore/NotTLS or a hello; NotTLS is final (no longer input turns
  it into a hello); a parsed hello is stable and every shorter prefix of it is NeedMore.
* The atheris harnesses of tests/fuzz/ run for a bounded time each (see test_atheris_harnesses).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from proxy import clienthello
from proxy.errors import (BadRequest, HeadersTooLarge, RequestLineTooLong, TooManyPipelined,
                              UpstreamProtocolError, VersionNotSupported)
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
)

HERE = Path(__file__).resolve().parent
REQUEST_ERRORS = (BadRequest, HeadersTooLarge, RequestLineTooLong, TooManyPipelined, VersionNotSupported)
RESPONSE_ERRORS = (UpstreamProtocolError,)
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Mutated inputs are reported as they are: shrinking them can take minutes and teaches little more.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


# --- feeding ---------------------------------------------------------------------------------------


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the (sorted, deduplicated) offsets in `cuts` (taken modulo len+1)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points + [len(data)]:
        out.append(data[prev:p])
        prev = p
    return [p for p in out if p]


def normalise(events: list) -> list:
    """Adjacent Data events merged: how a body is split into events is not part of the contract."""
    out: list = []
    for ev in events:
        if isinstance(ev, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def drain(reader) -> list:
    out = []
    while (ev := reader.next_event()) is not None:
        out.append(ev)
    return out


def run_request_reader(parts: list[bytes], limits: Limits = Limits()):
    """(normalised events, error class or None, leftover) of feeding `parts` one by one."""
    r = RequestReader(limits)
    events, error = [], None
    try:
        for p in parts:
            r.feed(p)
            events += drain(r)
    except REQUEST_ERRORS as e:
        error = type(e)
    events += drain(r)
    return normalise(events), error, r.leftover


def run_response_reader(method: str, parts: list[bytes], eof: bool = True):
    """(normalised events, error class or None, reader) of feeding `parts`, then EOF."""
    r = ResponseReader(method)
    events, error = [], None
    try:
        for p in parts:
            r.feed(p)
            events += drain(r)
        if eof:
            r.feed_eof()
    except RESPONSE_ERRORS as e:
        error = type(e)
    events += drain(r)
    return normalise(events), error, r


# --- strategies: valid messages --------------------------------------------------------------------

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Fields with framing or connection semantics: placed by the strategies themselves, never at random.
SPECIAL = {b"content-length", b"transfer-encoding", b"connection", b"proxy-connection", b"upgrade",
           b"keep-alive", b"expect", b"host", b"te", b"trailer"}
VCHAR = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))  # field-vchar incl. obs-text (RFC 9110 §5.5)


def over(alphabet: bytes, **kw):
    """Bytes drawn from `alphabet` (st.binary mapped through a table: much cheaper than a list of draws)."""
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    return st.binary(**kw).map(lambda b: b.translate(table))


field_names = over(TCHAR, min_size=1, max_size=24).filter(lambda n: n.lower() not in SPECIAL)
# Leading/trailing whitespace is not part of a field value (RFC 9110 §5.5): only inner SP/HTAB.
field_values = over(VCHAR + b" \t" * 8, max_size=40).map(lambda v: v.strip(b" \t"))
fields = st.lists(st.tuples(field_names, field_values), max_size=12)
PCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@"
paths = over((PCHAR + "/").encode(), max_size=40).map(lambda b: "/" + b.decode())
queries = st.none() | over((PCHAR + "/?%").encode(), max_size=30).map(lambda b: b.decode().replace("%", "%25"))
origin_form = st.builds(lambda p, q: p if q is None else f"{p}?{q}", paths, queries)
hosts = st.lists(over(b"abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10), min_size=1,
                 max_size=4).map(lambda labels: b".".join(labels).decode())
absolute_form = st.builds(lambda h, port, pq: f"http://{h}{'' if port is None else f':{port}'}{pq}", hosts,
                          st.none() | st.integers(1, 65535), origin_form)
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "REPORT", "PURGE"]
bodies = st.binary(max_size=400)
chunk_lists = st.lists(st.binary(min_size=1, max_size=120), max_size=6)


def random_case(draw, name: str) -> bytes:
    mask = draw(st.integers(0, (1 << len(name)) - 1))
    return "".join(c.upper() if mask >> i & 1 else c.lower() for i, c in enumerate(name)).encode()


@st.composite
def requests(draw, *, last: bool = True):
    """(wire bytes, expected RequestHead, body, trailers). Only the `last` request may close."""
    method = draw(st.sampled_from(METHODS))
    target = draw(st.just("*") if method == "OPTIONS" and draw(st.booleans()) else origin_form | absolute_form)
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    headers = [(random_case(draw, "host"), draw(hosts).encode())] + draw(fields)
    framing = draw(st.sampled_from(["none", "length", "chunked"] if version == "1.1" else ["none", "length"]))
    body, chunks_, trailers = b"", [], []
    if framing == "length":
        body = draw(bodies)
        headers.insert(draw(st.integers(0, len(headers))), (random_case(draw, "content-length"), b"%d" % len(body)))
    elif framing == "chunked":
        chunks_ = draw(chunk_lists)
        body = b"".join(chunks_)
        trailers = draw(st.lists(st.tuples(field_names, field_values), max_size=3))
        headers.insert(draw(st.integers(0, len(headers))), (random_case(draw, "transfer-encoding"), b"chunked"))
    conn = draw(st.sampled_from([None, "close", "keep-alive"] if last else [None, "keep-alive"]))
    if version == "1.0" and not last:
        conn = "keep-alive"
    if conn is not None:
        headers.insert(draw(st.integers(0, len(headers))), (random_case(draw, "connection"), random_case(draw, conn)))
    keep_alive = conn != "close" if version == "1.1" else conn == "keep-alive"
    wire = serialize_request_head(method, target, version, headers)
    wire += b"".join(map(chunk, chunks_)) + last_chunk(trailers) if framing == "chunked" else body
    head = RequestHead(method=method, target=target, http_version=version, headers=headers, keep_alive=keep_alive,
                       chunked=framing == "chunked", content_length=len(body) if framing == "length" else None)
    return wire, head, body, trailers


@st.composite
def pipelines(draw):
    n = draw(st.integers(1, 4))
    return [draw(requests(last=i == n - 1)) for i in range(n)]


reasons = over(VCHAR + b" " * 8, max_size=20).map(lambda b: b.decode("latin-1").strip())


@st.composite
def responses(draw):
    """(method, wire bytes, expected [ResponseHead...], body, trailers, needs_eof, extra_after)."""
    method = draw(st.sampled_from(["GET", "POST", "HEAD"]))
    heads, wire = [], b""
    for _ in range(draw(st.integers(0, 3))):  # interim responses (RFC 9110 §15.2), never 101 here
        status, hdrs = draw(st.sampled_from([100, 102, 103])), draw(fields)
        reason = draw(reasons)
        wire += serialize_response_head(status, reason, "1.1", hdrs)
        heads.append(ResponseHead(status=status, reason=reason, http_version="1.1", headers=hdrs, keep_alive=True,
                                  chunked=False, content_length=None, close_delimited=False, informational=True))
    status = draw(st.sampled_from([200, 201, 204, 206, 301, 304, 404, 500]) | st.integers(200, 599))
    version = draw(st.sampled_from(["1.1", "1.1", "1.0"]))
    reason = draw(reasons)
    headers = draw(fields)
    no_body = method == "HEAD" or status in (204, 304)
    options = ["length", "close"] + (["chunked"] if version == "1.1" else [])
    framing = draw(st.sampled_from(options))
    body, chunks_, trailers, length = b"", [], [], None
    if framing == "length":
        body = b"" if no_body else draw(bodies)
        length = draw(st.integers(0, 10**6)) if no_body else len(body)
        if not (status in (204, 304) and draw(st.booleans())):
            headers.insert(draw(st.integers(0, len(headers))), (random_case(draw, "content-length"), b"%d" % length))
        else:
            length = None
    elif framing == "chunked":
        chunks_ = [] if no_body else draw(chunk_lists)
        body = b"".join(chunks_)
        trailers = [] if no_body else draw(st.lists(st.tuples(field_names, field_values), max_size=3))
        headers.insert(draw(st.integers(0, len(headers))), (random_case(draw, "transfer-encoding"), b"chunked"))
    else:
        body = b"" if no_body else draw(bodies)
    conn = draw(st.sampled_from([None, "close", "keep-alive"]))
    if conn is not None:
        headers.insert(draw(st.integers(0, len(headers))), (random_case(draw, "connection"), random_case(draw, conn)))
    close_delimited = framing == "close" and not no_body
    keep_alive = (conn != "close" if version == "1.1" else conn == "keep-alive") and not close_delimited
    wire += serialize_response_head(status, reason, version, headers)
    if not no_body:
        wire += b"".join(map(chunk, chunks_)) + last_chunk(trailers) if framing == "chunked" else body
    heads.append(ResponseHead(status=status, reason=reason, http_version=version, headers=headers,
                              keep_alive=keep_alive, chunked=framing == "chunked" and not no_body,
                              content_length=length, close_delimited=close_delimited))
    # Bytes after a complete response are unsolicited (never part of a close-delimited body's message).
    extra = b"" if close_delimited else draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n\r\n", b"garbage"]))
    return method, wire, heads, body, trailers, close_delimited, extra


cut_lists = st.lists(st.integers(0, 1 << 16), max_size=12)


# --- HTTP/1: valid messages round-trip -------------------------------------------------------------


@SETTINGS
@given(pipelines(), cut_lists)
def test_valid_requests_round_trip_however_split(reqs, cuts):
    wire = b"".join(r[0] for r in reqs)
    events, error, leftover = run_request_reader(pieces(wire, cuts))
    assert error is None, wire
    expected: list = []
    for _, head, body, trailers in reqs:
        expected += [head] + ([Data(body)] if body else []) + [EndOfMessage(trailers)]
    assert events == expected
    assert leftover == b""


_HEAD_WITH_BODY = ResponseHead(status=200, reason="OK", http_version="1.1", headers=[(b"Content-Length", b"5")],
                               keep_alive=True, chunked=False, content_length=5, close_delimited=False)


@SETTINGS
@given(responses(), cut_lists)
@example(  # a HEAD response followed by bytes in the SAME read: those bytes are unsolicited too
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", [_HEAD_WITH_BODY], b"", [], False, b"HELLO"), [],
)
def test_valid_responses_round_trip_however_split(resp, cuts):
    method, wire, heads, body, trailers, needs_eof, extra = resp
    events, error, reader = run_response_reader(method, pieces(wire + extra, cuts), eof=needs_eof)
    assert error is None, wire
    expected = heads + ([Data(body)] if body else []) + [EndOfMessage(trailers)]
    assert events == expected
    assert reader.done and not reader.switched
    assert reader.unsolicited == bool(extra), (
        f"{extra!r} after a complete response {'went unnoticed' if extra else 'was seen'} (split at {cuts})")


def check_switch(head: bytes, after: bytes, cuts) -> None:
    events, error, reader = run_response_reader("GET", pieces(head + after, cuts), eof=False)
    assert error is None
    assert [type(e) for e in events][-2:] == [ResponseHead, EndOfMessage] and events[-2].status == 101
    assert reader.switched and reader.done
    assert reader.leftover == after, f"after the 101 the new protocol's bytes are {after!r}, got {reader.leftover!r}"


@SETTINGS
@given(st.lists(st.sampled_from([100, 102, 103]), max_size=3), fields, st.binary(max_size=200), cut_lists)
@example([100], [], b"\x81\x02hi", [])  # an interim response before the 101 (Expect: 100-continue + Upgrade)
def test_101_hands_back_exactly_the_bytes_after_its_head(interim, headers, after, cuts):
    head = b"".join(serialize_response_head(s, "Interim", "1.1", []) for s in interim)
    head += serialize_response_head(101, "Switching Protocols", "1.1", [(b"Upgrade", b"websocket")] + headers)
    check_switch(head, after, cuts)


@SETTINGS
@given(st.sampled_from(["CONNECT", "GET"]), st.binary(max_size=300), cut_lists)
def test_connect_and_upgrade_requests_hand_back_the_rest(method, after, cuts):
    if method == "CONNECT":
        head = b"CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"
    else:
        head = b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    events, error, leftover = run_request_reader(pieces(head + after, cuts))
    assert error is None
    assert events[0].method == method and events[0].upgrade
    assert leftover == after


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.sampled_from([102, 103]))
def test_many_interim_responses_do_not_count_as_one_big_head(n, status):
    """An origin may send 102 Processing for a long time: each interim head is small; only a single
    head over the limit is an error."""
    limit = 256
    interim = serialize_response_head(status, "Processing", "1.1", [(b"X-Pad", b"p" * 40)])
    assert len(interim) < limit // 2
    r = ResponseReader("GET", Limits(max_head=limit))
    for _ in range(n):
        r.feed(interim)
    r.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    evs = drain(r)
    assert len(evs) == n + 2 and evs[-2].status == 204 and r.done


# --- HTTP/1: hostile bytes -------------------------------------------------------------------------

NASTY = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b";", b"0", b"9", b"f", b"-", b"\x7f", b"\xff",
         b"chunked", b"Content-Length: ", b"Transfer-Encoding: ", b"HTTP/1.1 ", b"\r\n\r\n", b"0\r\n\r\n",
         b"GET / HTTP/1.1\r\n", b"Upgrade: h2c\r\n", b"Connection: close\r\n"]


@st.composite
def mutated(draw, base):
    """A valid message with a few mutations: bytes replaced, inserted, deleted, or a run duplicated."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "insert", "delete", "dup"]))
        if op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(NASTY) | st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            end = min(len(data), pos + draw(st.integers(1, 40)))
            data[end:end] = data[pos:end]
    return bytes(data)


request_wire = pipelines().map(lambda rs: b"".join(r[0] for r in rs))
response_wire = responses().map(lambda r: (r[0], r[1] + r[6]))
hostile_requests = st.binary(max_size=600) | mutated(request_wire)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=NO_SHRINK)
@given(hostile_requests, cut_lists)
def test_request_reader_only_declared_errors_and_split_invariant(data, cuts):
    whole = run_request_reader([data])
    split = run_request_reader(pieces(data, cuts))
    if TooManyPipelined not in (whole[1], split[1]):  # queue depth depends on draining between reads
        assert split == whole, f"outcome depends on how {data!r} is split"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=NO_SHRINK)
@given(hostile_requests, cut_lists)
def test_request_reader_with_tight_limits_only_declared_errors_and_no_head_over_them(data, cuts):
    limits = Limits(max_request_line=16, max_head=64, max_headers=3)
    events, _, _ = run_request_reader(pieces(data, cuts), limits)
    for ev in events:
        if isinstance(ev, RequestHead):
            assert len(ev.target) <= limits.max_request_line, ev
            assert len(ev.headers) <= limits.max_headers, ev
            assert sum(len(k) + len(v) + 4 for k, v in ev.headers) <= limits.max_head, ev


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["GET", "HEAD", "POST"]), st.binary(max_size=600), cut_lists)
def test_response_reader_arbitrary_bytes_only_declared_errors(method, data, cuts):
    run_response_reader(method, pieces(data, cuts))
    run_response_reader(method, pieces(data, cuts), eof=False)


@st.composite
def mutated_responses(draw):
    method, wire = draw(response_wire)
    return method, draw(mutated(st.just(wire)))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow], phases=NO_SHRINK)
@given(mutated_responses(), cut_lists)
def test_response_reader_mutations_only_declared_errors_and_split_invariant(resp, cuts):
    method, data = resp
    ev1, err1, r1 = run_response_reader(method, [data])
    ev2, err2, r2 = run_response_reader(method, pieces(data, cuts))
    assert (ev2, err2) == (ev1, err1), f"outcome depends on how {data!r} is split"
    assert (r2.done, r2.switched, r2.unsolicited) == (r1.done, r1.switched, r1.unsolicited), data
    if r1.switched:
        assert r2.leftover == r1.leftover


# --- ClientHello -----------------------------------------------------------------------------------

CAPTURES = {p.name: bytes.fromhex(p.read_text()) for p in sorted((HERE / "data").glob("clienthello_*.hex"))}


def _records(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        n = int.from_bytes(data[pos + 3:pos + 5], "big")
        out.append((data[pos], data[pos + 5:pos + 5 + n]))
        pos += 5 + n
    return out


def refragment(data: bytes, size: int) -> bytes:
    hs = b"".join(frag for _, frag in _records(data))
    return b"".join(b"\x16\x03\x01" + len(hs[i:i + size]).to_bytes(2, "big") + hs[i:i + size]
                    for i in range(0, len(hs), size))


@st.composite
def hello_mutations(draw):
    data = bytearray(CAPTURES[draw(st.sampled_from(sorted(CAPTURES)))])
    if draw(st.booleans()):
        data = bytearray(refragment(bytes(data), draw(st.integers(1, 600))))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "nudge", "insert", "delete", "truncate", "dup"]))
        if op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "nudge":  # lengths are where parsers break: +-1 on a byte (and its carry-free neighbour)
            data[pos] = (data[pos] + draw(st.sampled_from([1, -1, 0x80]))) % 256
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        else:
            end = min(len(data), pos + draw(st.integers(1, 64)))
            data[end:end] = data[pos:end]
    return bytes(data)


def outcome(data: bytes):
    try:
        return clienthello.parse(data)
    except clienthello.NeedMore:
        return "NeedMore"
    except clienthello.NotTLS:
        return "NotTLS"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hello_mutations() | st.binary(max_size=700), st.lists(st.integers(0, 1 << 16), max_size=6))
def test_clienthello_mutations_only_declared_outcomes_and_consistent_prefixes(data, cuts):
    final = outcome(data)
    if isinstance(final, clienthello.ClientHello):
        assert 0 < final.length <= len(data)
        assert final.sni is None or (final.sni == final.sni.lower() and final.sni.isascii())
        assert all(isinstance(p, str) for p in final.alpn) and all(isinstance(v, int) for v in final.versions)
        # Stable: the hello's own bytes give the same hello, whatever follows them.
        assert outcome(data[:final.length]) == final
        assert outcome(data[:final.length] + b"\x17\x03\x03\x00\x01x") == final
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        got = outcome(data[:cut])
        if isinstance(final, clienthello.ClientHello):
            # Every prefix shorter than the hello is a valid prefix of it; a longer one is the hello.
            assert got == ("NeedMore" if cut < final.length else final), (cut, got)
        elif final == "NeedMore":
            assert got == "NeedMore", f"a prefix of a valid prefix was refused: {data[:cut]!r} -> {got}"
        elif got != "NeedMore":
            # Refusal is final: a longer input never turns NotTLS into a hello.
            assert got == "NotTLS", f"{data[:cut]!r} parsed as {got} but {data!r} is NotTLS"


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_every_capture_refragmented_at_every_size_parses_the_same(name):
    data = CAPTURES[name]
    hello = clienthello.parse(data)
    hs_len = sum(len(f) for _, f in _records(data))
    for size in range(1, min(hs_len, 1 << 14) + 1, 37):
        again = refragment(data, size)
        got = clienthello.parse(again)
        assert (got.sni, got.alpn, got.versions, got.length) == (hello.sni, hello.alpn, hello.versions, len(again))


# --- the coverage-guided fuzzers, bounded, in the normal test run ----------------------------------

FUZZ_SECONDS = int(os.environ.get("HTTPSDUMP_FUZZ_SECONDS", "60"))
# A fixed seed and input count make the suite's fuzz run the same every time: a finding fails CI on a
# known input (then kept in tests/regressions), never by luck. Random exploration: tests/fuzz/run.sh.
FUZZ_SEED = os.environ.get("HTTPSDUMP_FUZZ_SEED", "20261126")
FUZZ_RUNS = os.environ.get("HTTPSDUMP_FUZZ_RUNS", "60000")
# atheris ships wheels for CPython 3.11-3.13 on Linux x86_64 only (elsewhere it needs clang's libFuzzer to
# build): where a wheel exists it must be installed (test extras), and its absence is a failure.
ATHERIS_WHEEL = sys.platform == "linux" and platform.machine() == "x86_64" and (3, 11) <= sys.version_info[:2] <= (3, 13)


def test_atheris_harnesses(tmp_path):
    """tests/fuzz/run.sh runs each harness for FUZZ_SECONDS (both at once on two cores); no harness may
    find anything, and each must really have run (thousands of inputs)."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        if ATHERIS_WHEEL:
            pytest.fail("atheris is not installed; it is in the test extras (pip install 'atheris>=3.0')")
        return mutation_fuzz_without_atheris(FUZZ_SECONDS)
    cmd = ["bash", str(HERE / "fuzz" / "run.sh"), str(FUZZ_SECONDS)]
    p = subprocess.run(cmd, capture_output=True, timeout=2 * FUZZ_SECONDS + 300,
                       env={**os.environ, "PYTHON": sys.executable, "FUZZ_OUT": str(tmp_path),
                            "FUZZ_SEED": FUZZ_SEED, "FUZZ_RUNS": FUZZ_RUNS})
    report = p.stdout.decode("utf-8", "replace") + p.stderr.decode("utf-8", "replace")
    logs = {n: (tmp_path / n / "log").read_text("utf-8", "replace") if (tmp_path / n / "log").exists() else ""
            for n in ("clienthello", "http1")}

    def excerpt(text: str) -> str:  # the crash itself when there is one, else the end of the log
        at = text.find("=== Uncaught Python exception")
        return text[at:at + 4000] if at >= 0 else text[-1500:]

    crashed = {n: t for n, t in logs.items() if "=== Uncaught Python exception" in t} or logs
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{report[-3000:]}\n" + "\n".join(
        f"--- {n} log ---\n{excerpt(text)}" for n, text in crashed.items())
    for name, text in logs.items():
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", text)
        assert runs and int(runs[-1]) >= 1000, f"{name} ran too few inputs to mean anything: {runs}\n{text[-2000:]}"


def mutation_fuzz_without_atheris(seconds: float) -> None:
    """Where atheris cannot be installed: the same harnesses (TestOneInput) fed random mutations of their
    seeds for the same time. Not coverage-guided, but the same oracle, and no silent skip."""
    import random
    import time

    sys.path.insert(0, str(HERE / "fuzz"))
    import fuzz_clienthello
    import fuzz_http1

    rng = random.Random(4)
    for harness in (fuzz_clienthello, fuzz_http1):
        pool = list(harness.seeds().values())
        deadline, runs = time.monotonic() + seconds / 2, 0
        while time.monotonic() < deadline:
            data = bytearray(rng.choice(pool))
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(data) + 1)
                op = rng.randrange(4)
                if op == 0 and pos < len(data):
                    data[pos] = rng.randrange(256)
                elif op == 1:
                    data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
                elif op == 2:
                    del data[pos:pos + rng.randint(1, 16)]
                else:
                    data[pos:pos] = data[rng.randrange(len(data) + 1):][:rng.randint(1, 64)]
            try:
                harness.TestOneInput(bytes(data))
            except Exception as e:
                raise AssertionError(f"{harness.__name__} failed on {bytes(data)!r}") from e
            if rng.random() < 0.05:
                pool.append(bytes(data))
            runs += 1
        assert runs >= 1000, f"{harness.__name__}: only {runs} inputs in {seconds / 2}s"
