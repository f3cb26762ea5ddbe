"""HTTP/2 through the real proxy (issue #7): ALPN mirrored, real TLS on both sides, real clients (curl
--http2, an h2 client over a CONNECT tunnel) and a real HTTP/2 origin (tests/h2origin.py).
Chromium over h2 is in test_e2e_chromium.py."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl

from h2origin import HELLO_BODY, H2Client, h2origin, start_h2origin  # noqa: F401  (fixtures)
from helpers import connect_to, poll, tcp_connections_to
from origin import pattern_sha256

NAME = "good.test"


def tunnel_h2(proxy, origin_port: int, *, alpn=("h2", "http/1.1"), timeout: float = 15, **kw) -> H2Client:
    """CONNECT 127.0.0.1:PORT through the proxy, TLS with SNI good.test and ALPN `alpn` (trusting the
    proxy's CA), then an H2Client on it. Fails unless h2 was selected."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    raw.sendall(f"CONNECT 127.0.0.1:{origin_port} HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        assert chunk, f"the proxy closed the tunnel: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(proxy.ca_pem))
    ctx.set_alpn_protocols(list(alpn))
    sock = ctx.wrap_socket(raw, server_hostname=NAME)
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    return H2Client(sock, f"{NAME}:{origin_port}", timeout=timeout, **kw)


def curl_h2(proxy, origin, *paths: str, extra=()):
    args = ["--http2", *connect_to(NAME, origin.port), *extra]
    for p in paths:
        args += ["-o", "/dev/null", f"https://{NAME}{p}"]
    return proxy.curl("-w", "%{http_version} %{http_code} %{size_download}\\n", *args)


def test_curl_http2_end_to_end_with_alpn_mirrored_and_one_flow_per_stream(proxy, h2origin):
    r = proxy.curl("--http2", "-D", "-", *connect_to(NAME, h2origin.port), f"https://{NAME}/hello",
                   "-H", "X-Zeta: 1", "-H", "X-Alpha: 2")
    assert r.rc == 0, r
    assert b"\r\n\r\nHTTP/2 200" in r.out, r.out[:300]  # after the proxy's "200 Connection established"
    (req,) = h2origin.wait_requests(1)
    assert req.alpn == "h2" and req.http_version == "HTTP/2"
    # names and order as curl sent them (curl's own headers, then ours, in order)
    names = [k for k, _ in req.regular_headers]
    assert names.index("x-zeta") < names.index("x-alpha")
    f = proxy.flow()
    assert f["stream_id"] == 1 and f["error"] is None
    assert f["request"]["http_version"] == "2" and f["response"]["http_version"] == "2"
    assert f["request"]["url"] == f"https://{NAME}/hello" and f["response"]["status"] == 200
    assert [k for k, _ in f["request"]["headers"]] == names  # the record is the wire, too
    assert f["tls"]["client"]["alpn"] == "h2" and f["tls"]["upstream"]["alpn"] == "h2"
    assert f["tls"]["client"]["alpn_offer"] == ["h2", "http/1.1"]
    assert f["tls"]["upstream"]["verified"] is True
    assert f["timings"]["client_tls_ms"] is not None and f["timings"]["upstream_tls_ms"] is not None


def test_h2_client_against_an_http1_only_origin_gets_http1(proxy, origin):
    r = proxy.curl("--http2", "-w", "%{http_version}", "-o", "/dev/null", *connect_to(NAME, origin.port),
                   f"https://{NAME}/hello")
    assert r.rc == 0 and r.out == b"1.1", r
    f = proxy.flow()
    assert f["request"]["http_version"] == "1.1" and "stream_id" not in f
    assert f["tls"]["client"]["alpn"] == "http/1.1" and f["tls"]["upstream"]["alpn"] == "http/1.1"


def test_no_http2_flag_speaks_http1_on_both_sides(start_proxy, h2origin):
    proxy = start_proxy("--no-http2")
    r = proxy.curl("--http2", "-w", "%{http_version}", "-o", "/dev/null", *connect_to(NAME, h2origin.port),
                   f"https://{NAME}/hello")
    assert r.rc == 0 and r.out == b"1.1", r
    (req,) = h2origin.wait_requests(1)
    assert req.alpn == "http/1.1"  # h2 was never offered to the origin
    assert proxy.flow()["tls"]["client"]["alpn"] == "http/1.1"


def test_many_concurrent_streams_on_one_connection(proxy, h2origin):
    n = 40
    paths = [f"/slow?ms=300&i={i}" for i in range(n)]
    r = curl_h2(proxy, h2origin, *paths, extra=["--parallel", "--parallel-max", str(n)])
    assert r.rc == 0, r
    assert r.out.decode().split("\n")[:-1] == [f"2 200 {len(HELLO_BODY)}"] * n, r.out
    flows = proxy.flows(n)
    assert len({f["client"] for f in flows}) == 1  # one client connection ...
    assert len({f["stream_id"] for f in flows}) == n  # ... n streams, n flows
    assert all(f["error"] is None and f["response"]["status"] == 200 for f in flows)
    assert len([c for c in h2origin.conns.values() if c.protocol == "h2"]) == 1  # one origin connection
    assert max(c.max_open_streams for c in h2origin.conns.values()) > 10  # really concurrent


def test_large_download_is_flow_controlled_end_to_end_while_small_streams_complete(proxy, h2origin):
    size = 64 << 20
    with tunnel_h2(proxy, h2origin.port, auto_ack=False, timeout=30) as c:
        c.conn.increment_flow_control_window(1 << 30)  # like browsers: a large connection window, so
        c._flush()  # only the stream's own 64 KiB window holds the big download back
        big = c.request(f"/bytes/{size}")
        req = h2origin.wait_request(f"/bytes/{size}")
        poll(lambda: req.window_blocked, timeout=15, what="the origin to be stopped by flow control")
        # the client read nothing: what the origin could send is bounded by the windows on the way
        # (client 64 KiB + the proxy's own per-stream window), not by the body's 64 MiB
        assert req.data_sent < 2 << 20, req.data_sent
        for i in range(5):  # other streams on the same connection are not blocked by it
            s = c.get(f"/hello?i={i}")
            assert s.status == 200 and bytes(s.body) == HELLO_BODY
        # now read the big one to the end, opening the window as we go
        got = hashlib.sha256()
        stream = c.streams[big]
        seen = 0
        while not stream.done:
            c.pump(10)
            if len(stream.body) > seen:
                chunk = bytes(stream.body[seen:])
                got.update(chunk)
                if not stream.done:
                    c.conn.increment_flow_control_window(len(chunk), stream_id=big)
                    c._flush()
                del stream.body[:]
                seen = 0
        assert stream.status == 200 and stream.reset_code is None
        assert got.hexdigest() == pattern_sha256(size)
    flows = proxy.flows(6)
    big_flow = next(f for f in flows if f["request"]["target"] == f"/bytes/{size}")
    assert big_flow["response"]["body"]["size"] == size and big_flow["error"] is None
    assert proxy.vm_hwm_kib() < 120 * 1024  # never buffered the body


def test_trailers_both_ways(proxy, h2origin):
    with tunnel_h2(proxy, h2origin.port) as c:
        s = c.get("/trailers", method="POST", body=b"payload", trailers=[("x-req-trailer", "yes")])
    assert s.status == 200 and s.trailers and dict(s.trailers)["x-checksum"] == hashlib.sha256(s.body).hexdigest()
    req = h2origin.wait_request("/trailers")
    poll(lambda: req.trailers is not None, what="request trailers at the origin")
    assert req.trailers == [("x-req-trailer", "yes")] and req.body == b"payload"
    f = proxy.flow()
    assert f["request"]["trailers"] == [["x-req-trailer", "yes"]]
    assert [k for k, _ in f["response"]["trailers"]][0] == "x-checksum"


def test_resets_pass_both_ways_with_their_codes(proxy, h2origin):
    with tunnel_h2(proxy, h2origin.port) as c:
        s = c.get("/reset?code=8")
        assert s.reset_code == 8  # the origin's CANCEL reaches the client unchanged
        sid = c.request("/slow?ms=5000")
        req = h2origin.wait_request("/slow")
        c.reset(sid, 11)  # ENHANCE_YOUR_CALM from the client
        poll(lambda: req.reset_code is not None, what="the client's reset at the origin")
        assert req.reset_code == 11
    flows = sorted(proxy.flows(2), key=lambda f: f["stream_id"])
    assert flows[0]["error"]["kind"] == "stream_reset" and flows[0]["error"]["side"] == "upstream"
    assert flows[0]["error"]["h2_error_code"] == 8 and flows[0]["response"]["status"] == 200
    assert flows[1]["error"]["side"] == "client" and flows[1]["error"]["h2_error_code"] == 11


def test_origin_goaway_is_absorbed_and_push_is_refused(proxy, h2origin):
    """The origin retires its connection (GOAWAY, as nginx does every 1000 requests): the proxy opens
    another one for the next requests, and the client's connection goes on as if nothing happened."""
    with tunnel_h2(proxy, h2origin.port, enable_push=True) as c:
        s = c.get("/push")
        assert s.status == 200 and not any(st.pushed_from for st in c.streams.values())
        s = c.get("/goaway")
        assert s.status == 200
        for i in range(3):  # same client connection, new origin connection
            s = c.get(f"/hello?after={i}")
            assert s.status == 200 and bytes(s.body) == HELLO_BODY
        assert c.goaway is None and not c.closed
    assert h2origin.wait_request("/push").push_allowed is False  # the proxy told the origin: no push
    after = h2origin.wait_requests(3, path="/hello")
    goaway_conn = h2origin.wait_request("/goaway").conn_id
    assert {r.conn_id for r in after} != {goaway_conn}  # they went over a new origin connection
    assert all(f["error"] is None for f in proxy.flows(5))


def test_a_retired_origin_connection_is_closed_while_the_client_stays(proxy, h2origin):
    """After the origin's GOAWAY, the retired connection's last stream ends and the proxy closes it,
    the first one of the client's connection included (it stayed open until the client left)."""
    with tunnel_h2(proxy, h2origin.port) as c:
        for path in ("/goaway", "/goaway", "/hello"):  # two retirements, three origin connections
            assert c.get(path).status == 200
        poll(lambda: tcp_connections_to(proxy.pid, h2origin.port) == 1, what="one origin connection left")
        assert c.get("/hello").status == 200 and not c.closed
    assert len({r.conn_id for r in h2origin.wait_requests(2, path="/hello")}) == 1


def test_h2_client_with_a_failing_origin_still_gets_a_readable_error(proxy):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    r = proxy.curl("--http2", "-w", "\\n%{http_version} %{http_code}", *connect_to(NAME, port), f"https://{NAME}/")
    assert r.out.endswith(b"1.1 502"), r  # the handshake finished (http/1.1) so the 502 can be read
    assert b"connection refused" in r.out
    f = proxy.flow()
    assert f["error"]["kind"] == "upstream_connect"


def test_h2_request_body_and_echo(proxy, h2origin):
    body = bytes(range(256)) * 4096  # 1 MiB: more than every window on the way
    with tunnel_h2(proxy, h2origin.port) as c:
        s = c.get("/echo", method="POST", body=body, headers=[("content-type", "application/octet-stream")],
                  timeout=30)
    assert s.status == 200 and bytes(s.body) == body
    sent = json.loads(s.header("x-echo-headers"))
    assert [k for k, _ in sent][:4] == [":method", ":scheme", ":authority", ":path"]
    f = proxy.flow()
    assert f["request"]["body"]["size"] == len(body) and f["response"]["body"]["size"] == len(body)
