"""The install page (proxy/installpage.py): every route, headers, and that the key is never served."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
from html.parser import HTMLParser

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ca.authority import load_or_create
from helpers import read_response
from proxy import installpage
from proxy.installpage import INSTALL_HOST, is_install_host, response_bytes, serve

ALL_PATHS = ("/", "/cert/pem", "/cert/der", "/cert/p12", "/nope", "/cert/key", "/httpsdump-ca-key.pem",
             "/cert/pem/../../httpsdump-ca-key.pem", "/cert", "//cert/pem")


@pytest.fixture(scope="module", params=["ec", "rsa"])
def ca(request, tmp_path_factory):
    return load_or_create(tmp_path_factory.mktemp(f"installpage-{request.param}"), key_type=request.param)


def hdr(headers, name: str) -> str | None:
    values = [v.decode("latin-1") for k, v in headers if k.decode().lower() == name.lower()]
    assert len(values) <= 1, f"{name} appears {len(values)} times"
    return values[0] if values else None


def colon_hex(b: bytes) -> str:
    return ":".join(f"{x:02X}" for x in b)


class _Html(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.style = ""
        self._in_style = False
        self.problems: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("href", "src", "action", "srcset", "data", "poster"):
                self.urls.append(v or "")
            if k == "id":
                self.ids.append(v)
            if k.startswith("on"):
                self.problems.append(f"event handler {k} on <{tag}>")
        if tag == "style":
            self._in_style = True
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> does not close <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data):
        if self._in_style:
            self.style += data


def test_index_page(ca):
    status, reason, headers, body = serve("/", ca)
    assert (status, reason) == (200, "OK")
    assert hdr(headers, "Content-Type") == "text/html; charset=utf-8"
    assert hdr(headers, "Content-Length") == str(len(body))
    assert hdr(headers, "Cache-Control") == "no-store"
    assert hdr(headers, "Content-Disposition") is None  # shown, not downloaded
    text = body.decode("utf-8")
    assert ca.fingerprint_sha256 in text
    assert "This request went through httpsdump." in text
    assert len(body) < 16_384, "the page is meant to be small"
    p = _Html()
    p.feed(text)
    p.close()
    assert not p.problems and not p.stack, (p.problems, p.stack)
    # no external resources: no script, image, frame, stylesheet link; links are same-site paths only
    assert not {"script", "img", "iframe", "link", "object", "embed", "form"} & set(p.tags)
    assert p.urls and all(u.startswith("/") and not u.startswith("//") for u in p.urls), p.urls
    assert {"/cert/pem", "/cert/der"} <= set(p.urls)
    assert "url(" not in p.style and "@import" not in p.style
    # the Content-Security-Policy allows exactly that inline style and nothing else
    csp = hdr(headers, "Content-Security-Policy")
    assert "default-src 'none'" in csp
    style_hash = base64.b64encode(hashlib.sha256(p.style.encode()).digest()).decode()
    assert f"style-src 'sha256-{style_hash}'" in csp
    # per-platform instructions
    assert {"linux", "firefox", "debian", "macos", "windows", "android", "ios", "cli"} <= set(p.ids)
    for needle in ("httpsdump ca trust --nss", "httpsdump ca trust --system", "update-ca-certificates",
                   "security add-trusted-cert", "certutil -user -addstore Root", "Certificate Trust Settings",
                   "Install a certificate", "HTTPS_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                   "NODE_EXTRA_CA_CERTS", "libnss3-tools"):
        assert needle in text, needle
    assert str(ca.confdir) not in text  # the proxy machine's paths are not shown to clients


def test_index_page_reached_directly_says_so(ca):
    status, _, _, body = serve("/", ca, via_proxy=False)
    text = body.decode()
    assert status == 200
    assert "This request went through httpsdump." not in text
    assert "did not go through httpsdump as a proxy" in text and ca.fingerprint_sha256 in text


def download(ca, path: str, content_type: str, filename: str) -> bytes:
    status, _, headers, body = serve(path, ca)
    assert status == 200
    assert hdr(headers, "Content-Type") == content_type
    assert hdr(headers, "Content-Disposition") == f'attachment; filename="{filename}"'
    assert hdr(headers, "Cache-Control") == "no-store"
    assert hdr(headers, "Content-Length") == str(len(body))
    return body


def test_pem_download(ca):
    body = download(ca, "/cert/pem", "application/x-pem-file", "httpsdump-ca.pem")
    assert body == ca.cert_pem
    cert = x509.load_pem_x509_certificate(body)
    assert colon_hex(cert.fingerprint(hashes.SHA256())) == ca.fingerprint_sha256


def test_der_download(ca, tmp_path):
    body = download(ca, "/cert/der", "application/x-x509-ca-cert", "httpsdump-ca.cer")
    assert body == ca.cert.as_der()
    cert = x509.load_der_x509_certificate(body)
    assert colon_hex(cert.fingerprint(hashes.SHA256())) == ca.fingerprint_sha256
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # and OpenSSL reads it as DER too
    der = tmp_path / "ca.cer"
    der.write_bytes(body)
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-in", str(der), "-noout", "-fingerprint", "-sha256"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip().upper().endswith(ca.fingerprint_sha256)


def test_no_pkcs12_and_the_reason_is_given(ca):
    status, _, headers, body = serve("/cert/p12", ca)
    assert status == 404
    assert hdr(headers, "Content-Type") == "text/plain; charset=utf-8"
    assert b"PKCS#12" in body and b"/cert/der" in body and b"/cert/pem" in body
    assert b"no PKCS#12" in serve("/", ca)[3]


@pytest.mark.parametrize("path", ["/nope", "/cert", "/cert/key", "/httpsdump-ca-key.pem", "/cert/pem/x",
                                  "/cert/pem/../../httpsdump-ca-key.pem", "//cert/pem", "/CERT/PEM"])
def test_other_paths_are_404(ca, path):
    status, reason, headers, body = serve(path, ca)
    assert (status, reason) == (404, "Not Found")
    assert hdr(headers, "Cache-Control") == "no-store"
    assert hdr(headers, "Content-Length") == str(len(body))
    assert b"BEGIN" not in body


def test_query_strings_and_absolute_targets(ca):
    assert serve("/cert/pem?download=1", ca)[3] == ca.cert_pem
    assert serve(f"http://{INSTALL_HOST}/cert/der", ca)[3] == ca.cert.as_der()
    assert serve(f"https://{INSTALL_HOST}:443/?x#y", ca)[0] == 200
    assert serve(f"http://{INSTALL_HOST}", ca)[0] == 200  # no path: the index


def test_head_and_other_methods(ca):
    for path in ("/", "/cert/pem", "/cert/der", "/nope"):
        g = serve(path, ca)
        h = serve(path, ca, method="HEAD")
        assert h[0] == g[0] and h[2] == g[2] and h[3] == b""
    status, reason, headers, body = serve("/cert/pem", ca, method="POST")
    assert (status, reason) == (405, "Method Not Allowed")
    assert hdr(headers, "Allow") == "GET, HEAD"
    assert b"BEGIN" not in body


def test_the_private_key_is_never_served(ca):
    key_pem = ca.key_path.read_bytes()
    key_lines = [line for line in key_pem.splitlines() if line and not line.startswith(b"-----")]
    key_der = base64.b64decode(b"".join(key_lines))
    for path in ALL_PATHS:
        for method in ("GET", "HEAD", "POST"):
            for via in (True, False):
                _, _, headers, body = serve(path, ca, method=method, via_proxy=via)
                blob = body + b"".join(k + v for k, v in headers)
                assert b"PRIVATE KEY" not in blob, (path, method)
                assert key_der not in blob
                assert not any(line in blob for line in key_lines), (path, method)


def test_response_bytes_is_valid_http(ca):
    raw = response_bytes("GET", f"http://{INSTALL_HOST}/cert/der", ca, close=True)
    resp = read_response(io.BytesIO(raw))
    assert resp.status == 200 and resp.body == ca.cert.as_der()
    assert resp.header("Connection") == "close"
    assert resp.header("Content-Type") == "application/x-x509-ca-cert"
    raw = response_bytes("HEAD", "/", ca)
    resp = read_response(io.BytesIO(raw), method="HEAD")
    assert resp.status == 200 and resp.body == b"" and raw.endswith(b"\r\n\r\n")
    assert resp.header("Connection") is None
    assert int(resp.header("Content-Length")) == len(serve("/", ca)[3])


def test_install_host_matching():
    assert INSTALL_HOST == "httpsdump.invalid"
    for yes in ("httpsdump.invalid", "HTTPSDUMP.INVALID", "httpsdump.invalid.", "httpsdump.invalid:443",
                "httpsdump.invalid:80"):
        assert is_install_host(yes), yes
    for no in ("httpsdump.invalid.example.com", "xhttpsdump.invalid", "httpsdump.test", "localhost",
               "[::1]", "httpsdump", "a.httpsdump.invalid"):
        assert not is_install_host(no), no


def test_path_of():
    assert installpage.path_of("/cert/pem?x=1#f") == "/cert/pem"
    assert installpage.path_of("http://httpsdump.invalid") == "/"
    assert installpage.path_of("https://httpsdump.invalid/cert/der?x") == "/cert/der"
    assert installpage.path_of("") == "/"
    assert installpage.path_of("/cert/p12") == "/cert/p12"
    assert installpage.path_of("/a/../b") == "/a/../b"  # never normalised: only exact routes match
