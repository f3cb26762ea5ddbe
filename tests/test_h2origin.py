"""The HTTP/2 test origin (tests/h2origin.py) checked WITHOUT the proxy: curl --http2 and a raw h2 client
straight to it, over real TLS with the test PKI.

If these fail, every HTTP/2 end-to-end test is suspect.
"""

from __future__ import annotations

import hashlib
import json
import socket

import pytest

pytest.register_assert_rewrite("h2origin")  # before its import: it is also loaded as a plugin below
from h2origin import (H1_FALLBACK_BODY, H2_HELLO_HEADERS, PUSH_PARENT_BODY, PUSHED_BODY,  # noqa: E402
                      TRAILERS_BODY, H2Client)
from helpers import poll, run_curl  # noqa: E402
from origin import ENCODED, HELLO_BODY, TEXT, pattern_chunks, pattern_sha256  # noqa: E402

pytest_plugins = ["h2origin"]  # the h2origin / start_h2origin fixtures

HOST = "good.test"


def curl2(origin, pki, path: str, *args: str, host: str = HOST, http: str = "--http2"):
    return run_curl(http, *origin.resolve_args(host), *args, origin.url_for(host) + path, cacert=pki.root_pem)


def split_head(out: bytes) -> tuple[list[bytes], bytes]:
    """`curl -i` output: (the status/header lines of the LAST header block, the body)."""
    head, body = b"", out
    while body.startswith(b"HTTP/"):
        head, _, body = body.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def pattern(n: int) -> bytes:
    return b"".join(pattern_chunks(n))


@pytest.fixture
def client(h2origin, pki):
    clients: list[H2Client] = []

    def connect(origin=None, **kw) -> H2Client:
        c = H2Client.connect((origin or h2origin).port, pki.root_pem, **kw)
        clients.append(c)
        return c

    yield connect
    for c in clients:
        c.close()


# --- curl --http2 ----------------------------------------------------------------------------------------


def test_curl_hello_is_h2_and_recorded(h2origin, pki):
    r = curl2(h2origin, pki, "/hello?t=1", "-i", "-H", "X-Custom-Thing: MiXeD value")
    assert r.rc == 0, r
    lines, body = split_head(r.out)
    assert lines[0] == b"HTTP/2 200 ", lines
    assert [tuple(x.decode().split(": ", 1)) for x in lines[1:]] == H2_HELLO_HEADERS + [("content-length", "13")]
    assert body == HELLO_BODY

    (req,) = h2origin.wait_requests(1)
    assert (req.alpn, req.http_version, req.stream_id, req.method, req.scheme) == ("h2", "HTTP/2", 1, "GET", "https")
    assert req.authority == f"{HOST}:{h2origin.port}"
    assert (req.target, req.path, req.query) == ("/hello?t=1", "/hello", {"t": ["1"]})
    # Pseudo-headers first, then the regular ones in curl's order; names lowercase as on the wire.
    names = [k for k, _ in req.headers]
    assert names[:4] and all(n.startswith(":") for n in names[:4])
    assert sorted(names[:4]) == [":authority", ":method", ":path", ":scheme"]
    assert ("x-custom-thing", "MiXeD value") in req.regular_headers
    assert req.header("User-Agent").startswith("curl/")
    assert req.body == b"" and req.ended and req.trailers is None
    poll(lambda: req.response_done, what="response done")
    assert req.status == 200 and req.data_sent == len(HELLO_BODY)

    conn = h2origin.conns[req.conn_id]
    assert (conn.alpn, conn.protocol, conn.sni) == ("h2", "h2", HOST)
    assert conn.tls_version in ("TLSv1.2", "TLSv1.3")
    assert conn.push_enabled is False  # curl refuses server push unless asked
    assert h2origin.tls_ok == 1 and h2origin.tls_failures == []


