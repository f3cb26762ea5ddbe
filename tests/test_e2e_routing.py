"""What is inspected and how origins are reached: --ignore-hosts / --allow-hosts passthrough,
--upstream-proxy (a second real proxy process), and --client-cert for mutual-TLS origins."""

from __future__ import annotations

import datetime as dt
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import https, run_curl
from test_e2e_relay import ScriptedOrigin, read_head


def test_ignored_host_is_tunnelled_untouched(start_proxy, origin, origins, pki, token):
    p = start_proxy("--ignore-hosts", "good.test")
    # The client sees the ORIGIN's certificate: it verifies against the origin's root, not the proxy CA.
    r = run_curl(*https("good.test", origin, f"/hello?{token}"), proxy_url=p.url, cacert=pki.root_pem)
    assert r.rc == 0 and r.out, str(r)
    refused = run_curl(*https("good.test", origin, f"/hello?{token}"), proxy_url=p.url, cacert=p.ca_pem)
    assert refused.rc != 0  # proof that the proxy did not terminate TLS
    flows = p.flows(2)
    assert {f["mode"] for f in flows} == {"passthrough"}
    t = flows[0]["tunnel"]
    assert t["port"] == origin.port and t["bytes_from_client"] > 200 and t["bytes_from_server"] > 200
    assert flows[0]["tls"]["client"]["sni"] == "good.test" and flows[0]["request"] is None
    # Other hosts are still intercepted.
    ok = run_curl(*https("a.wild.test", origins["wildcard"], "/hello"), proxy_url=p.url, cacert=p.ca_pem)
    assert ok.rc == 0, str(ok)
    assert p.flows(3)[-1]["mode"] == "https"


def test_allow_hosts_intercepts_only_the_listed_ones(start_proxy, origins, pki):
    good, wild = origins["good"], origins["wildcard"]
    p = start_proxy("--allow-hosts", "*.wild.test")
    inspected = run_curl(*https("a.wild.test", wild, "/hello"), proxy_url=p.url, cacert=p.ca_pem)
    assert inspected.rc == 0, str(inspected)
    tunnelled = run_curl(*https("good.test", good, "/hello"), proxy_url=p.url, cacert=pki.root_pem)
    assert tunnelled.rc == 0, str(tunnelled)
    modes = sorted(f["mode"] for f in p.flows(2))
    assert modes == ["https", "passthrough"]


def test_upstream_proxy_carries_every_origin_connection(start_proxy, origin, origins, token):
    # The second proxy tunnels everything untouched and wants credentials: a corporate proxy stand-in.
    corp = start_proxy("--ignore-hosts", "*", "--proxy-auth", "corp:pw")
    p = start_proxy("--upstream-proxy", f"http://corp:pw@127.0.0.1:{corp.port}")
    r = run_curl(*https("good.test", origin, f"/hello?{token}"), proxy_url=p.url, cacert=p.ca_pem)
    assert r.rc == 0, str(r)
    flow = p.flow()
    assert flow["tls"]["upstream"]["verified"] is True  # still verified end to end by httpsdump
    (tunnel,) = corp.flows(1)
    assert tunnel["mode"] == "passthrough" and tunnel["tunnel"]["port"] == origin.port
    # Plain HTTP goes through it as well (CONNECT, then HTTP inside).
    plain = origins["plain"]
    r2 = run_curl(f"http://127.0.0.1:{plain.port}/hello?{token}", proxy_url=p.url)
    assert r2.rc == 0, str(r2)


def test_upstream_proxy_refusal_is_a_readable_502(start_proxy, origin):
    corp = start_proxy("--ignore-hosts", "*", "--proxy-auth", "corp:pw")
    p = start_proxy("--upstream-proxy", f"http://corp:WRONG@127.0.0.1:{corp.port}")
    r = run_curl("-w", "%{http_code}", *https("good.test", origin, "/hello"), proxy_url=p.url, cacert=p.ca_pem)
    assert r.out.endswith(b"502") and b"refused CONNECT" in r.out and b"407" in r.out, str(r)


def _client_cert(pki, tmp_path):
    root_key = serialization.load_pem_private_key(pki.root_key.read_bytes(), None)
    root = x509.load_pem_x509_certificate(pki.root_pem.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
            .issuer_name(root.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=5))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(root_key, hashes.SHA256()))
    path = tmp_path / "client.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


def test_client_certificate_for_a_mutual_tls_origin(start_proxy, pki, tmp_path):
    seen = []

    def mtls(s):
        seen.append(s.getpeercert())
        read_head(s)
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    origin = ScriptedOrigin(pki, mtls)
    origin.ctx.verify_mode = ssl.CERT_REQUIRED
    origin.ctx.load_verify_locations(str(pki.root_pem))
    try:
        without = start_proxy()
        r = run_curl("-w", "%{http_code}", *https("good.test", origin, "/"), proxy_url=without.url,
                     cacert=without.ca_pem)
        assert r.out.endswith(b"502"), str(r)  # the origin refused the handshake: a readable error
        p = start_proxy("--client-cert", f"*.test={_client_cert(pki, tmp_path)}")
        r = run_curl(*https("good.test", origin, "/"), proxy_url=p.url, cacert=p.ca_pem)
        assert r.rc == 0 and r.out == b"ok", str(r)
        assert seen and dict(x[0] for x in seen[-1]["subject"])["commonName"] == "client"
    finally:
        origin.close()
