"""The install page through the real proxy: needs the relay hook (proxy/relay.py + server.py)."""

from __future__ import annotations

import io
import socket

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ca import trust
from test_e2e_chromium import Guard, run_chromium


def _fp(proxy) -> bytes:
    from ca.authority import load

    return load(proxy.confdir).fingerprint_sha256.encode()


def test_forward_mode_serves_the_page_and_nothing_is_forwarded(proxy):
    r = proxy.curl("-i", "http://httpsdump.invalid/")
    assert r.rc == 0, r
    head, _, body = r.out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Cache-Control: no-store" in head
    assert _fp(proxy) in body and b"This request went through httpsdump." in body
    f = proxy.flow()
    assert f["mode"] == "http" and f["request"]["host"] == "httpsdump.invalid"
    assert f["response"]["status"] == 200 and f["error"] is None and not (f["tls"] or {}).get("upstream")


def test_connect_mode_serves_both_certificates_on_one_tls_connection(proxy):
    r = proxy.curl("-s", "https://httpsdump.invalid/cert/der", "https://httpsdump.invalid/cert/pem",
                   "-w", "\n%{http_code} %{num_connects}\n")
    assert r.rc == 0, r
    assert r.out.count(b"\n200 ") == 2 and b"\n200 0\n" in r.out  # the second reused the connection
    assert b"-----BEGIN CERTIFICATE-----" in r.out and b"PRIVATE KEY" not in r.out
    flows = proxy.flows(2)
    assert [f["request"]["target"] for f in flows] == ["/cert/der", "/cert/pem"]
    assert all(f["mode"] == "https" and f["response"]["status"] == 200 for f in flows)
    assert flows[0]["tls"]["client"]["sni"] == "httpsdump.invalid"
    der = x509.load_pem_x509_certificate(proxy.ca_pem.read_bytes()).public_bytes(Encoding.DER)
    assert flows[0]["response"]["body"]["size"] == len(der)


def test_p12_and_unknown_paths_are_404_and_post_is_405(proxy):
    r = proxy.curl("-s", "-w", "%{http_code} ", "-o", "/dev/null", "https://httpsdump.invalid/cert/p12",
                   "-o", "/dev/null", "https://httpsdump.invalid/httpsdump-ca-key.pem")
    assert r.out == b"404 404 ", r
    r = proxy.curl("-s", "-o", "/dev/null", "-w", "%{http_code}", "-d", "x=1", "http://httpsdump.invalid/")
    assert r.out == b"405", r


def test_the_name_does_not_resolve_without_the_proxy():
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("httpsdump.invalid", 443)


def test_chromium_shows_the_install_page_over_https(start_proxy, tmp_path, monkeypatch):
    proxy = start_proxy()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    trust.cmd_trust(proxy.confdir, "", False, io.StringIO())
    with Guard(proxy.port, {("httpsdump.invalid", 443)}) as guard:
        p = run_chromium("https://httpsdump.invalid/", guard.port, home, tmp_path / "profile")
    assert p.returncode == 0 and guard.refused == [], (guard.refused, p.stderr[-2000:])
    assert "This request went through httpsdump." in p.stdout, p.stdout[-2000:]
    assert _fp(proxy).decode() in p.stdout
    f = proxy.flow()
    assert f["request"]["host"] == "httpsdump.invalid" and f["response"]["status"] == 200
