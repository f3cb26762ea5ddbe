"""End to end, the good path: real clients (curl, http.client, urllib, openssl s_client) through the real
proxy to a real TLS origin, and the flow record that the exchange leaves in the JSON Lines log."""

from __future__ import annotations

import http.client
import ipaddress
import stat
import subprocess
import urllib.request

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from helpers import clean_env, client_context, https, norm_fp, pem_certs
from origin import HELLO_BODY, HELLO_HEADERS, JSON_BODY
from pki import load_cert


def check_minted(cert: x509.Certificate, ca_pem, *, dns: str | None = None, ip: str | None = None) -> None:
    """The leaf the proxy showed the client: issued (and signed) by the proxy CA, for exactly the name
    asked, valid for TLS server authentication."""
    ca = load_cert(ca_pem)
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ([dns] if dns else [])
    assert san.get_values_for_type(x509.IPAddress) == ([ipaddress.ip_address(ip)] if ip else [])
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_curl_good_path_and_flow_record(start_proxy, pki, origin, token):
    proxy = start_proxy(verbose=False)  # default verbosity: one console line per flow
    path = f"/hello?t={token}"
    r = proxy.curl("-H", "X-Mixed-CASE: one", "-H", "x-lower: two", *https("good.test", origin, path))
    assert r.rc == 0, str(r)
    assert r.out == HELLO_BODY

    # The origin got the request with the client's headers, in order and case.
    [seen] = origin.requests_with(token)
    assert seen.method == "GET" and seen.target == path
    client_names = ["Host", "User-Agent", "Accept", "X-Mixed-CASE", "x-lower"]
    assert [k for k, _ in seen.headers if k in client_names] == client_names
    assert seen.header("Host") == "good.test"

    f = proxy.flow()
    assert f["mode"] == "https"
    assert f["error"] is None
    assert f["insecure"] is False
    req, resp = f["request"], f["response"]
    assert req["method"] == "GET"
    assert req["url"] == f"https://good.test{path}"
    assert req["scheme"] == "https"
    assert [k for k, _ in req["headers"]] == client_names
    assert req["headers"][0] == ["Host", "good.test"]
    assert req["headers"][3:] == [["X-Mixed-CASE", "one"], ["x-lower", "two"]]
    assert req["body"]["size"] == 0

    assert resp["status"] == 200
    expected = [list(h) for h in HELLO_HEADERS] + [["Content-Length", str(len(HELLO_BODY))]]
    origin_names = {k for k, _ in expected}
    assert [h for h in resp["headers"] if h[0] in origin_names] == expected  # wire order and case
    body = resp["body"]
    assert body["size"] == len(HELLO_BODY) and body["truncated"] is False
    assert body["text"] == HELLO_BODY.decode()

    client_tls = f["tls"]["client"]
    assert client_tls["sni"] == "good.test"
    assert client_tls["version"] in ("TLSv1.2", "TLSv1.3")
    up = f["tls"]["upstream"]
    assert up["version"] in ("TLSv1.2", "TLSv1.3")
    assert up["cipher"]
    assert up["verified"] is True
    assert up["verify_code"] == 0
    cert = up["cert"]
    assert norm_fp(cert["sha256"]) == pki["good"].sha256
    assert "good.test" in cert["subject"]
    assert "Test Root" in cert["issuer"]
    for name in ("good.test", "localhost", "127.0.0.1"):
        assert any(name in s for s in cert["sans"]), (name, cert["sans"])

    t = f["timings"]
    for key in ("client_tls_ms", "connect_ms", "upstream_tls_ms", "request_sent_ms", "first_byte_ms", "total_ms"):
        assert isinstance(t[key], (int, float)) and t[key] >= 0, (key, t)
    assert t["total_ms"] >= t["first_byte_ms"]
    assert isinstance(f["start"], (int, float)) and f["start"] > 1.6e9

    assert stat.S_IMODE(proxy.log_path.stat().st_mode) == 0o600

    # The console shows the flow in one line; the listening line went to stderr.
    console = (proxy.stdout_text() + proxy.stderr_text()).splitlines()
    lines = [ln for ln in console if f"good.test{path}" in ln]
    assert len(lines) == 1, console
    assert "200" in lines[0] and "GET" in lines[0]
    assert f"httpsdump: listening on 127.0.0.1:{proxy.port}" in proxy.stderr_text()


