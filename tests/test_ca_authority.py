"""ca.authority: creating, reusing and refusing CAs, checked against files and with `cryptography`."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca.authority import CA_CERT, CA_CERT_DER, CA_KEY, load, load_or_create
from proxy.errors import CAError

NOW = 1_780_000_000.0  # 2026-05-28T20:26:40Z
DAY = 86_400


def utc(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def openssl_ca(confdir: Path, *, newkey: list[str], exts: list[str], days: int = 30) -> None:
    """A user-made CA (or non-CA) in `confdir`, created by the openssl CLI, valid from now."""
    confdir.mkdir(mode=0o700, exist_ok=True)
    cmd = ["openssl", "req", "-x509", "-nodes", "-newkey", *newkey, "-subj", "/CN=My Own CA",
           "-days", str(days), "-keyout", str(confdir / CA_KEY), "-out", str(confdir / CA_CERT)]
    for ext in exts:
        cmd += ["-addext", ext]
    subprocess.run(cmd, check=True, capture_output=True)
    os.chmod(confdir / CA_KEY, 0o600)


CA_EXTS = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"]
RSA_2048 = ["rsa:2048"]
EC_P256 = ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    return tmp_path / "conf"


def test_new_ec_ca_files_and_modes(confdir: Path) -> None:
    ca = load_or_create(confdir, now=NOW)
    assert confdir.stat().st_mode & 0o777 == 0o700
    assert (confdir / CA_KEY).stat().st_mode & 0o777 == 0o600
    assert (confdir / CA_CERT).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in confdir.iterdir()) == sorted([CA_CERT, CA_CERT_DER, CA_KEY])  # no temp files
    assert (confdir / CA_CERT).read_bytes() == ca.cert_pem
    der = x509.load_der_x509_certificate((confdir / CA_CERT_DER).read_bytes())
    assert der == x509.load_pem_x509_certificate(ca.cert_pem)
    assert b"BEGIN PRIVATE KEY" in (confdir / CA_KEY).read_bytes()  # unencrypted PKCS#8
    assert ca.key_type == "ec"


def test_new_ca_certificate_fields(confdir: Path) -> None:
    ca = load_or_create(confdir, now=NOW)
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert.version == x509.Version.v3
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "httpsdump CA"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "httpsdump"
    assert cert.issuer == cert.subject
    assert 0 < cert.serial_number < 2**159
    assert cert.not_valid_before_utc == utc(NOW - DAY)
    assert cert.not_valid_after_utc == utc(NOW - DAY + 3650 * DAY)
    assert (ca.not_before, ca.not_after) == (cert.not_valid_before_utc, cert.not_valid_after_utc)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == ca.ski == x509.SubjectKeyIdentifier.from_public_key(pub).digest
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # self-signed
    assert ca.subject == "O=httpsdump, CN=httpsdump CA"
    expected_fp = cert.fingerprint(hashes.SHA256()).hex().upper()
    assert ca.fingerprint_sha256.replace(":", "") == expected_fp
    assert ca.fingerprint_sha256.count(":") == 31


def test_rsa_option(confdir: Path) -> None:
    ca = load_or_create(confdir, key_type="rsa", now=NOW)
    pub = x509.load_pem_x509_certificate(ca.cert_pem).public_key()
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
    assert ca.key_type == "rsa"
    assert load(confdir, now=NOW).key_type == "rsa"


def test_unknown_key_type(confdir: Path) -> None:
    with pytest.raises(CAError, match="'ec'.*'rsa'"):
        load_or_create(confdir, key_type="dsa", now=NOW)


def test_modes_are_exact_even_with_a_permissive_umask(confdir: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create(confdir, now=NOW)
    finally:
        os.umask(old)
    assert confdir.stat().st_mode & 0o777 == 0o700
    assert (confdir / CA_KEY).stat().st_mode & 0o777 == 0o600


def test_second_load_reuses_the_ca(confdir: Path) -> None:
    first = load_or_create(confdir, now=NOW)
    key_bytes = (confdir / CA_KEY).read_bytes()
    again = load_or_create(confdir, now=NOW + 400 * DAY)
    assert again.fingerprint_sha256 == first.fingerprint_sha256
    assert again.ski == first.ski
    assert (confdir / CA_KEY).read_bytes() == key_bytes
    assert load(confdir, now=NOW).fingerprint_sha256 == first.fingerprint_sha256


def test_der_is_regenerated_from_pem(confdir: Path) -> None:
    ca = load_or_create(confdir, now=NOW)
    (confdir / CA_CERT_DER).unlink()
    load_or_create(confdir, now=NOW)
    assert x509.load_der_x509_certificate((confdir / CA_CERT_DER).read_bytes()) == (
        x509.load_pem_x509_certificate(ca.cert_pem)
    )


def test_load_never_creates(confdir: Path) -> None:
    with pytest.raises(CAError, match=f"no CA in {confdir} yet: run httpsdump once to create it"):
        load(confdir, now=NOW)
    assert not confdir.exists()


def test_repr_never_shows_the_key(confdir: Path) -> None:
    ca = load_or_create(confdir, now=NOW)
    text = repr(ca)
    assert "httpsdump CA" in text and ca.fingerprint_sha256 in text
    assert "PRIVATE" not in text and "PKey" not in text and "key=" not in text


@pytest.mark.parametrize("newkey, kind", [(RSA_2048, "rsa"), (EC_P256, "ec")])
def test_user_supplied_ca_is_accepted(confdir: Path, newkey: list[str], kind: str) -> None:
    openssl_ca(confdir, newkey=newkey, exts=CA_EXTS)
    ca = load_or_create(confdir)  # real clock: openssl made it valid from now
    assert ca.key_type == kind
    assert ca.subject == "CN=My Own CA"
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert ca.ski == cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert (confdir / CA_CERT_DER).exists()


def test_group_readable_key_is_refused(confdir: Path) -> None:
    load_or_create(confdir, now=NOW)
    key = confdir / CA_KEY
    for mode in (0o640, 0o604, 0o660):
        key.chmod(mode)
        with pytest.raises(CAError, match=f"chmod 600 {key}"):
            load_or_create(confdir, now=NOW)
        with pytest.raises(CAError, match="accessible to other users"):
            load(confdir, now=NOW)


@pytest.mark.parametrize("keep", [CA_KEY, CA_CERT])
def test_only_one_file_is_refused(confdir: Path, keep: str) -> None:
    load_or_create(confdir, now=NOW)
    gone = CA_CERT if keep == CA_KEY else CA_KEY
    (confdir / gone).unlink()
    with pytest.raises(CAError) as err:
        load_or_create(confdir, now=NOW)
    assert f"{confdir / gone} is missing" in str(err.value)
    assert f"delete {confdir / keep}" in str(err.value)
    assert not (confdir / gone).exists()  # nothing was silently re-created


@pytest.mark.parametrize(
    "name, data, message",
    [
        (CA_CERT, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "not a readable PEM certificate"),
        (CA_CERT, b"", "not a readable PEM certificate"),
        (CA_KEY, b"garbage", "not a readable unencrypted PEM private key"),
    ],
)
def test_corrupt_files_are_refused(confdir: Path, name: str, data: bytes, message: str) -> None:
    load_or_create(confdir, now=NOW)
    (confdir / name).write_bytes(data)
    with pytest.raises(CAError, match=message) as err:
        load(confdir, now=NOW)
    assert str(confdir / name) in str(err.value)
    assert "delete" in str(err.value)


def test_encrypted_key_is_refused_without_prompting(confdir: Path) -> None:
    load_or_create(confdir, now=NOW)
    key = confdir / CA_KEY
    plain = key.read_bytes()
    subprocess.run(["openssl", "pkey", "-in", str(key), "-out", f"{key}.enc", "-aes128", "-passout", "pass:pw"],
                   check=True, capture_output=True)
    os.replace(f"{key}.enc", key)
    with pytest.raises(CAError, match="encrypted") as err:
        load(confdir, now=NOW)
    # The hint works as written (openssl cannot decrypt in place: -out truncates -in first).
    hint = str(err.value).split("`")[1]
    subprocess.run(hint.replace("openssl pkey", "openssl pkey -passin pass:pw", 1), shell=True, check=True,
                   capture_output=True)
    assert (key.stat().st_mode & 0o077) == 0
    assert load(confdir, now=NOW).key.as_pem(cipher=None) == plain


def test_mismatched_key_is_refused(tmp_path: Path, confdir: Path) -> None:
    load_or_create(confdir, now=NOW)
    load_or_create(tmp_path / "other", now=NOW)
    (confdir / CA_KEY).write_bytes((tmp_path / "other" / CA_KEY).read_bytes())
    with pytest.raises(CAError, match="does not belong to the certificate"):
        load(confdir, now=NOW)


def test_non_ca_certificate_is_refused(confdir: Path) -> None:
    openssl_ca(confdir, newkey=EC_P256, exts=["basicConstraints=critical,CA:FALSE"])
    with pytest.raises(CAError, match="not a CA certificate.*CA:TRUE"):
        load_or_create(confdir)


def test_ca_without_cert_sign_usage_is_refused(confdir: Path) -> None:
    openssl_ca(confdir, newkey=EC_P256, exts=["basicConstraints=critical,CA:TRUE", "keyUsage=critical,digitalSignature"])
    with pytest.raises(CAError, match="not a CA certificate"):
        load(confdir)


def test_small_rsa_key_is_refused(confdir: Path) -> None:
    openssl_ca(confdir, newkey=["rsa:1024"], exts=CA_EXTS)
    with pytest.raises(CAError, match="RSA-1024.*at least 2048"):
        load(confdir)


def test_expired_ca_is_refused(confdir: Path) -> None:
    ca = load_or_create(confdir, now=NOW)
    later = ca.not_after.timestamp() + 1
    with pytest.raises(CAError, match=f"{confdir / CA_CERT} expired on .*delete"):
        load_or_create(confdir, now=later)
    load(confdir, now=later - 2)  # still fine a moment before


def test_not_yet_valid_ca_is_refused(confdir: Path) -> None:
    load_or_create(confdir, now=NOW)
    with pytest.raises(CAError, match="not valid before .*check this machine's clock"):
        load(confdir, now=NOW - 2 * DAY)


def test_confdir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(CAError, match="not a directory"):
        load_or_create(path, now=NOW)