def test_curl_echo_large_upload(h2origin, pki, tmp_path):
    data = pattern(300_000)  # larger than the default 65535 windows: the origin must reopen them
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    hdrs = tmp_path / "h.txt"
    r = curl2(h2origin, pki, "/echo", "--data-binary", f"@{f}", "-H", "Content-Type: application/x-test",
              "-D", str(hdrs))
    assert r.rc == 0, r
    assert r.out == data
    head = dict(line.split(": ", 1) for line in hdrs.read_text().splitlines()[1:] if ": " in line)
    echoed = json.loads(head["x-echo-headers"])
    assert echoed[0][0].startswith(":") and [":method", "POST"] in echoed
    assert ["content-length", "300000"] in echoed and ["content-type", "application/x-test"] in echoed
    assert head["content-type"] == "application/x-test"

    req = h2origin.wait_request("/echo")
    assert req.method == "POST" and req.body == data and req.ended
    assert [list(h) for h in req.headers] == echoed


def test_curl_bytes_sha256(h2origin, pki):
    n = 3 * 1024 * 1024 + 7
    r = curl2(h2origin, pki, f"/bytes/{n}")
    assert r.rc == 0, r
    assert len(r.out) == n and hashlib.sha256(r.out).hexdigest() == pattern_sha256(n)
    req = h2origin.wait_request(f"/bytes/{n}")
    poll(lambda: req.response_done, what="response done")
    assert req.data_sent == n


def test_curl_headers_route_echoes_wire_order(h2origin, pki):
    r = curl2(h2origin, pki, "/headers", "-H", "X-B: 2", "-H", "X-A: 1", "-H", "Accept: text/x-test")
    assert r.rc == 0, r
    got = json.loads(r.out)
    req = h2origin.wait_request("/headers")
    assert got == [list(h) for h in req.headers]
    regular = [k for k, _ in got if not k.startswith(":")]
    assert regular.index("x-b") < regular.index("x-a")
    assert ["accept", "text/x-test"] in got


@pytest.mark.parametrize("status", [200, 204, 404, 503])
def test_curl_status(h2origin, pki, status):
    r = curl2(h2origin, pki, f"/status/{status}", "-i")
    assert r.rc == 0, r
    lines, body = split_head(r.out)
    assert lines[0] == f"HTTP/2 {status} ".encode()
    assert body == (b"" if status == 204 else f"status {status}\n".encode())


def test_curl_interim_103_then_200(h2origin, pki):
    r = curl2(h2origin, pki, "/status/103", "-i")
    assert r.rc == 0, r
    assert r.out.startswith(b"HTTP/2 103 \r\nx-interim: 103\r\n\r\nHTTP/2 200 ")
    assert split_head(r.out)[1] == HELLO_BODY


def test_curl_gzip(h2origin, pki):
    r = curl2(h2origin, pki, "/gzip")
    assert r.rc == 0 and r.out == ENCODED["gzip"], r
    r = curl2(h2origin, pki, "/gzip", "--compressed")
    assert r.rc == 0 and r.out == TEXT, r


def test_curl_trailers(h2origin, pki):
    r = curl2(h2origin, pki, "/trailers", "-i")
    assert r.rc == 0, r
    assert TRAILERS_BODY in r.out
    # curl prints the trailer fields after the body.
    assert f"x-checksum: {hashlib.sha256(TRAILERS_BODY).hexdigest()}".encode() in r.out.split(TRAILERS_BODY, 1)[1]


def test_curl_parallel_streams_share_one_connection(h2origin, pki):
    urls = [h2origin.url_for(HOST) + f"/slow?ms=300&i={i}" for i in range(8)]
    r = run_curl("--http2", "--parallel", "--parallel-max", "8", *h2origin.resolve_args(HOST), *urls,
                 cacert=pki.root_pem)
    assert r.rc == 0, r
    assert r.out == HELLO_BODY * 8
    reqs = h2origin.wait_requests(8, path="/slow")
    assert len(reqs) == 8
    # curl waits for the first connection to learn that it multiplexes, then puts every transfer on it.
    assert len({q.conn_id for q in reqs}) == 1
    assert h2origin.conns[reqs[0].conn_id].max_open_streams >= 2


