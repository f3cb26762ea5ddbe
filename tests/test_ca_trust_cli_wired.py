"""`httpsdump ca trust|untrust` through the real CLI: needs the cli.py hook."""

from __future__ import annotations

from helpers import run_cli


def test_cli_trust_untrust_nss_and_exit_codes(tmp_path):
    conf, db = tmp_path / "conf", tmp_path / "nssdb"
    assert run_cli("ca", "show", "--confdir", conf).returncode == 2  # no CA yet; trust never creates one
    from ca.authority import load_or_create

    ca = load_or_create(conf)
    db.mkdir()
    r = run_cli("ca", "trust", "--nss", f"sql:{db}", "--confdir", conf)
    assert r.returncode == 0, r.stderr
    assert f"added httpsdump CA (SHA-256 {ca.fingerprint_sha256}) to NSS database sql:{db}".encode() in r.stdout
    r = run_cli("ca", "trust", "--nss", f"sql:{db}", "--confdir", conf)
    assert r.returncode == 0 and r.stdout.startswith(b"already trusted: nothing changed")
    r = run_cli("ca", "trust", "--confdir", conf)
    assert r.returncode == 2 and b"--nss [DB] and/or --system" in r.stderr
    r = run_cli("ca", "trust", "--nss", str(tmp_path / "missing"), "--confdir", conf)
    assert r.returncode == 2 and b"does not exist" in r.stderr
    r = run_cli("ca", "untrust", "--nss", f"sql:{db}", "--confdir", conf)
    assert r.returncode == 0 and r.stdout.startswith(b"removed httpsdump CA")
