"""TLS session resumption towards origins (proxy/tls/sessions.py): real curl, real TLS origins.

A second connection to the same origin under the same name resumes the session of the first, which
was verified; the record says so and still names the certificate. Another name at the same address
resumes a sibling's TLS 1.3 session only when the certificate that session verified is valid for it
(RFC 8446 §4.6.1). Nothing else may resume: a name the certificate does not cover, a session whose
verification failed (--insecure), or with the option off.
"""

from __future__ import annotations

from helpers import https

from origin import HELLO_BODY


def fetch(proxy, name, origin, token, i):
    r = proxy.curl("-w", "\n%{http_code}", *https(name, origin, f"/hello?t={token}&i={i}"))
    assert r.rc == 0, str(r)
    return r


def upstream_tls(proxy, count):
    return [f["tls"]["upstream"] for f in sorted(proxy.flows(count), key=lambda f: f["request"]["target"])]


def test_second_connection_resumes_the_verified_session(proxy, origin, token):
    for i in range(3):  # three separate curl processes: three client connections, three origin connections
        r = fetch(proxy, "good.test", origin, token, i)
        assert r.out == HELLO_BODY + b"\n200"
    first, *later = upstream_tls(proxy, 3)
    assert first["resumed"] is False and first["verified"] is True
    assert all(t["resumed"] is True for t in later), later
    for t in later:  # the record still names the certificate that the session was verified with
        assert t["verified"] is True and t["verify_result"] == "ok"
        assert t["cert"]["sha256"] == first["cert"]["sha256"]


def test_another_name_the_certificate_covers_resumes_a_sibling_session(proxy, origin, token):
    fetch(proxy, "good.test", origin, token, 0)
    fetch(proxy, "localhost", origin, token, 1)  # same address and certificate (SANs both), another name
    a, b = upstream_tls(proxy, 2)
    assert a["resumed"] is False and b["resumed"] is True, (a, b)
    assert b["sni"] == "localhost" and b["verified"] is True and b["cert"]["sha256"] == a["cert"]["sha256"]
    assert b["version"] == "TLSv1.3"


def test_names_under_one_wildcard_share_sessions(proxy, origins, token):
    for i, name in enumerate(("a.wild.test", "b.wild.test", "c.wild.test")):
        r = fetch(proxy, name, origins["wildcard"], token, i)
        assert r.out.endswith(b"200"), str(r)
    assert [t["resumed"] for t in upstream_tls(proxy, 3)] == [False, True, True]


def test_a_name_the_certificate_does_not_cover_is_never_offered_a_sibling_session(proxy, origin, token):
    """good.test's session rests on a certificate for localhost/good.test only: other.test at the same
    address gets a full handshake, whose verification refuses it (a resumed one would have passed)."""
    fetch(proxy, "good.test", origin, token, 0)
    r = proxy.curl("-w", "\n%{http_code}", *https("other.test", origin, f"/hello?t={token}&i=1"))
    assert r.out.endswith(b"502"), str(r)
    flows = sorted(proxy.flows(2), key=lambda f: f["request"]["target"])
    assert flows[1]["error"]["kind"] == "upstream_certificate"
    assert flows[1]["tls"]["upstream"]["resumed"] is False


def test_a_session_whose_verification_failed_is_never_resumed(start_proxy, origins, token):
    proxy = start_proxy("--insecure")
    bad = origins["selfsigned"]
    for i in range(2):
        fetch(proxy, "good.test", bad, token, i)
    for t in upstream_tls(proxy, 2):
        assert t["resumed"] is False and t["verified"] is False and t["insecure"] is True


def test_resumption_can_be_turned_off(start_proxy, origin, token, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("upstream_tls_resumption = false\n")
    proxy = start_proxy("--config", str(cfg))
    for i in range(2):
        fetch(proxy, "good.test", origin, token, i)
    assert [t["resumed"] for t in upstream_tls(proxy, 2)] == [False, False]


def test_a_wrong_certificate_after_a_good_one_is_still_refused(proxy, origins, token):
    """Sessions are per name and port: a different origin under the same name gets a full handshake
    and is refused as it would be without resumption."""
    fetch(proxy, "good.test", origins["good"], token, 0)
    r = proxy.curl("-w", "\n%{http_code}", *https("good.test", origins["wronghost"], f"/hello?t={token}&i=1"))
    assert r.out.endswith(b"502"), str(r)
    flows = sorted(proxy.flows(2), key=lambda f: f["request"]["target"])
    assert flows[1]["error"]["kind"] == "upstream_certificate" and flows[1]["tls"]["upstream"]["resumed"] is False
