"""The test fixtures themselves, checked WITHOUT the proxy: curl (and Python's ssl) straight to each origin.

If these fail, every end-to-end test is suspect; they must pass before the proxy exists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import socket
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from helpers import connect_to, poll, read_response, run_curl
from origin import (CHUNKED_BODY, CHUNKS, CLOSE_BODY, ENCODED, HELLO_BODY, HELLO_HEADERS, JSON_BODY, TEXT,
                    pattern_sha256)
from pki import BAD_FLAVOURS, FLAVOURS, cert_sans, cert_sha256, load_cert, make_pki

NOW = dt.datetime.now(dt.timezone.utc)


def cn(name: x509.Name) -> str:
    return name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def pem_count(path) -> int:
    return path.read_bytes().count(b"-----BEGIN CERTIFICATE-----")


def direct(pki, origin, name: str, path: str, *args: str, timeout: float = 20):
    """curl straight to `origin` (no proxy) as https://NAME/PATH, trusting the test root."""
    return run_curl(*connect_to(name, origin.port), *args, f"https://{name}{path}", cacert=pki.root_pem,
                    timeout=timeout)


# --- the PKI files ------------------------------------------------------------------------------


def test_pki_root_and_intermediate(pki):
    root = load_cert(pki.root_pem)
    assert cn(root.subject) == "Test Root" and root.subject == root.issuer
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    inter = load_cert(pki.intermediate_pem)
    assert inter.issuer == root.subject
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    inter.verify_directly_issued_by(root)
    other = load_cert(pki.other_root_pem)
    assert other.subject != root.subject and other.subject == other.issuer
    assert stat.S_IMODE(pki.root_key.stat().st_mode) == 0o600


def test_pki_leaves(pki):
    root, inter, other = load_cert(pki.root_pem), load_cert(pki.intermediate_pem), load_cert(pki.other_root_pem)
    std = ("DNS:localhost", "DNS:good.test", "IP:127.0.0.1")
    expect_sans = {"good": std, "expired": std, "notyet": std, "wronghost": ("DNS:other.test",), "selfsigned": std,
                   "unknownroot": std, "incomplete": std, "chain": std, "cnonly": (), "wildcard": ("DNS:*.wild.test",),
                   "ip": ("IP:127.0.0.1",)}
    issuers = {"unknownroot": other, "incomplete": inter, "chain": inter}
    assert set(pki.leaves) == set(FLAVOURS)
    for name in FLAVOURS:
        leaf = pki[name]
        cert = load_cert(leaf.cert)
        assert cert_sans(cert) == expect_sans[name], name
        assert leaf.sans == expect_sans[name]
        assert leaf.sha256 == cert_sha256(cert)
        assert stat.S_IMODE(leaf.key.stat().st_mode) == 0o600
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert ExtendedKeyUsageOID.SERVER_AUTH in eku
        if name == "selfsigned":
            assert cert.issuer == cert.subject
            cert.verify_directly_issued_by(cert)
        else:
            issuer = issuers.get(name, root)
            cert.verify_directly_issued_by(issuer)
        if name == "expired":
            assert cert.not_valid_after_utc < NOW
        elif name == "notyet":
            assert cert.not_valid_before_utc > NOW
        else:
            assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc
    # cnonly: CN=localhost and no subjectAltName extension at all
    cnonly = load_cert(pki.cert("cnonly"))
    assert cn(cnonly.subject) == "localhost"
    with pytest.raises(x509.ExtensionNotFound):
        cnonly.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    # incomplete and chain: the same leaf; only what the server sends differs
    assert pki.cert("incomplete").read_bytes() == pki.cert("chain").read_bytes()
    assert pki.key("incomplete").read_bytes() == pki.key("chain").read_bytes()
    assert pem_count(pki.chain("incomplete")) == 1
    assert pem_count(pki.chain("chain")) == 2
    assert pki.chain("chain").read_bytes().endswith(pki.intermediate_pem.read_bytes())
    for name in FLAVOURS:
        if name != "chain":
            assert pem_count(pki.chain(name)) == 1, name


def test_pki_is_cached_on_disk(pki):
    again = make_pki(pki.dir)
    assert again.root_pem.read_bytes() == pki.root_pem.read_bytes()
    assert {n: leaf.sha256 for n, leaf in again.leaves.items()} == {n: leaf.sha256 for n, leaf in pki.leaves.items()}


# --- certificate flavours, verified by curl ------------------------------------------------------


@pytest.mark.parametrize("name", ["good.test", "localhost"])
def test_good_origin_verifies(pki, origins, name, token):
    o = origins["good"]
    r = direct(pki, o, name, f"/hello?t={token}")
    assert r.rc == 0, str(r)
    assert r.out == HELLO_BODY
    [req] = o.requests_with(token)
    assert req.method == "GET" and req.path == "/hello" and req.header("Host") == name


def test_good_origin_by_ip(pki, origins, token):
    o = origins["good"]
    r = run_curl(f"https://127.0.0.1:{o.port}/hello?t={token}", cacert=pki.root_pem)
    assert r.rc == 0, str(r)
    assert r.out == HELLO_BODY


