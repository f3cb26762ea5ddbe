"""Request smuggling and hostile framing, end to end through ONE real proxy process (issue #4).

Requests: every ambiguous or malformed request gets its 4xx from the proxy and is never forwarded: the
origin, which records every request it receives, has nothing with the test's token. Four ways in:

* ``tunnel-tls``     CONNECT + TLS to origins["good"], the bad request is the tunnel's first;
* ``tunnel-http``    CONNECT to origins["plain"], plain HTTP inside the tunnel;
* ``forward``        absolute-form request to origins["plain"] (plain forward proxy);
* ``forward-second`` the same, but as the second request of a kept-alive connection whose first request
                     was served normally (the realistic smuggling position).

Responses: an origin that answers with the same defects (scripted, over TLS and plain) makes the proxy
answer 502 naming the cause; the ambiguous body never reaches the client, and the flow's error kind is
``upstream_protocol``.

After every case the same proxy still serves a normal request, is alive, and has printed no traceback.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
import uuid

import pytest

from helpers import ProxyProc, open_tunnel, poll, read_response
from origin import HELLO_BODY
from test_e2e_relay import ScriptedOrigin, read_head

# --- one proxy for the whole module ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_proxy(pki, tmp_path_factory):
    p = ProxyProc(tmp_path_factory.mktemp("smuggling-proxy"), pki.root_pem)
    p.start()
    yield p
    problems = p.finish()
    assert not problems, "\n".join(problems)


@pytest.fixture(autouse=True)
def _stderr_mark(request):
    """Where the shared proxy's stderr stood when this test began: a traceback is blamed on its test only."""
    if "shared_proxy" in request.fixturenames:
        p = request.getfixturevalue("shared_proxy")
        p.stderr_mark = len(p.stderr_bytes())
    yield


def records_since(proxy: ProxyProc, mark: int, count: int) -> list[dict]:
    return proxy.flows(mark + count)[mark:]


def assert_healthy(proxy: ProxyProc) -> None:
    assert proxy.alive(), f"the proxy died\n{proxy.stderr_text()[-4000:]}"
    new = proxy.stderr_bytes()[getattr(proxy, "stderr_mark", 0):].decode("utf-8", "replace")
    assert "Traceback" not in new, f"the proxy printed a traceback during this test\n{new[-6000:]}"


def still_serves(proxy: ProxyProc, origins) -> None:
    """A normal request through the same proxy, both ways in, right after a hostile one."""
    mark = len(proxy.read_flows())
    good, plain = origins["good"], origins["plain"]
    with open_tunnel(proxy.port, f"127.0.0.1:{good.port}", "good.test", proxy.ca_pem) as t:
        assert t.sock is not None, f"the proxy stopped accepting CONNECT: {t.connect}"
        r = t.request(b"GET /hello HTTP/1.1\r\nHost: good.test\r\n\r\n")
        assert (r.status, r.body) == (200, HELLO_BODY), f"the proxy stopped serving HTTPS requests: {r}"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s, s.makefile("rb") as f:
        s.sendall(f"GET http://127.0.0.1:{plain.port}/hello HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n\r\n".encode())
        r = read_response(f)
        assert (r.status, r.body) == (200, HELLO_BODY), f"the proxy stopped serving forward-proxy requests: {r}"
    recs = records_since(proxy, mark, 2)
    assert sorted((f["mode"], f["error"], f["response"]["status"]) for f in recs) == [
        ("http", None, 200), ("https", None, 200)], recs
    assert_healthy(proxy)


