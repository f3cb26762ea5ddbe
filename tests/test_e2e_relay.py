"""End to end through the real proxy: upgrades, pipelining, plain HTTP in a tunnel, origins that
misbehave, and shutdown. Origins here are tiny scripted TLS servers (stdlib ssl) on 127.0.0.1."""

from __future__ import annotations

import signal
import socket
import ssl
import threading
import time

import pytest
from helpers import open_tunnel, read_response, run_curl, https


class ScriptedOrigin:
    """A TLS server on 127.0.0.1 that runs `script(sock)` for each connection, in a thread. With
    `tls=False` the script gets the raw TCP socket and does TLS itself with `self.ctx` (an origin
    that must control how its TLS records meet the wire)."""

    def __init__(self, pki, script, flavour: str = "good", *, tls: bool = True):
        leaf = pki.leaves[flavour]
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(leaf.serve), str(leaf.key))
        self.script = script
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw) -> None:
        try:
            if not self.tls:
                with raw:
                    self.script(raw)
                return
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                s.settimeout(10)
                self.script(s)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.listener.close()


def read_head(s) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(4096)
        if not data:
            break
        buf += data
    return buf


@pytest.fixture
def scripted(pki):
    made = []

    def make(script, flavour="good"):
        o = ScriptedOrigin(pki, script, flavour)
        made.append(o)
        return o

    yield make
    for o in made:
        o.close()


def test_websocket_upgrade_becomes_a_raw_two_way_relay(proxy, scripted):
    def ws(s):
        head = read_head(s)
        assert b"Upgrade: websocket" in head
        s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nserver-first")
        while True:
            data = s.recv(4096)
            if not data:
                return
            s.sendall(data.upper())

    origin = scripted(ws)
    with proxy.tunnel(f"127.0.0.1:{origin.port}", "good.test") as t:
        t.sock.sendall(b"GET /chat HTTP/1.1\r\nHost: good.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                       b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        resp = read_response(t.rfile, "GET")
        assert resp.status == 101
        got = b""
        while len(got) < len(b"server-first"):
            got += t.rfile.read1(100)
        assert got == b"server-first"
        for msg in (b"hello", b"x" * 50000):
            t.sock.sendall(msg)
            echoed = b""
            while len(echoed) < len(msg):
                echoed += t.rfile.read1(65536)
            assert echoed == msg.upper()
    flow = proxy.flow()
    assert flow["response"]["status"] == 101 and flow["upgraded"] == "websocket"
    assert flow["request"]["url"] == f"https://good.test/chat"


def test_pipelined_requests_are_answered_in_order(proxy, origin, token):
    with proxy.tunnel(f"127.0.0.1:{origin.port}", "good.test") as t:
        t.sock.sendall(b"".join(
            f"GET /headers?{token}-{i} HTTP/1.1\r\nHost: good.test\r\nX-Seq: {i}\r\n\r\n".encode() for i in range(5)))
        for i in range(5):
            resp = read_response(t.rfile, "GET")
            assert resp.status == 200 and f"X-Seq: {i}".encode() in resp.body
    flows = proxy.flows(5)
    assert [f["request"]["target"] for f in flows] == [f"/headers?{token}-{i}" for i in range(5)]


def test_plain_http_inside_a_connect_tunnel(proxy, origins, token):
    plain = origins["plain"]
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.sendall(f"CONNECT 127.0.0.1:{plain.port} HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n\r\n".encode())
    f = s.makefile("rb")
    assert read_response(f, "CONNECT").status == 200
    s.sendall(f"GET /hello?{token} HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n\r\n".encode())
    resp = read_response(f, "GET")
    assert resp.status == 200
    s.close()
    flow = proxy.flow()
    assert flow["mode"] == "tunnel-http" and flow["request"]["url"].startswith("http://127.0.0.1:")
    assert flow["response"]["status"] == 200 and flow["tls"] is None or flow["tls"].get("upstream") is None


def test_origin_dying_mid_body_is_logged_and_the_proxy_keeps_serving(proxy, scripted, origin):
    def dies(s):
        read_head(s)
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        s.close()

    bad = scripted(dies)
    r = run_curl(*https("good.test", bad, "/x"), proxy_url=proxy.url, cacert=proxy.ca_pem)
    assert r.rc == 18 or r.rc == 56, str(r)  # partial file / receive failure: never a "complete" body
    flow = proxy.flow()
    assert flow["error"]["kind"] == "upstream_protocol" and flow["response"]["status"] == 200
    assert flow["response"]["body"]["size"] == 1000
    ok = run_curl(*https("good.test", origin, "/hello"), proxy_url=proxy.url, cacert=proxy.ca_pem)
    assert ok.rc == 0, str(ok)


def test_origin_closing_without_response_gives_502(proxy, scripted):
    def silent(s):
        read_head(s)
        s.close()

    bad = scripted(silent)
    r = run_curl("-w", "%{http_code}", *https("good.test", bad, "/x"), proxy_url=proxy.url, cacert=proxy.ca_pem)
    assert r.out.endswith(b"502") and b"closed the connection" in r.out, str(r)


def test_ambiguous_origin_response_gives_502_and_is_not_relayed(proxy, scripted):
    def smuggles(s):
        read_head(s)
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")

    bad = scripted(smuggles)
    r = run_curl("-w", "%{http_code}", *https("good.test", bad, "/x"), proxy_url=proxy.url, cacert=proxy.ca_pem)
    assert r.out.endswith(b"502") and b"hello" not in r.out, str(r)
    assert proxy.flow()["error"]["kind"] == "upstream_protocol"


def test_sigterm_finishes_the_exchange_in_flight_and_exits_0(start_proxy, scripted):
    gate = threading.Event()

    def slow(s):
        read_head(s)
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        gate.wait(10)
        s.sendall(b"cd")

    origin = scripted(slow)
    p = start_proxy()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=run_curl(*https("good.test", origin, "/x"),
                                                                 proxy_url=p.url, cacert=p.ca_pem)))
    t.start()
    from helpers import poll

    poll(lambda: origin.connections >= 1, what="the origin to see the request")
    p.proc.send_signal(signal.SIGTERM)
    gate.set()
    t.join(20)
    assert result["r"].rc == 0 and result["r"].out == b"abcd", str(result["r"])
    assert p.proc.wait(15) == 0
    p._finished = True  # it exited on purpose: the fixture must not report it as a crash
    assert "Traceback" not in p.stderr_text()
    assert len(p.read_flows()) == 1  # the in-flight exchange was logged before exit


