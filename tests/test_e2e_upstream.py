"""End to end, the origin side: the proxy verifies every origin certificate against the name the client
asked for (its SNI) and refuses bad ones with a 502 that says why, before any request is forwarded."""

from __future__ import annotations

import socket

import pytest

from helpers import https, norm_fp
from origin import HELLO_BODY

# flavour: (name asked, error reason, OpenSSL verify code, words the 502 body must contain)
BAD = {
    "expired": ("good.test", "expired", 10, ["certificate has expired"]),
    "notyet": ("good.test", "not_yet_valid", 9, ["certificate is not yet valid"]),
    "wronghost": ("good.test", "hostname_mismatch", 62, ["hostname mismatch", "good.test", "other.test"]),
    "selfsigned": ("good.test", "self_signed", 18, ["self-signed"]),
    "unknownroot": ("good.test", "unknown_issuer", 20, ["unable to get local issuer certificate"]),
    "incomplete": ("good.test", "unknown_issuer", 20, ["unable to get local issuer certificate"]),
    # CN=localhost and no SAN: OpenSSL itself would accept the CN; refused by the proxy's own policy.
    "cnonly": ("localhost", "no_san", 0, ["subjectAltName"]),
}


def get(proxy, name, origin, path):
    """curl through the proxy; returns (rc, status, body, CurlResult)."""
    r = proxy.curl("-w", "\n%{http_code}", *https(name, origin, path))
    body, _, code = r.out.rpartition(b"\n")
    return r.rc, int(code or 0), body, r


def assert_cert_refused(proxy, origin, token, name, reason, code, words):
    rc, status, body, r = get(proxy, name, origin, f"/hello?t={token}")
    assert rc == 0, f"the client must complete TLS with the proxy and get an HTTP answer\n{r}"
    assert status == 502, str(r)
    text = body.decode("utf-8", "replace")
    for w in words:
        assert w.lower() in text.lower(), f"{w!r} not in the 502 body: {text!r}"
    assert origin.requests_with(token) == [], "the request reached an origin whose certificate is bad"
    f = proxy.flow()
    err = f["error"]
    assert err is not None, f
    assert err["kind"] == "upstream_certificate"
    assert err["side"] == "upstream" and err["status"] == 502
    assert err["reason"] == reason
    assert err["verify_code"] == code
    return f


@pytest.mark.parametrize("flavour", sorted(BAD))
def test_bad_upstream_certificate_gives_502(proxy, origins, token, flavour):
    name, reason, code, words = BAD[flavour]
    assert_cert_refused(proxy, origins[flavour], token, name, reason, code, words)


def test_chain_with_intermediate_passes(proxy, pki, origins, token):
    o = origins["chain"]
    rc, status, body, r = get(proxy, "good.test", o, f"/hello?t={token}")
    assert (rc, status, body) == (0, 200, HELLO_BODY), str(r)
    assert len(o.requests_with(token)) == 1
    up = proxy.flow()["tls"]["upstream"]
    assert up["verified"] is True and up["verify_code"] == 0
    assert norm_fp(up["cert"]["sha256"]) == pki["chain"].sha256


@pytest.mark.parametrize("name", ["a.wild.test", "zz-9.wild.test"])
def test_wildcard_matches_one_label(proxy, origins, token, name):
    o = origins["wildcard"]
    rc, status, body, r = get(proxy, name, o, f"/hello?t={token}")
    assert (rc, status, body) == (0, 200, HELLO_BODY), str(r)
    f = proxy.flow()
    assert f["request"]["url"] == f"https://{name}/hello?t={token}"
    assert f["tls"]["upstream"]["verified"] is True


@pytest.mark.parametrize("name", ["a.b.wild.test", "wild.test"])
def test_wildcard_mismatch(proxy, origins, token, name):
    assert_cert_refused(proxy, origins["wildcard"], token, name, "hostname_mismatch", 62,
                        ["hostname mismatch", name, "*.wild.test"])


def test_ip_certificate_for_ip_url(proxy, origins, token):
    o = origins["ip"]
    r = proxy.curl("-w", "\n%{http_code}", f"https://127.0.0.1:{o.port}/hello?t={token}")
    assert r.rc == 0 and r.out == HELLO_BODY + b"\n200", str(r)
    f = proxy.flow()
    assert f["tls"]["upstream"]["verified"] is True and f["error"] is None
    assert f["request"]["url"] == f"https://127.0.0.1:{o.port}/hello?t={token}"


def test_ip_certificate_for_a_name_is_refused(proxy, origins, token):
    assert_cert_refused(proxy, origins["ip"], token, "good.test", "hostname_mismatch", 62, ["hostname mismatch"])


@pytest.mark.parametrize("flavour", ["expired", "selfsigned", "wronghost"])
def test_insecure_reaches_bad_origin_and_marks_flow(start_proxy, origins, token, flavour):
    proxy = start_proxy("--insecure")
    o = origins[flavour]
    rc, status, body, r = get(proxy, "good.test", o, f"/hello?t={token}")
    assert (rc, status, body) == (0, 200, HELLO_BODY), str(r)
    assert len(o.requests_with(token)) == 1
    f = proxy.flow()
    assert f["insecure"] is True
    assert f["error"] is None
    assert f["tls"]["upstream"]["verified"] is False
    assert f["tls"]["upstream"]["insecure"] is True
    assert f["tls"]["upstream"]["verify_code"] not in (None, 0)


def test_insecure_good_origin_is_still_verified(start_proxy, origin, token):
    proxy = start_proxy("--insecure")
    rc, status, body, r = get(proxy, "good.test", origin, f"/hello?t={token}")
    assert (rc, status, body) == (0, 200, HELLO_BODY), str(r)
    up = proxy.flow()["tls"]["upstream"]
    assert up["verified"] is True and up["verify_code"] == 0


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # never listened: connecting is refused
    return port


def test_upstream_connection_refused(proxy, token):
    port = closed_port()
    with proxy.tunnel(f"127.0.0.1:{port}", "good.test") as t:
        if t.sock is None:  # refused at CONNECT time
            status, body = t.connect.status, t.connect.body
        else:  # or inside the tunnel, once the client's TLS is up
            resp = t.request(f"GET /hello?t={token} HTTP/1.1\r\nHost: good.test\r\n\r\n".encode())
            status, body = resp.status, resp.body
    assert status == 502
    assert "connection refused" in body.decode("utf-8", "replace").lower(), body
    f = proxy.flow()
    assert f["error"]["kind"] == "upstream_connect"
    assert f["error"]["side"] == "upstream" and f["error"]["status"] == 502
    assert "refused" in f["error"]["message"].lower()


def test_upstream_refused_with_curl(proxy, token):
    port = closed_port()
    r = proxy.curl("-w", "\n%{http_code}", "--connect-to", f"good.test:443:127.0.0.1:{port}",
                   f"https://good.test/hello?t={token}")
    assert r.out.endswith(b"\n502"), str(r)
    assert b"connection refused" in r.out.lower()
    assert proxy.flow()["error"]["kind"] == "upstream_connect"