def recv_all(sock, deadline: float, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (or the deadline, or `limit` bytes)."""
    out = b""
    while len(out) < limit:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            break
        except (ConnectionResetError, ssl.SSLError, OSError):
            break
        if not data:
            break
        out += data
    return out


# --- requests --------------------------------------------------------------------------------------

# {hello} / {upload}: request targets (origin-form in a tunnel, absolute-form in forward mode), which carry
# the test's token; {host}: the Host header value.
_CHUNKED_ABC = "3\r\nabc\r\n0\r\n\r\n"
REQUESTS = {
    # RFC 9112 §6.1 / §6.3 rule 3: both framings at once (either order).
    "cl-and-te": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-and-cl": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    # §6.3 rule 5: differing Content-Lengths, as two fields or as a list.
    "two-differing-cl": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl-list-differing": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3, 4\r\n\r\nabcd",
    "cl-not-a-number": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nContent-Length: +4\r\n\r\nabcd",
    "cl-overflow": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 99999999999999999999999\r\n\r\nabcd",
    # §6.3 rule 4: a request whose Transfer-Encoding does not end in chunked; §7: chunked at most once.
    "te-gzip": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te-chunked-then-gzip": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + _CHUNKED_ABC,
    "te-chunked-gzip-two-fields": ("POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                                   "Transfer-Encoding: gzip\r\n\r\n" + _CHUNKED_ABC),
    "te-chunked-twice": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked, chunked\r\n\r\n" + _CHUNKED_ABC,
    "te-chunked-two-fields": ("POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                              "Transfer-Encoding: chunked\r\n\r\n" + _CHUNKED_ABC),
    "te-xchunked": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: xchunked\r\n\r\n" + _CHUNKED_ABC,
    "te-vertical-tab": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: \x0bchunked\r\n\r\n" + _CHUNKED_ABC,
    # RFC 9112 §6.1: "A server or client that receives an HTTP/1.0 message containing a Transfer-Encoding
    # header field MUST treat the message as if the framing is faulty": a 1.0 hop behind would read the
    # chunks as the next request.
    "te-in-http10": "POST {upload} HTTP/1.0\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n" + _CHUNKED_ABC,
    # §7.1: invalid chunk sizes.
    "chunk-size-not-hex": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    "chunk-size-negative": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-0x": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
    "chunk-size-overflow": ("POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
                            "1ffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
    "chunk-data-overrun": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
    # §5.2 obs-fold, §2.2 bare CR, NUL, §5.1 whitespace between field name and colon.
    "obs-fold-space": "GET {hello} HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n folded\r\n\r\n",
    "obs-fold-tab": "GET {hello} HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n\tfolded\r\n\r\n",
    "bare-cr-in-value": "GET {hello} HTTP/1.1\r\nHost: {host}\r\nX-A: a\rb\r\n\r\n",
    "bare-cr-line-end": "GET {hello} HTTP/1.1\r\nHost: {host}\rX-A: b\r\n\r\n",
    "nul-in-value": "GET {hello} HTTP/1.1\r\nHost: {host}\r\nX-A: a\x00b\r\n\r\n",
    "nul-in-name": "GET {hello} HTTP/1.1\r\nHost: {host}\r\nX-\x00A: b\r\n\r\n",
    "space-before-colon": "GET {hello} HTTP/1.1\r\nHost: {host}\r\nX-A : b\r\n\r\n",
    "tab-before-colon": "GET {hello} HTTP/1.1\r\nHost: {host}\r\nX-A\t: b\r\n\r\n",
    "space-before-colon-te": "POST {upload} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding : chunked\r\n\r\n" + _CHUNKED_ABC,
    # Limits (README / config defaults): request line 8 KiB → 414; header block 64 KiB, 100 fields → 431.
    "request-line-over-8k": "GET {hello}&pad=" + "a" * 9000 + " HTTP/1.1\r\nHost: {host}\r\n\r\n",
    "header-block-over-64k": ("GET {hello} HTTP/1.1\r\nHost: {host}\r\n"
                              + "".join(f"X-Filler-{i}: {'a' * 8000}\r\n" for i in range(9)) + "\r\n"),
    "over-100-headers": "GET {hello} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"X-F{i}: a\r\n" for i in range(100)) + "\r\n",
}
STATUS = {"request-line-over-8k": 414, "header-block-over-64k": 431, "over-100-headers": 431}
MODES = ("tunnel-tls", "tunnel-http", "forward", "forward-second")


def test_the_request_cases_are_what_they_say():
    """Guard against a typo turning a case into a well-formed request (which would prove nothing)."""
    assert len(REQUESTS["request-line-over-8k"].split("\r\n", 1)[0]) > 8192
    assert len(REQUESTS["header-block-over-64k"]) > 64 * 1024
    assert REQUESTS["over-100-headers"].count("\r\nX-F") == 100  # plus Host: 101 fields
    for name, tmpl in REQUESTS.items():
        assert "{hello}" in tmpl or "{upload}" in tmpl, name


def _connect(proxy: ProxyProc, target: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: nothing of what follows is read ahead
        c = s.recv(1)
        assert c, f"the proxy closed the connection after {head!r}"
        head += c
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def send_hostile(proxy: ProxyProc, origins, mode: str, raw_template: str, token: str):
    """Send the request in `mode`; return (response, bytes of the whole answer stream)."""
    good, plain = origins["good"], origins["plain"]
    if mode == "tunnel-tls":
        prefix, host = "", "good.test"
    elif mode == "tunnel-http":
        prefix, host = "", f"127.0.0.1:{plain.port}"
    else:
        prefix, host = f"http://127.0.0.1:{plain.port}", f"127.0.0.1:{plain.port}"
    raw = (raw_template.replace("{hello}", f"{prefix}/hello?t={token}")
           .replace("{upload}", f"{prefix}/upload?t={token}").replace("{host}", host)).encode("latin-1")
    if mode == "tunnel-tls":
        t = open_tunnel(proxy.port, f"127.0.0.1:{good.port}", "good.test", proxy.ca_pem)
        assert t.sock is not None, t.connect
        sock, rfile = t.sock, t.rfile
    elif mode == "tunnel-http":
        sock = _connect(proxy, f"127.0.0.1:{plain.port}")
        rfile = sock.makefile("rb")
    else:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        rfile = sock.makefile("rb")
        if mode == "forward-second":
            sock.sendall(f"GET {prefix}/hello?ok={token} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            first = read_response(rfile)
            assert first.status == 200 and first.body == HELLO_BODY, first
    try:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy may answer and close before reading all of a too-large head
        resp = read_response(rfile, "POST")
        rest = recv_all(sock, time.monotonic() + 5)  # the proxy must close after a framing error
        return resp, rest
    finally:
        rfile.close()
        sock.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_hostile_request_is_refused_and_never_forwarded(shared_proxy, origins, mode, case):
    proxy = shared_proxy
    token = uuid.uuid4().hex
    dest = origins["good"] if mode == "tunnel-tls" else origins["plain"]
    mark = len(proxy.read_flows())
    expected = STATUS.get(case, 400)
    resp, rest = send_hostile(proxy, origins, mode, REQUESTS[case], token)
    assert resp.status == expected, (f"{case} in {mode}: expected {expected}, got {resp.status} {resp.reason}\n"
                                     f"{resp.raw_head!r}{resp.body[:300]!r}")
    assert resp.body.startswith(b"httpsdump: "), resp.body[:300]  # the proxy's own answer, with the reason
    assert (resp.header("Connection") or "").lower() == "close", resp.raw_head
    assert rest == b"", f"bytes after the error response: {rest[:300]!r}"
    assert dest.requests_with(f"t={token}") == [], f"{case} in {mode} reached the origin"

    # Exactly one error record for the refused request (plus the served first request in forward-second).
    served = 1 if mode == "forward-second" else 0
    recs = records_since(proxy, mark, served + 1)
    errors = [f for f in recs if f["error"] is not None]
    assert len(errors) == 1, json.dumps(recs)[:3000]
    assert errors[0]["error"]["status"] == expected and errors[0]["error"]["side"] == "client", errors[0]["error"]
    assert errors[0]["response"] is None, errors[0]
    assert all(f["response"] and f["response"]["status"] == 200 for f in recs if f["error"] is None), recs

    still_serves(proxy, origins)
    assert dest.requests_with(f"t={token}") == [], f"{case} in {mode} reached the origin"


# --- responses -------------------------------------------------------------------------------------


class PlainScriptedOrigin(ScriptedOrigin):
    """test_e2e_relay's ScriptedOrigin without TLS (for the forward-proxy way in)."""

    def _one(self, raw) -> None:
        try:
            with raw:
                raw.settimeout(10)
                self.script(raw)
        except OSError:
            pass


class Defect:
    """A connection script: read one request head, answer with `response` in ONE write, optionally send
    `then` once `go` is set, then hold the connection until the proxy closes it (bounded), so nothing
    depends on the origin's EOF. Records the request targets received."""

    def __init__(self, response: bytes, then: bytes = b""):
        self.response, self.then = response, then
        self.go = threading.Event()
        self.targets: list[str] = []

    def __call__(self, s) -> None:
        head = read_head(s)
        if b"\r\n\r\n" not in head:
            return
        self.targets.append(head.split(b" ", 2)[1].decode("latin-1"))
        s.sendall(self.response)
        if self.then and self.go.wait(10):
            s.sendall(self.then)
        s.settimeout(5)
        while s.recv(4096):
            pass


@pytest.fixture
def defective(pki):
    made = []

    def make(defect: Defect, tls: bool) -> ScriptedOrigin:
        o = ScriptedOrigin(pki, defect) if tls else PlainScriptedOrigin(pki, defect)
        made.append(o)
        return o

    yield make
    for o in made:
        o.close()


MARK = "SMUGGLED-BODY"
_SMUGGLED_NEXT = (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n" + MARK.encode())
RESPONSES = {
    # name: (response bytes, what the 502 must name (regex, case-insensitive))
    "cl-and-te": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n0\r\n\r\n" + _SMUGGLED_NEXT, r"content-length.*transfer-encoding|transfer-encoding.*content-length"),
    "te-and-cl": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                  b"5\r\nhello\r\n0\r\n\r\n" + _SMUGGLED_NEXT, r"content-length.*transfer-encoding|transfer-encoding.*content-length"),
    "two-differing-cl": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 54\r\n\r\nhello" + _SMUGGLED_NEXT,
                         r"content-length"),
    "cl-list-differing": (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 54\r\n\r\nhello" + _SMUGGLED_NEXT, r"content-length"),
    "bad-chunk-size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + MARK.encode() + b"\r\n0\r\n\r\n",
                       r"chunk"),
    "chunked-twice": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
                      b"d\r\n" + MARK.encode() + b"\r\n0\r\n\r\n", r"transfer-encoding|chunk"),
    "nul-in-header": (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 13\r\n\r\n" + MARK.encode(), r"header"),
    "obs-fold": (b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 13\r\n\r\n" + MARK.encode(), r"header|whitespace|fold"),
    "bare-cr-in-header": (b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 13\r\n\r\n" + MARK.encode(), r"header|LF|CR"),
    "space-before-colon": (b"HTTP/1.1 200 OK\r\nContent-Length : 13\r\n\r\n" + MARK.encode(), r"header"),
    # The proxy's head limits hold for the origin too, and exceeding them is the origin's fault (502, not 431).
    "over-100-header-fields": (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
                               + b"Content-Length: 13\r\n\r\n" + MARK.encode(), r"header"),
    "header-block-over-64k": (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 8000) for i in range(9))
                              + b"Content-Length: 13\r\n\r\n" + MARK.encode(), r"header"),
}


