"""`httpsdump ca trust|untrust --nss [DB] | --system`: put the local CA into, or take it out of, the
trust stores a Linux machine actually uses, and say exactly what changed.

* ``--nss [DB]``: an NSS database, which Chromium/Chrome on Linux (``sql:$HOME/.pki/nssdb``, the
  default, created when missing) and Firefox (its profile directory) read. Uses ``certutil`` from
  Debian's ``libnss3-tools``.
* ``--system``: the Debian/Ubuntu system store (curl, wget, git, Python's ``ssl`` default paths …):
  the certificate is copied to ``/usr/local/share/ca-certificates/httpsdump-ca.crt`` and
  ``update-ca-certificates`` is run (``--fresh`` when removing). Needs root.

Both are idempotent: a second run prints ``already trusted: nothing changed`` (``not trusted: nothing
changed`` for untrust) and touches nothing. A missing tool, an unusable database or a permission
problem is a CAError (the CLI exits 2) whose message says how to fix it.

NSS keeps one nickname per certificate *subject*, and every httpsdump CA has the same subject, so a CA
made by an earlier httpsdump (a deleted confdir) shares the nickname ``httpsdump`` with the current one.
Certificates are therefore always identified by their SHA-256 fingerprint, never by nickname alone;
removing ours from a shared nickname removes exactly ours (the others are put back with their trust).

Nothing here reads the private key's bytes beyond `load()`'s checks, and nothing writes it anywhere.
The paths and commands are parameters so the tests run against a temporary root, never the machine's
real trust store.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

from M2Crypto import X509

from ca.authority import CA, load
from proxy.errors import CAError, ConfigError

__all__ = [
    "NSS_NICKNAME",
    "SYSTEM_DIR",
    "SYSTEM_FILE",
    "UPDATE_CMD",
    "add_parsers",
    "cmd_trust",
    "cmd_untrust",
    "default_nss_db",
    "nss_db_spec",
    "run",
]

NSS_NICKNAME = "httpsdump"
NSS_TRUST = "C,,"  # SSL: trusted CA for TLS servers; nothing for e-mail or code signing
SYSTEM_DIR = Path("/usr/local/share/ca-certificates")  # Debian/Ubuntu: local CAs, *.crt in PEM
SYSTEM_FILE = "httpsdump-ca.crt"
UPDATE_CMD: tuple[str, ...] = ("update-ca-certificates",)
TOOL_TIMEOUT = 120.0  # seconds for one certutil / update-ca-certificates run

_CERTUTIL_HINT = "install it with `sudo apt-get install libnss3-tools` (Debian/Ubuntu; `nss-tools` on Fedora)"
_UPDATE_HINT = "install it with `sudo apt-get install ca-certificates` (--system supports Debian and Ubuntu)"


# --- command line ------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--confdir", help="directory holding the CA (default ~/.httpsdump)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (see config.example.toml)")


def add_parsers(subparsers, common: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Add `trust` and `untrust` to the `httpsdump ca` subparsers. `common` adds --confdir/--config
    (the CLI passes its own; by default the same two options are added here)."""
    texts = {
        "trust": ("add the CA to a trust store", "Add the httpsdump CA to an NSS database and/or the system trust store."),
        "untrust": ("remove the CA from a trust store", "Remove the httpsdump CA from an NSS database and/or the system trust store."),
    }
    for name, (short, long) in texts.items():
        sp = subparsers.add_parser(name, help=short, description=long)
        (common or _add_common)(sp)
        sp.add_argument("--nss", nargs="?", const="", metavar="DB",
                        help="an NSS database (Chromium on Linux, Firefox profile); default sql:$HOME/.pki/nssdb, "
                             "created when missing. Needs certutil (libnss3-tools)")
        sp.add_argument("--system", action="store_true",
                        help=f"the Debian/Ubuntu system store ({SYSTEM_DIR / SYSTEM_FILE} + update-ca-certificates; "
                             "run as root)")


