"""Access and secrets: proxy authentication, exposure rules, redaction, connection and pipelining limits."""

from __future__ import annotations

import base64
import socket

import pytest
from helpers import https, read_response, run_cli, run_curl

from proxy.config import Config, load_config
from proxy.errors import ConfigError
from proxy.server import ProxyServer


def test_proxy_auth_challenges_and_accepts(start_proxy, origin, origins, token):
    p = start_proxy("--proxy-auth", "alice:s3cret")
    # No credentials: 407 with a Basic challenge, both for CONNECT and for forward requests.
    r = run_curl("-w", "%{http_code}", *https("good.test", origin, f"/hello?{token}"), proxy_url=p.url,
                 cacert=p.ca_pem)
    assert r.rc != 0 or r.out.endswith(b"407"), str(r)
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    s.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
    resp = read_response(s.makefile("rb"), "CONNECT")
    assert resp.status == 407 and "Basic" in (resp.header("Proxy-Authenticate") or "")
    s.close()
    wrong = run_curl("-w", "%{http_code}", "-U", "alice:nope", f"http://127.0.0.1:{origins['plain'].port}/hello",
                     proxy_url=p.url)
    assert wrong.out.endswith(b"407"), str(wrong)
    # Right credentials: both modes work, and the credentials never reach the origin.
    ok = run_curl("-U", "alice:s3cret", *https("good.test", origin, f"/hello?{token}"), proxy_url=p.url,
                  cacert=p.ca_pem)
    assert ok.rc == 0, str(ok)
    plain = origins["plain"]
    ok2 = run_curl("-U", "alice:s3cret", f"http://127.0.0.1:{plain.port}/headers?{token}", proxy_url=p.url)
    assert ok2.rc == 0 and b"Proxy-Authorization" not in ok2.out and b"s3cret" not in ok2.out, str(ok2)
    errors = [f["error"]["kind"] for f in p.flows(4) if f["error"]]
    assert errors.count("proxy_auth") >= 2


def test_listening_beyond_loopback_needs_auth_or_an_explicit_flag(tmp_path):
    with pytest.raises(ConfigError, match="--proxy-auth"):
        load_config(None, {"listen_host": "0.0.0.0"})
    assert load_config(None, {"listen_host": "0.0.0.0", "allow_any_client": True}).allow_any_client
    assert load_config(None, {"listen_host": "0.0.0.0", "proxy_auth": "u:p"}).proxy_auth == "u:p"
    r = run_cli("--listen-host", "0.0.0.0", "--confdir", str(tmp_path / "c"))
    assert r.returncode == 2 and b"--allow-any-client" in r.stderr and b"Traceback" not in r.stderr


class _Peer:
    def __init__(self, addr):
        self.addr = addr

    def get_extra_info(self, name):
        return (self.addr, 40000) if name == "peername" else None


def test_public_clients_are_refused_by_default():
    server = ProxyServer.__new__(ProxyServer)
    server.config, server._tasks = Config(), set()
    assert server._refuse(_Peer("8.8.8.8"))[0] == 403
    assert server._refuse(_Peer("2001:4860:4860::8888"))[0] == 403
    for private in ("127.0.0.1", "10.1.2.3", "192.168.0.5", "172.17.0.2", "::1"):
        assert server._refuse(_Peer(private)) is None
    server.config = Config(allow_public_clients=True)
    assert server._refuse(_Peer("8.8.8.8")) is None


def test_redact_hides_header_values_in_logs_only(start_proxy, origins, token):
    p = start_proxy("--redact", "Authorization", "--redact", "cookie")
    plain = origins["plain"]
    r = run_curl("-H", "Authorization: Bearer topsecret", "-H", "Cookie: sid=42",
                 f"http://127.0.0.1:{plain.port}/hello?{token}", proxy_url=p.url)
    assert r.rc == 0, str(r)
    (seen,) = plain.requests_with(token)
    assert seen.header("Authorization") == "Bearer topsecret"  # the origin got the real value
    flow = p.flow()
    headers = dict((k.lower(), v) for k, v in flow["request"]["headers"])
    assert headers["authorization"] == "[redacted]" and headers["cookie"] == "[redacted]"
    assert "topsecret" not in p.log_path.read_text() and "topsecret" not in p.stdout_text()


def test_max_connections_answers_503_and_recovers(start_proxy, tmp_path, origins):
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_connections = 2\n")
    p = start_proxy("--config", str(cfg))
    held = [socket.create_connection(("127.0.0.1", p.port), timeout=10) for _ in range(2)]
    for s in held:
        s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\n")  # an unfinished head keeps the slot busy
    third = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    resp = read_response(third.makefile("rb"), "GET")
    assert resp.status == 503 and b"max_connections" in resp.body
    for s in held:
        s.close()
    plain = origins["plain"]
    from helpers import poll

    poll(lambda: run_curl(f"http://127.0.0.1:{plain.port}/hello", proxy_url=p.url).rc == 0,
         what="the proxy to accept again")


def test_too_many_pipelined_requests_get_429(start_proxy, origins):
    plain = origins["plain"]
    p = start_proxy()
    s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
    req = f"GET http://127.0.0.1:{plain.port}/hello HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    s.sendall(req * 40)  # default max_pipelined = 32
    f = s.makefile("rb")
    statuses = []
    while True:
        try:
            statuses.append(read_response(f, "GET").status)
        except Exception:
            break
    assert statuses and statuses[-1] == 429 and set(statuses[:-1]) <= {200}


def test_proxy_authorization_is_basic_base64():
    from proxy.http1 import RequestReader
    from proxy.relay import _check_proxy_auth

    def head(value: bytes):
        r = RequestReader()
        r.feed(b"CONNECT a:443 HTTP/1.1\r\nProxy-Authorization: " + value + b"\r\n\r\n")
        return r.next_event()

    good = b"Basic " + base64.b64encode(b"u:p")
    _check_proxy_auth(head(good), b"u:p")
    for bad in (b"Basic " + base64.b64encode(b"u:x"), b"Bearer abc", b"Basic !!!", b"Basic"):
        with pytest.raises(Exception, match="proxy authentication required"):
            _check_proxy_auth(head(bad), b"u:p")
