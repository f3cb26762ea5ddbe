"""ca.mint: every field of a minted leaf (parsed with `cryptography`), `openssl verify`, and real
handshakes through Python's ssl module with a client that trusts only the CA."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st
from M2Crypto import EVP, RSA, util

from ca.authority import CA, CA_CERT, load_or_create
from ca.mint import cert_to_pem, key_type_of, mint, new_leaf_key, random_serial
from proxy.errors import CAError

DAY = 86_400
CA_MADE = 1_780_000_000.0  # 2026-05-28T20:26:40Z
NOW = CA_MADE + 30 * DAY
SERIAL = (1 << 126) | 0xC0FFEE


@pytest.fixture(scope="module")
def ec_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return load_or_create(tmp_path_factory.mktemp("ec") / "conf", now=CA_MADE)


@pytest.fixture(scope="module")
def rsa_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return load_or_create(tmp_path_factory.mktemp("rsa") / "conf", key_type="rsa", now=CA_MADE)


@pytest.fixture(scope="module")
def leaf_key() -> EVP.PKey:
    return new_leaf_key()


def parsed(ca: CA, leaf_key: EVP.PKey, host: str, now: float = NOW, serial: int = SERIAL) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_to_pem(mint(ca, leaf_key, host, now, serial)))


def sans(cert: x509.Certificate) -> list:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(ext.value)


def test_dns_leaf_fields(ec_ca: CA, leaf_key: EVP.PKey) -> None:
    cert = parsed(ec_ca, leaf_key, "www.example.test")
    ca_cert = x509.load_pem_x509_certificate(ec_ca.cert_pem)
    assert cert.version == x509.Version.v3
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "www.example.test"
    assert sans(cert) == [x509.DNSName("www.example.test")]
    assert cert.issuer == ca_cert.subject
    assert cert.issuer.public_bytes() == ca_cert.subject.public_bytes()
    assert cert.serial_number == SERIAL
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))

    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_encipherment or ku.value.key_cert_sign or ku.value.crl_sign)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical

    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ec_ca.ski
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    assert ski.digest != ec_ca.ski


def test_validity_window(ec_ca: CA, leaf_key: EVP.PKey) -> None:
    cert = parsed(ec_ca, leaf_key, "a.test")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert start == dt.datetime.fromtimestamp(NOW - 2 * DAY, dt.timezone.utc)
    assert end == dt.datetime.fromtimestamp(NOW + 180 * DAY, dt.timezone.utc)
    assert end - start <= dt.timedelta(days=200)  # CA/B Forum limit from 2026-03-15


def test_validity_stays_inside_the_ca(ec_ca: CA, leaf_key: EVP.PKey) -> None:
    fresh = parsed(ec_ca, leaf_key, "a.test", now=CA_MADE)
    assert fresh.not_valid_before_utc == ec_ca.not_before  # not before the CA itself
    late = ec_ca.not_after.timestamp() - 10 * DAY
    assert parsed(ec_ca, leaf_key, "a.test", now=late).not_valid_after_utc == ec_ca.not_after
    with pytest.raises(CAError, match="not valid at the current time"):
        mint(ec_ca, leaf_key, "a.test", ec_ca.not_after.timestamp() + 3 * DAY, SERIAL)


@pytest.mark.parametrize(
    "host, ip",
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("2001:DB8::1", "2001:db8::1"), ("[2001:db8::2]", "2001:db8::2"),
     ("fe80::1%eth0", "fe80::1")],
)
def test_ip_literals_get_an_ip_san(ec_ca: CA, leaf_key: EVP.PKey, host: str, ip: str) -> None:
    cert = parsed(ec_ca, leaf_key, host)
    assert sans(cert) == [x509.IPAddress(ipaddress.ip_address(ip))]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ip


def test_host_is_normalized(ec_ca: CA, leaf_key: EVP.PKey) -> None:
    assert sans(parsed(ec_ca, leaf_key, "WWW.Example.TEST.")) == [x509.DNSName("www.example.test")]


def test_long_host_has_no_cn_and_a_critical_san(ec_ca: CA, leaf_key: EVP.PKey) -> None:
    host = "a" * 60 + ".example.test"
    cert = parsed(ec_ca, leaf_key, host)
    assert len(cert.subject) == 0
    assert sans(cert) == [x509.DNSName(host)]
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical  # RFC 5280 4.2.1.6
    exactly_64 = "b" * 51 + ".example.test"
    assert parsed(ec_ca, leaf_key, exactly_64).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == exactly_64


@pytest.mark.parametrize(
    "host", ["", " ", ".", "a..b", "a.test, IP:10.0.0.1", "a.test,DNS:evil.test", "*.example.test",
             "a" * 64 + ".test", "bücher.example", "a/b", ("a" * 60 + ".") * 5 + "test"],
)
def test_bad_hosts_are_rejected(ec_ca: CA, leaf_key: EVP.PKey, host: str) -> None:
    with pytest.raises(ValueError):
        mint(ec_ca, leaf_key, host, NOW, SERIAL)


@pytest.mark.parametrize("serial", [0, -1, 2**159])
def test_bad_serials_are_rejected(ec_ca: CA, leaf_key: EVP.PKey, serial: int) -> None:
    with pytest.raises(ValueError, match="serial"):
        mint(ec_ca, leaf_key, "a.test", NOW, serial)


def test_rsa_ca_and_rsa_leaf_key(rsa_ca: CA, leaf_key: EVP.PKey) -> None:
    cert = parsed(rsa_ca, leaf_key, "a.test")
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    rsa_leaf = EVP.PKey()
    rsa_leaf.assign_rsa(RSA.gen_key(2048, 65537, callback=util.quiet_genparam_callback))
    ku = parsed(rsa_ca, rsa_leaf, "a.test").extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment


def test_random_serial_bounds() -> None:
    assert random_serial(lambda n: bytes(n)) == 1 << 126  # never 0
    assert random_serial(lambda n: b"\xff" * n) == 2**127 - 1
    serials = {random_serial() for _ in range(100)}
    assert len(serials) == 100
    with pytest.raises(ValueError):
        random_serial(lambda n: bytes(8))


@given(st.binary(min_size=16, max_size=16))
def test_random_serial_is_positive_127_bits(raw: bytes) -> None:
    serial = random_serial(lambda n: raw)
    assert serial > 0 and serial.bit_length() == 127
    assert serial & ((1 << 126) - 1) == int.from_bytes(raw, "big") >> 1 & ((1 << 126) - 1)  # 126 bits kept


def test_leaf_key_is_ec_and_not_the_ca_key(ec_ca: CA) -> None:
    key = new_leaf_key()
    assert key_type_of(key) == "ec"
    assert key.as_der() != ec_ca.key.as_der()
    assert key.as_der() != new_leaf_key().as_der()


def write_pair(tmp_path: Path, ca: CA, leaf_key: EVP.PKey, host: str, now: float) -> tuple[Path, Path]:
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf-key.pem"
    cert_file.write_bytes(cert_to_pem(mint(ca, leaf_key, host, now, random_serial())))
    key_file.write_bytes(leaf_key.as_pem(cipher=None))
    return cert_file, key_file


@pytest.mark.parametrize("which", ["ec", "rsa"])
@pytest.mark.parametrize("host", ["www.example.test", "127.0.0.1", "::1"])
def test_openssl_verify_strict(tmp_path: Path, ec_ca: CA, rsa_ca: CA, leaf_key: EVP.PKey, which: str, host: str) -> None:
    ca = ec_ca if which == "ec" else rsa_ca
    cert_file, _ = write_pair(tmp_path, ca, leaf_key, host, NOW)
    flag = ["-verify_ip", host] if ":" in host or host[0].isdigit() else ["-verify_hostname", host]
    result = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-attime", str(int(NOW)), *flag,
         "-CAfile", str(ca.confdir / CA_CERT), str(cert_file)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


# --- real handshakes: stdlib server with the minted leaf, stdlib client trusting only the CA ------


@pytest.fixture(scope="module")
def live_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return load_or_create(tmp_path_factory.mktemp("live") / "conf")  # real clock: ssl checks dates


def handshake(tmp_path: Path, ca: CA, minted_for: str, server_hostname: str) -> bytes:
    cert_file, key_file = write_pair(tmp_path, ca, new_leaf_key(), minted_for, time.time())
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError):
            pass  # the client refused us; the client side reports why

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(ca.confdir / CA_CERT))  # trusts only our CA
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                return tls.recv(5)
    finally:
        thread.join(10)
        listener.close()


@pytest.mark.parametrize("host", ["www.example.test", "127.0.0.1"])
def test_handshake_with_minted_leaf(tmp_path: Path, live_ca: CA, host: str) -> None:
    assert handshake(tmp_path, live_ca, host, host) == b"hello"


def test_handshake_fails_for_a_wrong_name(tmp_path: Path, live_ca: CA) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(tmp_path, live_ca, "www.example.test", "other.example.test")


def test_handshake_fails_for_a_wrong_ip(tmp_path: Path, live_ca: CA) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        handshake(tmp_path, live_ca, "127.0.0.2", "127.0.0.1")