CURL_ERRORS = {
    "expired": r"certificate has expired",
    "notyet": r"certificate is not yet valid",
    "wronghost": r"no alternative certificate subject name matches target host name 'good\.test'",
    "selfsigned": r"self.signed certificate",
    "unknownroot": r"unable to get local issuer certificate",
    "incomplete": r"unable to get local issuer certificate",
}


@pytest.mark.parametrize("flavour", sorted(CURL_ERRORS))
def test_bad_origin_refused_by_curl(pki, origins, flavour, token):
    o = origins[flavour]
    r = direct(pki, o, "good.test", f"/hello?t={token}")
    assert r.rc == 60, str(r)
    assert re.search(CURL_ERRORS[flavour], r.err), str(r)
    assert o.requests_with(token) == []


def test_cnonly_refused_without_cn_fallback(pki, origins, token):
    """cnonly has no SAN. curl still falls back to the CN (so it accepts "localhost"), but a client
    that ignores the CN, as browsers do, refuses it: that is the policy the proxy applies."""
    o = origins["cnonly"]
    r = direct(pki, o, "localhost", f"/hello?t={token}")
    assert r.rc == 0 and r.out == HELLO_BODY, str(r)
    r = direct(pki, o, "good.test", "/hello")
    assert r.rc == 60 and "does not match target host name 'good.test'" in r.err, str(r)
    ctx = ssl.create_default_context(cafile=str(pki.root_pem))
    ctx.hostname_checks_common_name = False
    with socket.create_connection(("127.0.0.1", o.port), timeout=10) as s:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            ctx.wrap_socket(s, server_hostname="localhost")


def test_chain_passes_incomplete_fails(pki, origins):
    r = direct(pki, origins["chain"], "good.test", "/hello")
    assert r.rc == 0 and r.out == HELLO_BODY, str(r)
    r = direct(pki, origins["incomplete"], "good.test", "/hello")
    assert r.rc == 60 and "unable to get local issuer certificate" in r.err, str(r)


@pytest.mark.parametrize("name,ok", [("a.wild.test", True), ("b.wild.test", True), ("a.b.wild.test", False),
                                     ("wild.test", False)])
def test_wildcard_origin(pki, origins, name, ok):
    r = direct(pki, origins["wildcard"], name, "/hello")
    if ok:
        assert r.rc == 0 and r.out == HELLO_BODY, str(r)
    else:
        assert r.rc == 60 and "no alternative certificate subject name" in r.err, str(r)


def test_ip_origin(pki, origins):
    o = origins["ip"]
    r = run_curl(f"https://127.0.0.1:{o.port}/hello", cacert=pki.root_pem)
    assert r.rc == 0 and r.out == HELLO_BODY, str(r)
    r = run_curl(f"https://localhost:{o.port}/hello", cacert=pki.root_pem)
    assert r.rc == 60, str(r)


def test_tls_failures_are_counted(pki, origins):
    o = origins["unknownroot"]
    before = len(o.tls_failures)
    direct(pki, o, "good.test", "/hello")
    poll(lambda: len(o.tls_failures) > before, what="the origin to count a failed TLS handshake")
    assert "unknown ca" in o.tls_failures[-1].lower()


# --- routes -------------------------------------------------------------------------------------


def test_route_hello_headers_in_order(pki, origin):
    r = direct(pki, origin, "good.test", "/hello", "-D", "-")
    assert r.rc == 0, str(r)
    head, _, body = r.out.partition(b"\r\n\r\n")
    assert body == HELLO_BODY
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    assert [tuple(h.split(": ", 1)) for h in lines[1:]] == HELLO_HEADERS + [("Content-Length", str(len(HELLO_BODY)))]


def test_route_head(pki, origin):
    r = direct(pki, origin, "good.test", "/bytes?n=5000", "-I")
    assert r.rc == 0, str(r)
    assert b"Content-Length: 5000" in r.out and r.out.endswith(b"\r\n\r\n")
    assert origin.requests[-1].method == "HEAD"


def test_route_json(pki, origin):
    r = direct(pki, origin, "good.test", "/json")
    assert r.rc == 0 and r.out == JSON_BODY and json.loads(r.out)["n"] == 42


def test_route_chunked(pki, origin):
    r = direct(pki, origin, "good.test", "/chunked", "-D", "-", "--raw")
    assert r.rc == 0, str(r)
    head, _, raw = r.out.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    assert raw.count(b"\r\n") >= 2 * len(CHUNKS)
    assert raw.endswith(b"0\r\n\r\n")
    r = direct(pki, origin, "good.test", "/chunked")
    assert r.out == CHUNKED_BODY


@pytest.mark.parametrize("enc", sorted(ENCODED))
def test_route_encodings(pki, origin, enc):
    r = direct(pki, origin, "good.test", f"/{enc}", "-D", "-")
    assert r.rc == 0, str(r)
    head, _, body = r.out.partition(b"\r\n\r\n")
    assert f"Content-Encoding: {enc}".encode() in head
    assert body == ENCODED[enc] and body != TEXT
    r = direct(pki, origin, "good.test", f"/{enc}", "--compressed")
    assert r.rc == 0 and r.out == TEXT, str(r)