@pytest.mark.parametrize("alpn, curl_flag, negotiated", [
    (("h2", "http/1.1"), "--http1.1", "http/1.1"),   # client offers only http/1.1
    (("http/1.1",), "--http2", "http/1.1"),          # the origin does not offer h2
    ((), "--http2", None),                           # no ALPN at all
])
def test_http11_fallback(start_h2origin, pki, alpn, curl_flag, negotiated):
    o = start_h2origin(alpn=alpn)
    r = curl2(o, pki, "/hello", "-i", "--data-binary", "abc", http=curl_flag)
    assert r.rc == 0, r
    lines, body = split_head(r.out)
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert f"x-h2origin-fallback: {negotiated or 'none'}".encode() in lines
    assert body == H1_FALLBACK_BODY
    req = o.wait_request("/hello")
    assert (req.stream_id, req.alpn, req.http_version, req.method, req.body) == (0, negotiated, "HTTP/1.1", "POST",
                                                                                  b"abc")
    assert req.authority == f"{HOST}:{o.port}" and req.headers[0] == ("Host", req.authority)
    assert o.conns[req.conn_id].protocol == "http/1.1"


def test_h2_preface_without_alpn_gets_505(start_h2origin, pki):
    o = start_h2origin(alpn=())
    r = curl2(o, pki, "/hello", "-i", http="--http2-prior-knowledge")
    # curl insists on h2 here; the origin answers its preface with an HTTP/1.1 505 and closes.
    req = o.wait_request("*")
    assert req.method == "PRI" and req.status == 505 and req.alpn is None, r


def test_plain_h2c_prior_knowledge(start_h2origin):
    o = start_h2origin(None)
    assert o.url.startswith("http://")
    r = run_curl("--http2-prior-knowledge", "-i", o.url + "/hello")
    assert r.rc == 0, r
    lines, body = split_head(r.out)
    assert lines[0] == b"HTTP/2 200 " and body == HELLO_BODY
    req = o.wait_request("/hello")
    assert (req.alpn, req.scheme, req.stream_id) == (None, "http", 1)


def test_untrusting_client_is_a_tls_failure(h2origin):
    r = run_curl("--http2", *h2origin.resolve_args(HOST), h2origin.url_for(HOST) + "/hello")  # no --cacert
    assert r.rc != 0
    poll(lambda: h2origin.tls_failures, what="the TLS failure to be recorded")
    assert h2origin.requests == [] and h2origin.tls_ok == 0


# --- raw h2 client: flow control, resets, GOAWAY, push --------------------------------------------------


def test_bytes_honours_flow_control_and_counts_what_it_sent(h2origin, client):
    n = 1_000_000
    c = client(auto_ack=False)  # only open_window() lets the origin send more
    sid = c.request(f"/bytes/{n}")
    req = h2origin.wait_request(f"/bytes/{n}")

    # The default windows (65535 for the stream and the connection): exactly that much, then it waits.
    c.wait(lambda: req.window_blocked and req.data_sent == 65535, what="the origin to block on the window")
    c.wait(lambda: len(c.streams[sid].body) == 65535, what="the first window's bytes")
    assert req.window_waits == 1

    c.open_window(sid, 10_000)
    c.wait(lambda: req.window_blocked and req.window_waits == 2, what="the origin to block again")
    assert req.data_sent == 75_535
    c.wait(lambda: len(c.streams[sid].body) == 75_535, what="the next 10000 bytes")
    assert not req.response_done and not c.streams[sid].ended

    # Open the windows for the rest: everything arrives, intact.
    c.auto_ack = True
    c.open_window(sid, n)
    s = c.wait_stream(sid)
    assert s.status == 200 and s.ended and len(s.body) == n
    assert hashlib.sha256(s.body).hexdigest() == pattern_sha256(n)
    poll(lambda: req.response_done, what="response done")
    assert req.data_sent == n and not req.window_blocked


