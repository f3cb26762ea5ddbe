"""ca.commands: `httpsdump ca path|show|export` output, export round trips, and refusals."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest
from cryptography import x509

from ca.authority import CA, CA_CERT, CA_CERT_DER, CA_KEY, load_or_create
from ca.commands import cmd_export, cmd_path, cmd_show
from proxy.errors import CAError


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return load_or_create(tmp_path / "conf")  # the commands use the real clock


def test_path(ca: CA) -> None:
    out = io.StringIO()
    assert cmd_path(ca.confdir, out) == 0
    assert out.getvalue() == f"{ca.confdir / CA_CERT}\n"


def test_show(ca: CA) -> None:
    out = io.StringIO()
    assert cmd_show(ca.confdir, out) == 0
    text = out.getvalue()
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    for expected in [
        "subject:", "O=httpsdump, CN=httpsdump CA", "issuer:", f"{cert.serial_number:x}",
        f"not before:        {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
        f"not after:         {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
        "key type:          ec", ca.fingerprint_sha256,
        str(ca.confdir / CA_CERT), str(ca.confdir / CA_CERT_DER), str(ca.confdir / CA_KEY),
    ]:
        assert expected in text
    assert "PRIVATE KEY" not in text and "BEGIN" not in text


@pytest.mark.parametrize("output", [None, "-"])
def test_export_pem_to_stdout(ca: CA, output: str | None) -> None:
    out = io.BytesIO()
    assert cmd_export(ca.confdir, "pem", output, out) == 0
    assert out.getvalue() == (ca.confdir / CA_CERT).read_bytes()
    assert x509.load_pem_x509_certificate(out.getvalue()) == x509.load_pem_x509_certificate(ca.cert_pem)


def test_export_der_to_stdout(ca: CA) -> None:
    out = io.BytesIO()
    assert cmd_export(ca.confdir, "der", None, out) == 0
    assert x509.load_der_x509_certificate(out.getvalue()) == x509.load_pem_x509_certificate(ca.cert_pem)


@pytest.mark.parametrize("fmt, parse", [("pem", x509.load_pem_x509_certificate), ("der", x509.load_der_x509_certificate)])
def test_export_to_a_file_is_0644(tmp_path: Path, ca: CA, fmt: str, parse) -> None:
    target = tmp_path / f"out.{fmt}"
    out = io.BytesIO()
    old = os.umask(0o077)  # the mode must be exact anyway
    try:
        assert cmd_export(ca.confdir, fmt, str(target), out) == 0
    finally:
        os.umask(old)
    assert out.getvalue() == b""
    assert target.stat().st_mode & 0o777 == 0o644
    assert parse(target.read_bytes()) == x509.load_pem_x509_certificate(ca.cert_pem)
    cmd_export(ca.confdir, fmt, str(target), out)  # overwriting an earlier export is fine
    assert parse(target.read_bytes()) == x509.load_pem_x509_certificate(ca.cert_pem)


@pytest.mark.parametrize("fmt", ["pem", "der"])
def test_export_never_contains_the_key(tmp_path: Path, ca: CA, fmt: str) -> None:
    out = io.BytesIO()
    cmd_export(ca.confdir, fmt, None, out)
    cmd_export(ca.confdir, fmt, str(tmp_path / "x"), out)
    key_pem = ca.key.as_pem(cipher=None)
    key_der = base64.b64decode(b"".join(key_pem.splitlines()[1:-1]))  # PKCS#8 with the private scalar
    for data in (out.getvalue(), (tmp_path / "x").read_bytes()):
        assert b"PRIVATE KEY" not in data
        assert key_der not in data and key_pem not in data


def test_export_refuses_to_overwrite_the_key(ca: CA) -> None:
    key = ca.confdir / CA_KEY
    before = key.read_bytes()
    with pytest.raises(CAError, match="refusing to overwrite the CA key"):
        cmd_export(ca.confdir, "pem", str(key), io.BytesIO())
    assert key.read_bytes() == before


@pytest.mark.parametrize("fmt", ["p12", "PEM ", "key", ""])
def test_export_unknown_format(ca: CA, fmt: str) -> None:
    with pytest.raises(CAError, match="unknown export format.*pem, der"):
        cmd_export(ca.confdir, fmt, None, io.BytesIO())


def test_export_to_an_unwritable_place(tmp_path: Path, ca: CA) -> None:
    with pytest.raises(CAError, match="cannot write"):
        cmd_export(ca.confdir, "pem", str(tmp_path / "missing-dir" / "ca.pem"), io.BytesIO())


def test_commands_never_create_a_ca(tmp_path: Path) -> None:
    confdir = tmp_path / "empty"
    for call in (lambda: cmd_path(confdir, io.StringIO()), lambda: cmd_show(confdir, io.StringIO()),
                 lambda: cmd_export(confdir, "pem", None, io.BytesIO())):
        with pytest.raises(CAError, match="no CA in .* yet: run httpsdump once"):
            call()
    assert not confdir.exists()


def test_commands_report_load_errors(ca: CA) -> None:
    (ca.confdir / CA_KEY).chmod(0o644)
    for call in (lambda: cmd_path(ca.confdir, io.StringIO()), lambda: cmd_show(ca.confdir, io.StringIO()),
                 lambda: cmd_export(ca.confdir, "der", None, io.BytesIO())):
        with pytest.raises(CAError, match="chmod 600"):
            call()