def test_http_client_set_tunnel_keep_alive(proxy, origin, token):
    ctx = client_context(proxy.ca_pem)
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=ctx, timeout=15)
    conn.set_tunnel("localhost", origin.port)
    try:
        conn.request("GET", f"/json?t={token}")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == JSON_BODY
        sock = conn.sock
        check_minted(x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)), proxy.ca_pem,
                     dns="localhost")
        conn.request("GET", f"/hello?t={token}")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == HELLO_BODY
        assert r.getheader("x-MiXeD-CaSe") == "Keep Me"
        assert conn.sock is sock  # the same tunnel
    finally:
        conn.close()
    flows = proxy.flows(2)
    assert [f["request"]["url"] for f in flows] == [f"https://localhost:{origin.port}/json?t={token}",
                                                      f"https://localhost:{origin.port}/hello?t={token}"]
    assert flows[0]["client"] == flows[1]["client"]
    assert len({q.conn_id for q in origin.requests_with(token)}) == 1


def test_urllib_through_proxy(proxy, origin, token):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"https": proxy.url}),
                                         urllib.request.HTTPSHandler(context=client_context(proxy.ca_pem)))
    with opener.open(f"https://localhost:{origin.port}/hello?t={token}", timeout=15) as r:
        assert r.status == 200
        assert r.read() == HELLO_BODY
    assert len(origin.requests_with(token)) == 1
    f = proxy.flow()
    assert f["response"]["status"] == 200 and f["tls"]["client"]["sni"] == "localhost"


def test_openssl_s_client_through_proxy(proxy, origin, token):
    cmd = ["openssl", "s_client", "-proxy", f"127.0.0.1:{proxy.port}", "-connect", f"127.0.0.1:{origin.port}",
           "-servername", "good.test", "-verify_hostname", "good.test", "-CAfile", str(proxy.ca_pem),
           "-verify_return_error", "-showcerts", "-ign_eof"]
    request = f"GET /hello?t={token} HTTP/1.1\r\nHost: good.test\r\nConnection: close\r\n\r\n".encode()
    p = subprocess.run(cmd, input=request, capture_output=True, timeout=30, env=clean_env())
    out = p.stdout
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert b"Verify return code: 0 (ok)" in out
    assert b"HTTP/1.1 200" in out
    assert out.count(HELLO_BODY) == 1
    certs = pem_certs(out)
    assert certs, out[:2000]
    check_minted(certs[0], proxy.ca_pem, dns="good.test")
    assert len(origin.requests_with(token)) == 1
    assert proxy.flow()["request"]["url"] == f"https://good.test/hello?t={token}"


def test_minted_leaf_for_sni_name(proxy, origin, token):
    with proxy.tunnel(f"127.0.0.1:{origin.port}", "a-name.good.test") as t:
        assert t.connect.status == 200
        check_minted(x509.load_der_x509_certificate(t.sock.getpeercert(binary_form=True)), proxy.ca_pem,
                     dns="a-name.good.test")


def test_minted_leaf_for_ip_target_without_sni(proxy, origin, token):
    with proxy.tunnel(f"127.0.0.1:{origin.port}", None) as t:  # Python sends no SNI for an IP address
        assert t.connect.status == 200
        check_minted(x509.load_der_x509_certificate(t.sock.getpeercert(binary_form=True)), proxy.ca_pem,
                     ip="127.0.0.1")
        resp = t.request(f"GET /hello?t={token} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n".encode())
        assert resp.status == 200 and resp.body == HELLO_BODY
    f = proxy.flow()
    assert f["request"]["url"] == f"https://127.0.0.1:{origin.port}/hello?t={token}"
    assert f["tls"]["client"]["sni"] is None
    assert f["tls"]["upstream"]["verified"] is True


def test_curl_ip_url(proxy, origin, token):
    r = proxy.curl(f"https://127.0.0.1:{origin.port}/hello?t={token}")
    assert r.rc == 0 and r.out == HELLO_BODY, str(r)
    assert proxy.flow()["response"]["status"] == 200


def test_timings_reflect_a_slow_origin(proxy, origin, token):
    r = proxy.curl(*https("good.test", origin, f"/slow?ms=400&t={token}"))
    assert r.rc == 0 and r.out == HELLO_BODY, str(r)
    t = proxy.flow()["timings"]
    assert t["first_byte_ms"] >= 400, t  # the origin waited 400 ms before answering
    assert t["request_sent_ms"] < t["first_byte_ms"] <= t["total_ms"], t