@pytest.mark.parametrize("n", [0, 1, 65536, 1_000_007])
def test_route_bytes(pki, origin, n):
    r = direct(pki, origin, "good.test", f"/bytes?n={n}")
    assert r.rc == 0, str(r)
    assert len(r.out) == n
    assert hashlib.sha256(r.out).hexdigest() == pattern_sha256(n)


@pytest.mark.parametrize("mode", ["length", "chunked", "expect"])
def test_route_upload(pki, origin, tmp_path, mode):
    data = bytes(range(256)) * 4000 + b"tail"
    f = tmp_path / "up.bin"
    f.write_bytes(data)
    args = ["--data-binary", f"@{f}", "-H", "Content-Type: application/octet-stream"]
    if mode == "chunked":
        args += ["-H", "Transfer-Encoding: chunked"]
    if mode == "expect":
        args += ["-H", "Expect: 100-continue", "--expect100-timeout", "15", "-v"]
    r = direct(pki, origin, "good.test", "/upload", *args)
    assert r.rc == 0, str(r)
    got = json.loads(r.out)
    assert got["size"] == len(data) and got["sha256"] == hashlib.sha256(data).hexdigest()
    assert got["chunked"] is (mode == "chunked")
    assert got["method"] == "POST"
    if mode == "expect":
        assert got["expect_continue"] is True
        assert "HTTP/1.1 100 Continue" in r.err


@pytest.mark.parametrize("status", [200, 204, 304, 404, 500])
def test_route_status(pki, origin, status):
    r = direct(pki, origin, "good.test", f"/status/{status}", "-w", "%{http_code}")
    assert r.rc == 0, str(r)
    body = r.out[:-3]
    assert r.out[-3:] == str(status).encode()
    assert body == (b"" if status in (204, 304) else f"status {status}\n".encode())


def test_route_headers_echoes_wire_order_and_case(pki, origin):
    r = direct(pki, origin, "good.test", "/headers", "-H", "X-First: 1", "-H", "x-SeCoNd: two", "-H", "X-Third: 3")
    assert r.rc == 0, str(r)
    lines = r.out.decode().splitlines()
    assert lines[0] == "Host: good.test"
    assert lines[-3:] == ["X-First: 1", "x-SeCoNd: two", "X-Third: 3"]
    req = origin.requests[-1]
    assert req.headers[-3:] == [("X-First", "1"), ("x-SeCoNd", "two"), ("X-Third", "3")]


def test_route_close_delimited(pki, origin):
    r = direct(pki, origin, "good.test", "/close", "-D", "-")
    assert r.rc == 0, str(r)
    head, _, body = r.out.partition(b"\r\n\r\n")
    assert b"Content-Length" not in head and b"Connection: close" in head
    assert body == CLOSE_BODY


def test_keep_alive_and_recording(pki, origin, token):
    mark = origin.mark()
    r = run_curl(*connect_to("good.test", origin.port), "-w", "[%{num_connects}]", f"https://good.test/hello?t={token}",
                 f"https://good.test/status/204?t={token}", f"https://good.test/json?t={token}", cacert=pki.root_pem)
    assert r.rc == 0, str(r)
    assert r.out == HELLO_BODY + b"[1]" + b"[0]" + JSON_BODY + b"[0]"
    reqs = origin.requests_since(mark)
    assert [q.path for q in reqs] == ["/hello", "/status/204", "/json"]
    assert len({q.conn_id for q in reqs}) == 1


def test_plain_origin(origins):
    o = origins["plain"]
    r = run_curl(f"http://127.0.0.1:{o.port}/hello")
    assert r.rc == 0 and r.out == HELLO_BODY, str(r)
    assert not o.tls


def test_raw_keep_alive_with_python_ssl(pki, origin):
    """HEAD, 204 and 304 on one connection, followed by a request that works."""
    ctx = ssl.create_default_context(cafile=str(pki.root_pem))
    with socket.create_connection(("127.0.0.1", origin.port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="good.test") as t, t.makefile("rb") as f:
            for method, path in [("HEAD", "/hello"), ("GET", "/status/204"), ("GET", "/status/304"),
                                 ("GET", "/hello")]:
                t.sendall(f"{method} {path} HTTP/1.1\r\nHost: good.test\r\n\r\n".encode())
                resp = read_response(f, method)
                if path == "/hello":
                    assert resp.status == 200 and resp.header("Content-Length") == str(len(HELLO_BODY))
                    assert resp.body == (b"" if method == "HEAD" else HELLO_BODY)
                else:
                    assert resp.status == int(path[-3:]) and resp.body == b""


def test_bad_flavour_list_is_complete():
    assert set(BAD_FLAVOURS) <= set(FLAVOURS) and "good" not in BAD_FLAVOURS and "chain" not in BAD_FLAVOURS