def test_connect_to_the_proxy_itself_is_refused(proxy):
    t = open_tunnel(proxy.port, f"127.0.0.1:{proxy.port}", "good.test", proxy.ca_pem)
    assert t.sock is None and t.connect.status == 400 and b"proxy itself" in t.connect.body


def test_streaming_response_is_shown_when_it_starts_and_logged_when_it_ends(start_proxy, scripted):
    gate = threading.Event()

    def sse(s):
        read_head(s)
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"d\r\ndata: hello\n\n\r\n")
        gate.wait(20)
        s.sendall(b"d\r\ndata: world\n\n\r\n0\r\n\r\n")

    origin = scripted(sse)
    p = start_proxy(verbose=False)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=run_curl(*https("good.test", origin, "/events"),
                                                                 proxy_url=p.url, cacert=p.ca_pem)))
    t.start()
    from helpers import poll

    try:
        # Shown on the console while the origin still holds the stream open...
        poll(lambda: "streaming" in p.stdout_text(), timeout=15, what="the console to show the stream")
        assert "/events" in p.stdout_text() and "200" in p.stdout_text()
        assert p.read_flows() == []  # ...but the complete record is written only when it ends
    finally:
        gate.set()
        t.join(30)
    assert result["r"].out == b"data: hello\n\ndata: world\n\n", str(result["r"])
    flow = p.flow()
    assert flow["response"]["body"]["text"] == "data: hello\n\ndata: world\n\n"


def test_a_second_signal_exits_at_once(start_proxy, scripted):
    gate = threading.Event()

    def stuck(s):
        read_head(s)
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        gate.wait(30)  # never finishes by itself within the test

    origin = scripted(stuck)
    p = start_proxy()
    t = threading.Thread(target=lambda: run_curl(*https("good.test", origin, "/x"), proxy_url=p.url,
                                                 cacert=p.ca_pem, timeout=30))
    t.start()
    from helpers import poll

    try:
        poll(lambda: origin.connections >= 1, what="the exchange to be in flight")
        p.proc.send_signal(signal.SIGTERM)
        poll(lambda: "shutting down" in p.stderr_text(), what="the first signal to be handled")
        assert p.proc.poll() is None  # the in-flight exchange holds the graceful shutdown...
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(3) == 0  # ...and a second signal ends it at once, well inside the 5 s grace
        p._finished = True  # it exited on purpose: the fixture must not report it as a crash
    finally:
        gate.set()
        t.join(30)