def _get_through_proxy(proxy: ProxyProc, port: int, tls: bool, token: str, *, wait_for: bytes = b"",
                       then=None) -> bytes:
    """A GET to the origin on `port` through the proxy; everything the client receives until close.
    When `wait_for` has been received, `then()` is called once (to let the origin go on)."""
    deadline = time.monotonic() + 5
    if tls:
        t = open_tunnel(proxy.port, f"127.0.0.1:{port}", "good.test", proxy.ca_pem)
        assert t.sock is not None, t.connect
        with t:
            t.sock.sendall(f"GET /r?t={token} HTTP/1.1\r\nHost: good.test\r\n\r\n".encode())
            out = b""
            while time.monotonic() < deadline:
                try:
                    t.sock.settimeout(max(0.05, deadline - time.monotonic()))
                    data = t.rfile.read1(65536)
                except (OSError, ssl.SSLError):
                    break
                if not data:
                    break
                out += data
                if then is not None and wait_for in out:
                    then()
                    then = None
            return out
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(f"GET http://127.0.0.1:{port}/r?t={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        out = b""
        if then is not None:
            while wait_for not in out and time.monotonic() < deadline:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                data = s.recv(65536)
                if not data:
                    break
                out += data
            then()
        return out + recv_all(s, deadline)


def _the_flow(proxy: ProxyProc, token: str) -> dict:
    def find():
        mine = [f for f in proxy.read_flows() if f["request"] and token in f["request"]["url"]]
        return mine or None

    mine = poll(find, timeout=10, what=f"the flow of {token}")
    assert len(mine) == 1, json.dumps(mine)[:3000]
    return mine[0]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
@pytest.mark.parametrize("case", sorted(RESPONSES))
def test_defective_response_gives_502_and_is_not_relayed(shared_proxy, origins, defective, case, tls):
    proxy = shared_proxy
    response, cause = RESPONSES[case]
    defect = Defect(response)
    origin = defective(defect, tls)
    token = uuid.uuid4().hex
    got = _get_through_proxy(proxy, origin.port, tls, token)
    assert got.startswith(b"HTTP/1.1 502 "), f"{case} ({'tls' if tls else 'plain'}): expected 502, got {got[:400]!r}"
    head, _, body = got.partition(b"\r\n\r\n")
    assert body.startswith(b"httpsdump: ") and re.search(cause, body.decode("latin-1"), re.I | re.S), \
        f"the 502 does not name the cause ({cause}): {body[:400]!r}"
    assert MARK.encode() not in got and b"hello" not in got.replace(b"httpsdump", b""), got[:600]
    assert defect.targets == [f"/r?t={token}"]  # the request itself went through, once
    flow = _the_flow(proxy, token)
    assert flow["error"] is not None and flow["error"]["kind"] == "upstream_protocol", flow["error"]
    assert flow["error"]["status"] == 502 and flow["error"]["side"] == "upstream", flow["error"]
    still_serves(proxy, origins)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_bad_chunk_after_the_head_was_relayed_ends_the_connection_incomplete(shared_proxy, origins, defective, tls):
    """Once the head has gone to the client a 502 is impossible; the client must then see an incomplete
    message (no last chunk) and nothing of what follows the defect, and the flow carries the error."""
    proxy = shared_proxy
    defect = Defect(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
                    then=b"zz\r\n" + MARK.encode() + b"\r\n0\r\n\r\n")
    origin = defective(defect, tls)
    token = uuid.uuid4().hex
    # The defect is sent only once the client has the head and the first chunk: a later read, for sure.
    got = _get_through_proxy(proxy, origin.port, tls, token, wait_for=b"first\r\n", then=defect.go.set)
    assert got.startswith(b"HTTP/1.1 200 "), got[:400]
    assert MARK.encode() not in got, got[:600]
    assert not got.endswith(b"0\r\n\r\n"), f"the client got a complete chunked body: {got[-200:]!r}"
    flow = _the_flow(proxy, token)
    assert flow["error"]["kind"] == "upstream_protocol" and re.search("chunk", flow["error"]["message"], re.I), flow
    assert flow["response"]["status"] == 200 and flow["response"]["body"]["size"] == 5, flow["response"]
    still_serves(proxy, origins)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_interim_response_with_a_body_in_a_later_read_gives_502(shared_proxy, origins, defective, tls):
    """Found by the http1 fuzzer: a 1xx "with" a chunked body whose end arrives in a later read. A 1xx
    cannot have content or framing headers (RFC 9110 §15.2, §6.1, §8.6), so the client gets a 502 naming
    the cause, either at once (the 1xx refused at its head) or after the 1xx was relayed; with an error
    record; never an internal error, never the final response that follows."""
    proxy = shared_proxy
    defect = Defect(b"HTTP/1.1 150 Odd Interim\r\nTransfer-Encoding: chunked\r\n\r\n",
                    then=b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n" + MARK.encode())
    origin = defective(defect, tls)
    token = uuid.uuid4().hex
    # The rest follows only once the client has the relayed 1xx head (if the proxy relays it at all).
    got = _get_through_proxy(proxy, origin.port, tls, token, wait_for=b"Odd Interim\r\n\r\n", then=defect.go.set)
    assert_healthy(proxy)
    final = got.split(b"\r\n\r\n", 1)[1] if got.startswith(b"HTTP/1.1 150 Odd Interim\r\n") else got
    assert final.startswith(b"HTTP/1.1 502 ") and b"httpsdump: " in final, got[:600]
    assert MARK.encode() not in got, got[:600]
    flow = _the_flow(proxy, token)
    assert flow["error"] is not None and flow["error"]["kind"] == "upstream_protocol", flow["error"]
    still_serves(proxy, origins)