def test_small_client_initial_window_limits_each_stream(h2origin, client):
    c = client(auto_ack=False, initial_window_size=1000)
    sids = [c.request(f"/bytes/50000?i={i}") for i in range(3)]
    reqs = h2origin.wait_requests(3, path="/bytes/50000")
    assert len(reqs) == 3
    c.wait(lambda: all(r.window_blocked for r in reqs), what="every stream to block")
    assert [r.data_sent for r in reqs] == [1000, 1000, 1000]
    c.wait(lambda: all(len(c.streams[s].body) == 1000 for s in sids), what="1000 bytes per stream")


def test_client_reset_stops_the_sender(h2origin, client):
    c = client(auto_ack=False)
    sid = c.request("/bytes/5000000")
    req = h2origin.wait_request("/bytes/5000000")
    c.wait(lambda: req.window_blocked, what="the origin to block")
    c.reset(sid, 8)
    poll(lambda: req.response_done, what="the origin's handler to end")
    assert req.reset_code == 8 and req.data_sent == 65535 and not req.window_blocked
    conn = h2origin.conns[req.conn_id]
    assert conn.open_streams == 0 and conn.protocol_error is None
    assert c.get("/hello").body == HELLO_BODY  # the connection is still fine


@pytest.mark.parametrize("query, code", [("", 2), ("?code=8&bytes=100", 8)])
def test_reset_route(h2origin, client, query, code):
    c = client()
    s = c.get("/reset" + query)
    assert s.status == 200 and s.reset_code == code and not s.ended
    assert bytes(s.body) == (pattern(100) if query else b"")
    req = h2origin.wait_request("/reset")
    poll(lambda: req.response_done, what="response done")
    assert req.reset_sent == code
    assert c.get("/hello").status == 200


def test_goaway_after_answering(h2origin, client):
    c = client()
    slow = c.request("/slow?ms=1500")  # stream 1, still being answered when GOAWAY goes out (and later)
    gone = c.request("/goaway")        # stream 3
    g = c.wait_stream(gone)
    assert g.status == 200 and g.body == HELLO_BODY
    c.wait(lambda: c.goaway, what="GOAWAY")
    assert c.goaway == (0, gone)
    # A stream opened after the GOAWAY (a misbehaving client) is refused, not answered.
    late = c.request("/hello?late=1")
    assert c.wait_stream(late).reset_code == 7  # REFUSED_STREAM
    (late_req,) = h2origin.requests_with("late=1")
    assert late_req.refused and late_req.status is None
    # A graceful GOAWAY: the lower stream still completes, then the origin closes the connection.
    s = c.wait_stream(slow)
    assert s.status == 200 and s.body == HELLO_BODY
    kinds = [type(e).__name__ for e in c.events]
    assert kinds.index("ConnectionTerminated") < max(i for i, e in enumerate(c.events)
                                                      if getattr(e, "stream_id", None) == slow)
    c.wait(lambda: c.closed, what="the origin to close the connection")
    req = h2origin.wait_request("/goaway")
    conn = h2origin.conns[req.conn_id]
    assert conn.goaway_sent == (0, gone)
    poll(lambda: conn.closed, what="the origin's side closed")


def test_push_when_allowed(h2origin, client):
    c = client(enable_push=True)
    sid = c.request("/push")
    s = c.wait_stream(sid)
    assert s.status == 200 and s.body == PUSH_PARENT_BODY
    pushed = c.wait(lambda: [p for p in c.streams.values() if p.pushed_from == sid and p.done], what="the push")
    (p,) = pushed
    assert p.stream_id % 2 == 0 and p.status == 200 and p.body == PUSHED_BODY
    assert dict(p.promised_headers)[":path"] == "/pushed"
    req = h2origin.wait_request("/push")
    poll(lambda: req.response_done, what="response done")
    assert req.push_allowed is True and req.pushed_stream_id == p.stream_id
    assert h2origin.conns[req.conn_id].push_enabled