def run(args: argparse.Namespace, confdir: Path, out: TextIO) -> int:
    """Dispatch a parsed `httpsdump ca trust|untrust` command line."""
    nss = getattr(args, "nss", None)
    system = bool(getattr(args, "system", False))
    if nss is None and not system:
        raise ConfigError(f"say which trust store: httpsdump ca {args.action} --nss [DB] and/or --system")
    if args.action == "trust":
        return cmd_trust(confdir, nss, system, out)
    if args.action == "untrust":
        return cmd_untrust(confdir, nss, system, out)
    raise ConfigError(f"unknown ca action {args.action!r}")


def cmd_trust(confdir: Path, nss: str | None, system: bool, out: TextIO, *,
              system_dir: Path = SYSTEM_DIR, update_cmd: Sequence[str] = UPDATE_CMD,
              certutil: str = "certutil") -> int:
    """Trust the CA of `confdir`: in the NSS database `nss` ("" = the default one; None = not asked)
    and/or the system store (`system`). Prints one line per store saying what changed."""
    ca = _load(confdir, system)
    if nss is not None:
        out.write(_NssDb(nss, certutil).trust(ca) + "\n")
    if system:
        out.write(_System(Path(system_dir), tuple(update_cmd)).trust(ca) + "\n")
    out.flush()
    return 0


def cmd_untrust(confdir: Path, nss: str | None, system: bool, out: TextIO, *,
                system_dir: Path = SYSTEM_DIR, update_cmd: Sequence[str] = UPDATE_CMD,
                certutil: str = "certutil") -> int:
    """Undo cmd_trust for the same stores. Prints one line per store saying what changed. The system
    store's file is removed by name, so that works even when the confdir's CA is gone; the NSS
    database needs the CA to know which certificate to remove."""
    if nss is not None:
        db = _NssDb(nss, certutil)
        try:
            ca = _load(confdir, False)
        except CAError as e:
            raise CAError(f"cannot tell which certificate to remove from {db.spec}: {e.message}; to remove "
                          f"every httpsdump CA from it by hand: `certutil -d {db.spec} -D -n {NSS_NICKNAME}` "
                          "(repeat until certutil says it cannot find the certificate)") from None
        out.write(db.untrust(ca) + "\n")
    if system:
        out.write(_System(Path(system_dir), tuple(update_cmd)).untrust() + "\n")
    out.flush()
    return 0


def _load(confdir: Path, system: bool) -> CA:
    try:
        return load(confdir)
    except CAError as e:
        sudo_user = os.environ.get("SUDO_USER")
        if system and sudo_user and sudo_user != "root":
            # `sudo httpsdump ca trust --system` looks in root's home, not the user's.
            raise CAError(f"{e.message} (under sudo the CA is looked for in root's home: pass your own, "
                          f"e.g. `sudo httpsdump ca trust --system --confdir ~{sudo_user}/.httpsdump`)") from None
        raise


def _describe(ca_fp: str) -> str:
    return f"httpsdump CA (SHA-256 {ca_fp})"


def _fingerprint(der: bytes) -> str:
    h = hashlib.sha256(der).hexdigest().upper()
    return ":".join(h[i : i + 2] for i in range(0, len(h), 2))


# --- NSS ---------------------------------------------------------------------------------------


def default_nss_db() -> str:
    """Chromium's (and NSS's shared) per-user database: sql:$HOME/.pki/nssdb."""
    return f"sql:{Path.home() / '.pki' / 'nssdb'}"


def nss_db_spec(db: str) -> tuple[str, Path]:
    """("sql:/absolute/dir", dir) for a database given as "sql:DIR", "DIR" or "" (the default)."""
    spec = db or default_nss_db()
    if spec.startswith("dbm:"):
        raise CAError(f"{spec}: legacy dbm NSS databases (cert8.db) are not supported; "
                      "use an sql: database (cert9.db), as Firefox >= 58 and Chromium do")
    path = spec[4:] if spec.startswith("sql:") else spec
    if not path:
        raise CAError(f"{spec!r} names no NSS database directory")
    directory = Path(path).expanduser().absolute()
    return f"sql:{directory}", directory


@dataclass
class _NssCert:
    nickname: str
    fingerprint: str  # AA:BB:… upper case
    trust: tuple[str, str, str]  # certutil letters for SSL, S/MIME, object signing
    pem: bytes


