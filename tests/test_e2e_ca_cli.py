"""End to end, the local CA and the command line: files and modes, refusing an exposed key, the
`ca show|export|path` commands, the key never leaking into any output, and config-file errors."""

from __future__ import annotations

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from helpers import https, run_cli
from origin import HELLO_BODY
from pki import cert_sha256, load_cert

CA_PEM, CA_CER, CA_KEY = "httpsdump-ca.pem", "httpsdump-ca.cer", "httpsdump-ca-key.pem"


def key_secrets(key_path) -> list[bytes]:
    """Byte strings that must never appear in any output: the key's PEM body lines, its DER, and the
    private number itself (raw and in hex)."""
    pem = key_path.read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    body_lines = [ln for ln in pem.splitlines() if ln and not ln.startswith(b"-----")]
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        secret = key.private_numbers().private_value
    else:
        assert isinstance(key, rsa.RSAPrivateKey)
        secret = key.private_numbers().d
    raw = secret.to_bytes((secret.bit_length() + 7) // 8, "big")
    return [ln for ln in body_lines if len(ln) >= 16] + [der, raw, raw.hex().encode(), raw.hex().upper().encode()]


def test_ca_files_created_with_safe_modes(proxy):
    d = proxy.confdir
    pem, cer, key = d / CA_PEM, d / CA_CER, d / CA_KEY
    for p in (pem, cer, key):
        assert p.is_file(), p
    assert proxy.ca_pem == pem
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    ca = load_cert(pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert_sha256(load_cert(cer)) == cert_sha256(ca)
    k = serialization.load_pem_private_key(key.read_bytes(), password=None)
    assert k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_ca_is_reused_on_restart(start_proxy, tmp_path):
    first = start_proxy(confdir=tmp_path / "conf")
    fp = cert_sha256(load_cert(first.ca_pem))
    first.stop()
    second = start_proxy(confdir=tmp_path / "conf")
    assert cert_sha256(load_cert(second.ca_pem)) == fp


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_exposed_ca_key_is_refused(start_proxy, pki, mode):
    p = start_proxy()
    confdir = p.confdir
    p.stop()
    (confdir / CA_KEY).chmod(mode)
    r = run_cli("--listen-host", "127.0.0.1", "--listen-port", "0", "--confdir", confdir,
                "--upstream-ca", pki.root_pem, timeout=20)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "chmod" in err
    assert "listening on" not in err


def test_ca_show_export_path(proxy):
    d = proxy.confdir
    ca = load_cert(d / CA_PEM)
    fp = cert_sha256(ca)

    show = run_cli("ca", "show", "--confdir", d)
    assert show.returncode == 0, show.stderr
    assert fp in show.stdout.decode().lower().replace(":", "")

    der = run_cli("ca", "export", "--format", "der", "--confdir", d)
    assert der.returncode == 0, der.stderr
    assert not der.stdout.startswith(b"-----")
    assert cert_sha256(x509.load_der_x509_certificate(der.stdout)) == fp

    pem = run_cli("ca", "export", "--confdir", d)
    assert pem.returncode == 0, pem.stderr
    certs = x509.load_pem_x509_certificates(pem.stdout)
    assert [cert_sha256(c) for c in certs] == [fp]
    assert b"PRIVATE KEY" not in pem.stdout

    path = run_cli("ca", "path", "--confdir", d)
    assert path.returncode == 0, path.stderr
    assert path.stdout.decode().strip() == str(d / CA_PEM)


def test_ca_key_never_in_any_output(proxy, origin, token):
    r = proxy.curl(*https("good.test", origin, f"/hello?t={token}"))
    assert r.rc == 0 and r.out == HELLO_BODY, str(r)
    proxy.flows(1)
    d = proxy.confdir
    outputs = {
        "proxy stdout": proxy.stdout_bytes(),
        "proxy stderr": proxy.stderr_bytes(),
        "flow log": proxy.log_path.read_bytes(),
    }
    for args in (["ca", "show"], ["ca", "path"], ["ca", "export"], ["ca", "export", "--format", "der"]):
        p = run_cli(*args, "--confdir", d)
        assert p.returncode == 0, p.stderr
        outputs[" ".join(args) + " stdout"] = p.stdout
        outputs[" ".join(args) + " stderr"] = p.stderr
    secrets = key_secrets(d / CA_KEY)
    for where, data in outputs.items():
        assert b"PRIVATE KEY" not in data, where
        for s in secrets:
            assert s not in data, f"CA key material in {where}"


def test_unknown_config_key_exits_2(tmp_path):
    cfg = tmp_path / "httpsdump.toml"
    cfg.write_text('listen_port = 0\nno_such_setting = 1\n')
    r = run_cli("--config", cfg, "--confdir", tmp_path / "conf", "--listen-host", "127.0.0.1", "--listen-port", "0",
                timeout=20)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "no_such_setting" in err
    assert "listening on" not in err


def test_bad_config_value_exits_2(tmp_path):
    cfg = tmp_path / "httpsdump.toml"
    cfg.write_text('listen_port = "eighty"\n')
    r = run_cli("--config", cfg, "--confdir", tmp_path / "conf", timeout=20)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "listen_port" in err


def test_config_file_is_applied(start_proxy, origin, token, tmp_path):
    cfg = tmp_path / "httpsdump.toml"
    cfg.write_text("body_capture_limit = 100\n")
    proxy = start_proxy("--config", cfg)
    r = proxy.curl(*https("good.test", origin, f"/bytes?n=5000&t={token}"), "-o", "/dev/null", "-w", "%{size_download}")
    assert r.rc == 0 and r.out == b"5000", str(r)
    body = proxy.flow()["response"]["body"]
    assert body["size"] == 5000 and body["captured"] == 100 and body["truncated"] is True