def test_no_push_when_refused(h2origin, client):
    c = client(enable_push=False)
    s = c.get("/push")
    assert s.status == 200 and s.body == PUSH_PARENT_BODY
    assert [p for p in c.streams.values() if p.pushed_from is not None] == []
    req = h2origin.wait_request("/push")
    assert req.push_allowed is False and req.pushed_stream_id is None


def test_trailers_both_ways(h2origin, client):
    c = client()
    body = b"request body\n" * 100
    trailers = [("x-client-checksum", hashlib.sha256(body).hexdigest()), ("x-second", "2")]
    s = c.wait_stream(c.request("/trailers", method="POST", body=body, trailers=trailers))
    assert s.status == 200 and dict(s.headers)["trailer"] == "x-checksum"
    assert s.body == TRAILERS_BODY
    assert s.trailers == [("x-checksum", hashlib.sha256(TRAILERS_BODY).hexdigest()),
                          ("x-request-body-sha256", hashlib.sha256(body).hexdigest())]
    req = h2origin.wait_request("/trailers")
    assert req.body == body and req.trailers == trailers and req.ended


def test_headers_recorded_exactly(h2origin, client):
    c = client()
    pseudo = [(":method", "GET"), (":path", "/headers?x=1"), (":authority", f"{HOST}:{h2origin.port}"),
              (":scheme", "https")]  # not h2's default order
    regular = [("x-dup", "one"), ("cookie", "a=1"), ("x-empty", ""), ("cookie", "b=2"), ("x-dup", "two"),
               ("accept", "*/*")]
    s = c.wait_stream(c.request("/headers", pseudo=pseudo, headers=regular))
    assert s.status == 200
    req = h2origin.wait_request("/headers")
    assert req.headers == pseudo + regular  # cookie crumbs not joined, duplicates kept, order kept
    assert json.loads(s.body) == [list(h) for h in pseudo + regular]
    assert req.header_all("x-dup") == ["one", "two"] and req.target == "/headers?x=1"


def test_many_concurrent_slow_streams(h2origin, client):
    c = client()
    sids = [c.request(f"/slow?ms=1500&i={i}") for i in range(20)]
    c.wait(lambda: len(h2origin.requests) == 20, what="20 requests at the origin")
    conn = h2origin.conns[h2origin.requests[0].conn_id]
    poll(lambda: conn.open_streams == 20, what="20 streams open at once")
    for sid in sids:
        s = c.wait_stream(sid)
        assert s.status == 200 and s.body == HELLO_BODY
    assert conn.max_open_streams == 20
    poll(lambda: conn.open_streams == 0, what="all streams answered")


def test_server_settings_and_request_window(start_h2origin, client):
    o = start_h2origin(max_concurrent_streams=5, initial_window_size=1024)
    c = client(o)
    c.wait(lambda: c.conn.remote_settings.max_concurrent_streams == 5, what="the origin's SETTINGS")
    body = pattern(100_000)  # far beyond the origin's 1024-byte stream window: it keeps reopening it
    s = c.wait_stream(c.request("/echo", method="POST", body=body))
    assert s.status == 200 and s.body == body
    assert c.conn.remote_settings.initial_window_size == 1024


def test_head_and_404(h2origin, client):
    c = client()
    s = c.get("/bytes/1000", method="HEAD")
    assert s.status == 200 and dict(s.headers)["content-length"] == "1000" and s.body == b""
    s = c.get("/nope")
    assert s.status == 404 and s.body == b"no such route\n"


def test_stop_closes_everything(start_h2origin, pki):
    o = start_h2origin()
    c = H2Client.connect(o.port, pki.root_pem)
    try:
        sid = c.request("/slow?ms=60000")
        o.wait_request("/slow")
        o.stop()
        c.wait(lambda: c.closed, what="the connection to close")
        assert not c.streams[sid].done
    finally:
        c.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", o.port), timeout=2).close()
