"""`httpsdump ca trust|untrust` (ca/trust.py) against real tools on temporary stores.

NSS: real certutil (libnss3-tools) on databases under tmp_path. System store: the real
update-ca-certificates with every directory it uses redirected into tmp_path (--certsconf, --certsdir,
--localcertsdir, --etccertsdir, --hooksdir), so the machine's own trust store is never touched.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from ca import trust
from ca.authority import load_or_create
from proxy.errors import CAError, ConfigError

CERTUTIL = shutil.which("certutil")
UPDATE = shutil.which("update-ca-certificates")


def _need(tool: str | None, name: str, package: str) -> str:
    # The CI installs these (.ci/run); a machine without them fails loudly, never skips.
    assert tool, f"{name} is needed by these tests: apt-get install {package}"
    return tool


@pytest.fixture
def ca(tmp_path):
    return load_or_create(tmp_path / "conf")


@pytest.fixture
def other_ca(tmp_path):
    """A second httpsdump CA: same subject (O=httpsdump, CN=httpsdump CA), so NSS gives it the same nickname."""
    return load_or_create(tmp_path / "conf2")


@pytest.fixture
def nssdir(tmp_path) -> Path:
    _need(CERTUTIL, "certutil", "libnss3-tools")
    d = tmp_path / "nssdb"
    d.mkdir()
    return d


def certutil(db: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([_need(CERTUTIL, "certutil", "libnss3-tools"), "-d", f"sql:{db}", *args],
                          capture_output=True, text=True, timeout=60, check=check)


def nss_listing(db: Path) -> list[tuple[str, str]]:
    """(nickname, trust) rows of `certutil -L`."""
    rows = []
    for line in certutil(db, "-L").stdout.splitlines():
        m = re.match(r"^(\S.*?)\s+([A-Za-z]*,[A-Za-z]*,[A-Za-z]*)\s*$", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


def nss_fingerprints(db: Path, nickname: str = "httpsdump") -> dict[str, str]:
    """SHA-256 fingerprint -> SSL trust flags text, for every certificate under `nickname`."""
    p = certutil(db, "-L", "-n", nickname, check=False)
    if p.returncode != 0:
        return {}
    out, fp = {}, None
    lines = p.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Fingerprint (SHA-256):":
            fp = lines[i + 1].strip()
        if line.strip() == "SSL Flags:" and fp:
            flags = []
            for nxt in lines[i + 1:]:
                if not nxt.startswith("            "):
                    break
                flags.append(nxt.strip())
            out[fp] = ",".join(flags)
            fp = None
    return out


def trust_nss(ca, db, **kw) -> str:
    out = io.StringIO()
    assert trust.cmd_trust(ca.confdir, db, False, out, **kw) == 0
    return out.getvalue()


def untrust_nss(ca, db, **kw) -> str:
    out = io.StringIO()
    assert trust.cmd_untrust(ca.confdir, db, False, out, **kw) == 0
    return out.getvalue()


# --- NSS -------------------------------------------------------------------------------------------


def test_nss_trust_creates_the_database_and_adds_the_ca_trusted_for_tls(ca, nssdir):
    text = trust_nss(ca, f"sql:{nssdir}")
    assert text.count("\n") == 1, text
    assert f"created NSS database sql:{nssdir}" in text
    assert f"added httpsdump CA (SHA-256 {ca.fingerprint_sha256}) to NSS database sql:{nssdir}" in text
    assert (nssdir / "cert9.db").is_file()
    assert nss_listing(nssdir) == [("httpsdump", "C,,")]
    pem = certutil(nssdir, "-L", "-n", "httpsdump", "-a").stdout.encode()
    assert ssl.PEM_cert_to_DER_cert(pem.decode()) == ca.cert.as_der()  # exactly our certificate
    assert "Trusted CA" in nss_fingerprints(nssdir)[ca.fingerprint_sha256]
    assert "PRIVATE KEY" not in text


def test_nss_trust_twice_changes_nothing(ca, nssdir):
    trust_nss(ca, str(nssdir))  # a plain directory means sql:DIR
    before = (nss_listing(nssdir), (nssdir / "cert9.db").read_bytes())
    text = trust_nss(ca, f"sql:{nssdir}")
    assert text.startswith("already trusted: nothing changed"), text
    assert ca.fingerprint_sha256 in text and text.count("\n") == 1
    assert (nss_listing(nssdir), (nssdir / "cert9.db").read_bytes()) == before


def test_nss_untrust_removes_it_and_is_idempotent(ca, nssdir):
    trust_nss(ca, f"sql:{nssdir}")
    text = untrust_nss(ca, f"sql:{nssdir}")
    assert text == f"removed httpsdump CA (SHA-256 {ca.fingerprint_sha256}) from NSS database sql:{nssdir}\n"
    assert nss_listing(nssdir) == []
    assert certutil(nssdir, "-L", "-n", "httpsdump", check=False).returncode != 0
    again = untrust_nss(ca, f"sql:{nssdir}")
    assert again.startswith("not trusted: nothing changed"), again
    assert nss_listing(nssdir) == []


def test_nss_untrust_without_a_database_changes_nothing(ca, nssdir):
    text = untrust_nss(ca, f"sql:{nssdir}")
    assert text.startswith("not trusted: nothing changed"), text
    assert not (nssdir / "cert9.db").exists()  # untrust never creates a database


def test_nss_default_database_is_created_under_home(ca, tmp_path, monkeypatch):
    _need(CERTUTIL, "certutil", "libnss3-tools")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    db = home / ".pki" / "nssdb"
    assert trust.default_nss_db() == f"sql:{db}"
    text = trust_nss(ca, "")  # `--nss` without a value
    assert f"created NSS database sql:{db}" in text and f"to NSS database sql:{db}" in text
    assert (db / "cert9.db").is_file()
    assert (db.stat().st_mode & 0o777) == 0o700
    assert nss_listing(db) == [("httpsdump", "C,,")]
    assert untrust_nss(ca, "").startswith("removed httpsdump CA")
    assert nss_listing(db) == []


def test_nss_upgrades_an_untrusted_copy_and_keeps_its_other_trust(ca, nssdir):
    certutil(nssdir, "-N", "--empty-password")
    certutil(nssdir, "-A", "-n", "mine", "-t", ",c,", "-i", str(ca.cert_path))
    text = trust_nss(ca, f"sql:{nssdir}")
    assert "trusted httpsdump CA" in text and ",c, -> C,c," in text, text
    assert nss_listing(nssdir) == [("mine", "C,c,")]  # found by fingerprint, under the user's nickname
    assert trust_nss(ca, f"sql:{nssdir}").startswith("already trusted: nothing changed")


def test_nss_untrust_removes_only_this_ca_when_another_shares_its_nickname(ca, other_ca, tmp_path):
    # Every httpsdump CA has the same subject, so NSS stores them under one nickname and
    # `certutil -D -n httpsdump` deletes whichever it likes. Both orders must leave the other one trusted.
    _need(CERTUTIL, "certutil", "libnss3-tools")
    for first, second in ((ca, other_ca), (other_ca, ca)):
        db = tmp_path / f"db-{first.fingerprint_sha256[:2]}"
        db.mkdir()
        trust_nss(first, f"sql:{db}")
        trust_nss(second, f"sql:{db}")
        assert set(nss_fingerprints(db)) == {ca.fingerprint_sha256, other_ca.fingerprint_sha256}
        text = untrust_nss(first, f"sql:{db}")
        assert text.startswith(f"removed httpsdump CA (SHA-256 {first.fingerprint_sha256})"), text
        left = nss_fingerprints(db)
        assert list(left) == [second.fingerprint_sha256], left
        assert "Trusted CA" in left[second.fingerprint_sha256]
        assert nss_listing(db) == [("httpsdump", "C,,")]


def test_nss_explicit_database_directory_must_exist(ca, tmp_path):
    _need(CERTUTIL, "certutil", "libnss3-tools")
    missing = tmp_path / "no-such-profile"
    with pytest.raises(CAError, match="does not exist") as e:
        trust_nss(ca, f"sql:{missing}")
    assert "about:support" in e.value.message
    assert not missing.exists()


def test_nss_unusable_database_is_a_clear_error(ca, nssdir):
    (nssdir / "cert9.db").write_bytes(b"this is not an sqlite database\n" * 100)
    with pytest.raises(CAError) as e:
        trust_nss(ca, f"sql:{nssdir}")
    assert f"sql:{nssdir}" in e.value.message
    assert "SEC_ERROR_BAD_DATABASE" in e.value.message and "cannot be used" in e.value.message


def test_nss_legacy_dbm_is_refused(ca, nssdir):
    with pytest.raises(CAError, match="dbm"):
        trust_nss(ca, f"dbm:{nssdir}")


def test_missing_certutil_says_how_to_install_it(ca, nssdir):
    with pytest.raises(CAError) as e:
        trust_nss(ca, f"sql:{nssdir}", certutil="certutil-not-installed-here")
    assert "apt-get install libnss3-tools" in e.value.message
    with pytest.raises(CAError, match="apt-get install libnss3-tools"):
        untrust_nss(ca, f"sql:{nssdir}", certutil="certutil-not-installed-here")
    assert not (nssdir / "cert9.db").exists()


def test_trust_needs_an_existing_ca(tmp_path, nssdir):
    with pytest.raises(CAError, match="no CA in"):
        trust.cmd_trust(tmp_path / "empty", f"sql:{nssdir}", False, io.StringIO())
    assert not (tmp_path / "empty").exists()  # trust never creates a CA
    with pytest.raises(CAError, match="cannot tell which certificate to remove"):
        trust.cmd_untrust(tmp_path / "empty", f"sql:{nssdir}", False, io.StringIO())


# --- the Debian/Ubuntu system store, in a sandbox ---------------------------------------------------


class Sandbox:
    """update-ca-certificates with all its directories under `root`; one pre-existing "system" CA."""

    def __init__(self, root: Path, system_ca_pem: bytes):
        self.root = root
        self.share = root / "usr-share-ca-certificates"
        self.local = root / "usr-local-share-ca-certificates"
        self.etc = root / "etc-ssl-certs"
        self.hooks = root / "hooks"
        for d in (self.share, self.local, self.etc, self.hooks):
            d.mkdir(parents=True)
        (self.share / "system-root.crt").write_bytes(system_ca_pem)
        self.conf = root / "ca-certificates.conf"
        self.conf.write_text("system-root.crt\n")
        self.system_pem = system_ca_pem
        self.cmd = (_need(UPDATE, "update-ca-certificates", "ca-certificates"),
                    "--certsconf", str(self.conf), "--certsdir", str(self.share),
                    "--localcertsdir", str(self.local), "--etccertsdir", str(self.etc), "--hooksdir", str(self.hooks))

    @property
    def bundle(self) -> Path:
        return self.etc / "ca-certificates.crt"

    def bundle_ders(self) -> set[bytes]:
        text = self.bundle.read_text()
        return {ssl.PEM_cert_to_DER_cert(m.group(0)) for m in
                re.finditer(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)}

    def trust(self, ca) -> str:
        out = io.StringIO()
        assert trust.cmd_trust(ca.confdir, None, True, out, system_dir=self.local, update_cmd=self.cmd) == 0
        return out.getvalue()

    def untrust(self, confdir) -> str:
        out = io.StringIO()
        assert trust.cmd_untrust(confdir, None, True, out, system_dir=self.local, update_cmd=self.cmd) == 0
        return out.getvalue()


@pytest.fixture
def sandbox(tmp_path, pki) -> Sandbox:
    return Sandbox(tmp_path / "sysroot", pki.root_pem.read_bytes())


def test_system_trust_adds_the_file_and_updates_the_bundle(ca, sandbox):
    text = sandbox.trust(ca)
    target = sandbox.local / "httpsdump-ca.crt"
    assert text == (f"added httpsdump CA (SHA-256 {ca.fingerprint_sha256}) to the system trust store: "
                    f"{target} (ran update-ca-certificates)\n")
    assert target.read_bytes() == ca.cert_pem
    assert (target.stat().st_mode & 0o777) == 0o644
    ders = sandbox.bundle_ders()
    assert ca.cert.as_der() in ders and ssl.PEM_cert_to_DER_cert(sandbox.system_pem.decode()) in ders
    # the bundle is what OpenSSL-based clients load: our CA is a trust anchor there
    ctx = ssl.create_default_context(cafile=str(sandbox.bundle))
    assert any(c["subject"] == ((("organizationName", "httpsdump"),), (("commonName", "httpsdump CA"),))
               for c in ctx.get_ca_certs())


def test_system_trust_twice_changes_nothing(ca, sandbox):
    sandbox.trust(ca)
    bundle = sandbox.bundle.read_bytes()
    mtime = (sandbox.local / "httpsdump-ca.crt").stat().st_mtime_ns
    text = sandbox.trust(ca)
    assert text.startswith("already trusted: nothing changed"), text
    assert sandbox.bundle.read_bytes() == bundle
    assert (sandbox.local / "httpsdump-ca.crt").stat().st_mtime_ns == mtime


def test_system_trust_replaces_an_older_httpsdump_ca(ca, other_ca, sandbox):
    sandbox.trust(other_ca)
    text = sandbox.trust(ca)
    assert text.startswith(f"replaced httpsdump CA (SHA-256 {other_ca.fingerprint_sha256}) with "
                           f"httpsdump CA (SHA-256 {ca.fingerprint_sha256})"), text
    ders = sandbox.bundle_ders()
    assert ca.cert.as_der() in ders and other_ca.cert.as_der() not in ders


def test_system_untrust_removes_it_and_is_idempotent(ca, sandbox):
    sandbox.trust(ca)
    text = sandbox.untrust(ca.confdir)
    target = sandbox.local / "httpsdump-ca.crt"
    assert text == (f"removed httpsdump CA (SHA-256 {ca.fingerprint_sha256}) from the system trust store: "
                    f"deleted {target} (ran update-ca-certificates --fresh)\n")
    assert not target.exists()
    assert sandbox.bundle_ders() == {ssl.PEM_cert_to_DER_cert(sandbox.system_pem.decode())}
    assert not [p for p in sandbox.etc.iterdir() if p.is_symlink() and not p.exists()]  # no dangling links
    assert sandbox.untrust(ca.confdir).startswith("not trusted: nothing changed")


def test_system_untrust_works_when_the_ca_is_gone(ca, sandbox, tmp_path):
    sandbox.trust(ca)
    text = sandbox.untrust(tmp_path / "confdir-deleted-since")
    assert text.startswith(f"removed httpsdump CA (SHA-256 {ca.fingerprint_sha256})"), text


def test_system_failed_update_leaves_nothing_behind(ca, sandbox):
    failing = shutil.which("false")
    with pytest.raises(CAError, match="failed"):
        trust.cmd_trust(ca.confdir, None, True, io.StringIO(), system_dir=sandbox.local, update_cmd=(failing,))
    assert list(sandbox.local.iterdir()) == []  # a retry must not say "already trusted"


def test_system_missing_tool_or_directory(ca, sandbox, tmp_path):
    with pytest.raises(CAError) as e:
        trust.cmd_trust(ca.confdir, None, True, io.StringIO(), system_dir=sandbox.local,
                        update_cmd=("update-ca-certificates-not-installed",))
    assert "apt-get install ca-certificates" in e.value.message
    with pytest.raises(CAError, match="Debian and Ubuntu"):
        trust.cmd_trust(ca.confdir, None, True, io.StringIO(), system_dir=tmp_path / "not-debian",
                        update_cmd=sandbox.cmd)
    assert list(sandbox.local.iterdir()) == []


def test_system_unwritable_target_is_a_clear_error(ca, sandbox):
    (sandbox.local / "httpsdump-ca.crt").mkdir()  # something that cannot be replaced by a file
    with pytest.raises(CAError, match="cannot write"):
        sandbox.trust(ca)


def test_sudo_without_confdir_gets_a_hint(tmp_path, sandbox, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "alice")
    with pytest.raises(CAError) as e:
        trust.cmd_trust(tmp_path / "root-home-confdir", None, True, io.StringIO(), system_dir=sandbox.local,
                        update_cmd=sandbox.cmd)
    assert "--confdir ~alice/.httpsdump" in e.value.message


def test_nss_and_system_together_print_one_line_each(ca, nssdir, sandbox):
    out = io.StringIO()
    trust.cmd_trust(ca.confdir, f"sql:{nssdir}", True, out, system_dir=sandbox.local, update_cmd=sandbox.cmd)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "NSS database" in lines[0] and "system trust store" in lines[1]
    out = io.StringIO()
    trust.cmd_untrust(ca.confdir, f"sql:{nssdir}", True, out, system_dir=sandbox.local, update_cmd=sandbox.cmd)
    lines = out.getvalue().splitlines()
    assert [line.split(" ")[0] for line in lines] == ["removed", "removed"]
    assert "PRIVATE KEY" not in out.getvalue()


# --- argparse additions -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="httpsdump ca")
    sub = p.add_subparsers(dest="action", required=True)
    trust.add_parsers(sub)
    return p


def test_parsers_and_run(ca, nssdir, capsys):
    p = _parser()
    args = p.parse_args(["trust", "--nss"])
    assert args.nss == "" and args.system is False
    args = p.parse_args(["untrust", "--nss", "sql:/x", "--system", "--confdir", "/c"])
    assert (args.nss, args.system, args.confdir) == ("sql:/x", True, "/c")
    with pytest.raises(ConfigError, match="--nss"):
        trust.run(p.parse_args(["trust"]), ca.confdir, io.StringIO())
    out = io.StringIO()
    assert trust.run(p.parse_args(["trust", "--nss", f"sql:{nssdir}"]), ca.confdir, out) == 0
    assert "added httpsdump CA" in out.getvalue()
    out = io.StringIO()
    assert trust.run(p.parse_args(["untrust", "--nss", f"sql:{nssdir}"]), ca.confdir, out) == 0
    assert out.getvalue().startswith("removed httpsdump CA")


def test_default_paths_are_the_debian_ones():
    # Documented behaviour; the tests above always pass a sandbox instead of these.
    assert trust.SYSTEM_DIR == Path("/usr/local/share/ca-certificates")
    assert trust.SYSTEM_FILE == "httpsdump-ca.crt"
    assert trust.UPDATE_CMD == ("update-ca-certificates",)
    assert os.path.basename(trust.nss_db_spec("~/x")[0]) == "x"