# --- TLS handshakes that stall: bounded by handshake_timeout on either side ---------------------------

def _config(tmp_path, text: str):
    cfg = tmp_path / "timeouts.toml"
    cfg.write_text(text)
    return cfg


def test_a_client_that_stalls_in_its_tls_handshake_is_dropped_and_logged(start_proxy, tmp_path, origins):
    p = start_proxy("--config", str(_config(tmp_path, "handshake_timeout = 1\n")))
    good = origins["good"]
    s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    s.sendall(f"CONNECT 127.0.0.1:{good.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    # A real ClientHello, then silence: the client never sends its Finished.
    tls = ssl.create_default_context(cafile=str(p.ca_pem)).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                                     server_hostname="good.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    s.sendall(out.read())
    t0 = time.monotonic()
    got = b""
    while True:  # the proxy's flight (ServerHello ... Finished), then its close
        data = s.recv(65536)
        if not data:
            break
        got += data
    waited = time.monotonic() - t0
    s.close()
    assert got[:1] == b"\x16", "the proxy answered the ClientHello"
    assert 0.8 <= waited < 8, f"dropped after {waited:.1f} s, handshake_timeout is 1 s"
    err = p.flow()["error"]
    assert err["kind"] == "client_timeout" and "did not complete in time" in err["message"], err


def _never_answers(raw) -> None:
    """An origin that reads the ClientHello and never answers (a TLS server that hangs)."""
    raw.settimeout(30)
    while raw.recv(65536):
        pass


def test_an_origin_that_never_answers_the_tls_handshake_gives_504(start_proxy, tmp_path, pki):
    p = start_proxy("--config", str(_config(tmp_path, "handshake_timeout = 1\n")))
    origin = ScriptedOrigin(pki, _never_answers, tls=False)
    try:
        t0 = time.monotonic()
        r = p.curl("-s", "-w", "\n%{http_code}", *https("good.test", origin, "/hello"))
        waited = time.monotonic() - t0
        assert origin.connections == 1
        body, _, code = r.out.rpartition(b"\n")
        assert code == b"504", str(r)
        assert b"TLS handshake with good.test timed out after 1 s" in body, body
        assert waited < 10, waited
        err = p.flow()["error"]
        assert err["kind"] == "upstream_timeout" and err["status"] == 504, err
    finally:
        origin.close()


# --- waiting for the client: header_timeout (first head) and idle_timeout (between requests) --------

def test_a_kept_alive_connection_lives_while_used_and_closes_when_idle(start_proxy, tmp_path, origins):
    p = start_proxy("--config", str(_config(tmp_path, "idle_timeout = 1\n")))
    plain = origins["plain"]
    s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    f = s.makefile("rb")
    req = f"GET http://127.0.0.1:{plain.port}/hello HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n\r\n".encode()
    for i in range(4):  # 4 x 0.6 s on one connection: each request starts a new idle second
        if i:
            time.sleep(0.6)
        s.sendall(req)
        assert read_response(f).status == 200, f"request {i + 1}"
    t0 = time.monotonic()
    assert f.read() == b"", "the proxy closes the idle connection"
    waited = time.monotonic() - t0
    s.close()
    assert 0.8 <= waited < 5, f"closed after {waited:.1f} s idle, idle_timeout is 1 s"
    assert [r["response"]["status"] for r in p.flows(4)] == [200] * 4


def test_a_request_head_that_stalls_gets_408(start_proxy, tmp_path, origins):
    p = start_proxy("--config", str(_config(tmp_path, "header_timeout = 1\n")))
    plain = origins["plain"]
    s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    s.sendall(f"GET http://127.0.0.1:{plain.port}/hello HTTP/1.1\r\nHost: x\r\n".encode())  # no end of head
    t0 = time.monotonic()
    resp = read_response(s.makefile("rb"))
    waited = time.monotonic() - t0
    s.close()
    assert resp.status == 408 and b"no complete request head within 1 s" in resp.body, resp
    assert 0.8 <= waited < 5, waited
    assert p.flow()["error"]["kind"] == "client_timeout"