# certutil -L -n NICK prints, per certificate, "Certificate Trust Flags:" then one indented section per
# use, listing the flags by name; these are the names NSS prints (secutil.c SECU_PrintTrustFlags) and
# the certutil letters they come from.
_FLAG_LETTERS = {
    "Valid CA": "c",
    "Trusted CA": "C",
    "Trusted Client CA": "T",
    "User": "u",
    "Step-up": "g",
    "Warn When Sending": "w",
    "Terminal Record": "p",
    "Trusted": "P",
}
_TRUST_SECTIONS = ("SSL Flags:", "Email Flags:", "Object Signing Flags:")
_LIST_TRUST_RE = re.compile(r"^(?P<nick>.*?)\s+(?P<trust>[A-Za-z]*,[A-Za-z]*,[A-Za-z]*)\s*$")
_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def _letters(flags: list[str]) -> str:
    got = {_FLAG_LETTERS[f] for f in flags if f in _FLAG_LETTERS}
    if "C" in got or "T" in got:
        got.discard("c")  # C and T imply c
    if "P" in got:
        got.discard("p")  # P implies p
    return "".join(sorted(got))


class _NssDb:
    def __init__(self, db: str, certutil: str) -> None:
        self.spec, self.dir = nss_db_spec(db)
        self.is_default = not db
        exe = shutil.which(certutil)
        if exe is None:
            raise CAError(f"{certutil} was not found: it is needed to change the NSS database {self.spec}; "
                          f"{_CERTUTIL_HINT}")
        self.certutil = exe

    # -- certutil ----------------------------------------------------------------------------

    def _run(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self.certutil, "-d", self.spec, *args]
        try:
            p = subprocess.run(cmd, input=input, capture_output=True, timeout=TOOL_TIMEOUT,
                               stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CAError(f"certutil did not finish within {TOOL_TIMEOUT:g} s on {self.spec} "
                          "(is the database locked by a running browser? close it and retry)") from None
        except OSError as e:
            raise CAError(f"cannot run {self.certutil}: {e.strerror}: {_CERTUTIL_HINT}") from None
        if check and p.returncode != 0:
            raise self._error(p, args)
        return p

    def _error(self, p: subprocess.CompletedProcess, args: Sequence[str]) -> CAError:
        msg = (p.stderr or p.stdout).decode("utf-8", "replace").strip().replace("\n", " ")
        hint = "check that it is an NSS sql: database (cert9.db) you can write, e.g. a Firefox profile directory"
        if "SEC_ERROR_READ_ONLY" in msg or "Permission denied" in msg or "SEC_ERROR_BAD_DATABASE" in msg:
            hint = ("the database cannot be used: check that the directory holds a valid cert9.db and that you "
                    "may write it (close the browser using it)")
        return CAError(f"certutil {args[0]} on the NSS database {self.spec} failed: {msg or f'exit {p.returncode}'}; {hint}")

    # -- database ------------------------------------------------------------------------------

    def _ensure(self) -> str | None:
        """Create the database when it is missing; returns what was done, or None."""
        if (self.dir / "cert9.db").is_file():
            return None
        if self.dir.exists() and not self.dir.is_dir():
            raise CAError(f"{self.dir} is not a directory, so it cannot hold the NSS database {self.spec}")
        if not self.dir.exists():
            if not self.is_default:
                raise CAError(f"no NSS database at {self.spec}: the directory does not exist (for Firefox, pass "
                              "its profile directory, shown in about:support as 'Profile Directory')")
            try:
                self.dir.mkdir(mode=0o700, parents=True)
            except OSError as e:
                raise CAError(f"cannot create {self.dir}: {e.strerror}") from None
        self._run("-N", "--empty-password")
        return f"created NSS database {self.spec}"

    def _nicknames(self) -> list[str]:
        p = self._run("-L")
        nicks: list[str] = []
        for line in p.stdout.decode("utf-8", "replace").splitlines():
            m = _LIST_TRUST_RE.match(line)
            if m and m.group("nick").strip() and m.group("nick").strip() not in nicks:
                nicks.append(m.group("nick").strip())
        return nicks

    def _certs(self, nickname: str) -> list[_NssCert]:
        """Every certificate stored under `nickname`, with its trust letters."""
        p = self._run("-L", "-n", nickname, "-a", check=False)
        if p.returncode != 0:
            if b"PR_FILE_NOT_FOUND_ERROR" in p.stderr or b"Could not find cert" in p.stderr:
                return []  # no certificate (left) under that nickname
            raise self._error(p, ("-L",))
        pems = p.stdout
        text = self._run("-L", "-n", nickname).stdout.decode("utf-8", "replace")
        trust_by_fp: dict[str, tuple[str, str, str]] = {}
        fp = None
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            if line == "Fingerprint (SHA-256):" and i + 1 < len(lines):
                fp = lines[i + 1].strip().upper()
                i += 2
                continue
            if line == "Certificate Trust Flags:" and fp is not None:
                sections: dict[str, list[str]] = {}
                current = None
                i += 1
                while i < len(lines) and (lines[i].startswith("        ") or not lines[i].strip()):
                    s = lines[i].strip()
                    if s in _TRUST_SECTIONS:
                        current = s
                        sections[current] = []
                    elif s and current is not None:
                        sections[current].append(s)
                    i += 1
                trust_by_fp[fp] = tuple(_letters(sections.get(s, [])) for s in _TRUST_SECTIONS)  # type: ignore[assignment]
                fp = None
                continue
            i += 1
        certs = []
        for m in _PEM_RE.finditer(pems):
            der = X509.load_cert_string(m.group(0), X509.FORMAT_PEM).as_der()
            f = _fingerprint(der)
            certs.append(_NssCert(nickname, f, trust_by_fp.get(f, ("", "", "")), m.group(0) + b"\n"))
        return certs

    def _find(self, fp: str) -> _NssCert | None:
        for nick in self._nicknames():
            for cert in self._certs(nick):
                if cert.fingerprint == fp:
                    return cert
        return None

    # -- the commands ----------------------------------------------------------------------------

    def trust(self, ca: CA) -> str:
        fp = ca.fingerprint_sha256
        created = self._ensure()
        found = self._find(fp)
        if found is not None and "C" in found.trust[0]:
            return (f"already trusted: nothing changed (NSS database {self.spec} already has httpsdump CA "
                    f"SHA-256 {fp} as {found.nickname!r}, trust {','.join(found.trust)})")
        if found is not None:
            trust = ",".join(("C" + found.trust[0].replace("c", ""), found.trust[1], found.trust[2]))
            self._run("-A", "-n", found.nickname, "-t", trust, input=ca.cert_pem)
            what = f"trusted {_describe(fp)} for TLS servers in NSS database {self.spec} (it was there untrusted: {','.join(found.trust)} -> {trust})"
        else:
            self._run("-A", "-n", NSS_NICKNAME, "-t", NSS_TRUST, input=ca.cert_pem)
            what = f"added {_describe(fp)} to NSS database {self.spec} (trust {NSS_TRUST})"
        now = self._find(fp)
        if now is None or "C" not in now.trust[0]:
            raise CAError(f"certutil reported success but {_describe(fp)} is not trusted in {self.spec}; "
                          f"check the database with `certutil -d {self.spec} -L`")
        return f"{created}; {what}" if created else what

    def untrust(self, ca: CA) -> str:
        fp = ca.fingerprint_sha256
        if not (self.dir / "cert9.db").is_file():
            return f"not trusted: nothing changed (no NSS database at {self.spec})"
        found = self._find(fp)
        if found is None:
            return f"not trusted: nothing changed (NSS database {self.spec} does not have httpsdump CA SHA-256 {fp})"
        # `certutil -D -n NICK` deletes one certificate of that nickname (NSS picks which). Delete until
        # ours is gone, then put back any other certificate that went with it, with its trust.
        siblings = {c.fingerprint: c for c in self._certs(found.nickname) if c.fingerprint != fp}
        for _ in range(len(siblings) + 1):
            self._run("-D", "-n", found.nickname)
            if fp not in {c.fingerprint for c in self._certs(found.nickname)}:
                break
        else:
            raise CAError(f"could not remove {_describe(fp)} from {self.spec}: remove it with "
                          f"`certutil -d {self.spec} -D -n {found.nickname!r}`")
        restored = []
        remaining = {c.fingerprint for c in self._certs(found.nickname)}
        for sib in siblings.values():
            if sib.fingerprint not in remaining:
                self._run("-A", "-n", sib.nickname, "-t", ",".join(sib.trust), input=sib.pem)
                restored.append(sib.fingerprint)
        if self._find(fp) is not None:
            raise CAError(f"certutil reported success but {_describe(fp)} is still in {self.spec}")
        what = f"removed {_describe(fp)} from NSS database {self.spec}"
        if restored:
            what += f" (kept {len(restored)} other certificate(s) named {found.nickname!r})"
        return what


# --- Debian/Ubuntu system store --------------------------------------------------------------------


class _System:
    def __init__(self, directory: Path, update_cmd: tuple[str, ...]) -> None:
        if not update_cmd:
            raise CAError("no command given to update the system trust store")
        exe = shutil.which(update_cmd[0])
        if exe is None:
            raise CAError(f"{update_cmd[0]} was not found: it is needed to change the system trust store; {_UPDATE_HINT}")
        self.update_cmd = (exe, *update_cmd[1:])
        self.dir = directory
        self.target = directory / SYSTEM_FILE

    def _check_dir(self) -> None:
        if not self.dir.is_dir():
            raise CAError(f"{self.dir} does not exist: --system supports Debian and Ubuntu (package ca-certificates); "
                          "on other systems see the README's 'Trusting the CA'")

    def _update(self, *extra: str) -> str:
        cmd = [*self.update_cmd, *extra]
        try:
            p = subprocess.run(cmd, capture_output=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CAError(f"{' '.join(cmd)} did not finish within {TOOL_TIMEOUT:g} s") from None
        except OSError as e:
            raise CAError(f"cannot run {cmd[0]}: {e.strerror}: {_UPDATE_HINT}") from None
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).decode("utf-8", "replace").strip()[-800:]
            raise CAError(f"{' '.join(cmd)} failed (exit {p.returncode}): {msg}")
        return os.path.basename(cmd[0]) + (" " + " ".join(extra) if extra else "")

    def _write(self, data: bytes) -> None:
        tmp = self.dir / f".{SYSTEM_FILE}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, 0o644)  # update-ca-certificates' bundle is world-readable: so is this
                f.write(data)
            os.replace(tmp, self.target)
        except OSError as e:
            with _suppress_os():
                tmp.unlink()
            raise self._perm_error(e, "write") from None

    def _perm_error(self, e: OSError, verb: str) -> CAError:
        hint = ""
        if isinstance(e, PermissionError):
            hint = ": the system store needs root, e.g. `sudo httpsdump ca trust --system --confdir ~/.httpsdump`"
        return CAError(f"cannot {verb} {self.target}: {e.strerror}{hint}")

    def trust(self, ca: CA) -> str:
        self._check_dir()
        fp = ca.fingerprint_sha256
        previous = self.target.read_bytes() if self.target.is_file() else None
        if previous == ca.cert_pem:
            return f"already trusted: nothing changed ({self.target} already holds httpsdump CA SHA-256 {fp})"
        self._write(ca.cert_pem)
        try:
            ran = self._update()
        except CAError:
            # Leave the store as it was: a half-done trust would say "already trusted" next time.
            with _suppress_os():
                if previous is None:
                    self.target.unlink()
                else:
                    self._write(previous)
            raise
        if previous is not None:
            old = _describe_pem(previous)
            return f"replaced {old} with {_describe(fp)} in the system trust store: {self.target} (ran {ran})"
        return f"added {_describe(fp)} to the system trust store: {self.target} (ran {ran})"

    def untrust(self) -> str:
        self._check_dir()
        if not self.target.exists():
            return f"not trusted: nothing changed ({self.target} does not exist)"
        which = _describe_pem(self.target.read_bytes())
        try:
            self.target.unlink()
        except OSError as e:
            raise self._perm_error(e, "remove") from None
        ran = self._update("--fresh")
        return f"removed {which} from the system trust store: deleted {self.target} (ran {ran})"


def _describe_pem(data: bytes) -> str:
    m = _PEM_RE.search(data)
    if m is None:
        return "a certificate file that is not PEM"
    try:
        return _describe(_fingerprint(X509.load_cert_string(m.group(0), X509.FORMAT_PEM).as_der()))
    except X509.X509Error:
        return "an unreadable certificate"


class _suppress_os:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        return typ is not None and issubclass(typ, OSError)
