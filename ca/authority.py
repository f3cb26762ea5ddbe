"""The local CA: load it from the config directory, or create it there on first run.

Why this is careful: the CA key can impersonate every site to every client that trusts it. So the key
file is created 0600 with O_EXCL (never world-readable, not even for an instant), written to a temporary
name and linked into place (a crash never leaves half a key), and a key that group or others can read
is refused rather than used. A user may also bring their own CA (RSA or EC); everything that can be
wrong with it is checked once, here, at start-up, and reported as a CAError that says which file is
wrong and how to fix it, instead of surfacing later as a handshake failure in some browser.

Files in the config directory: CA_CERT (PEM, to import into trust stores), CA_CERT_DER (the same
certificate in DER, the form Windows and Android expect) and CA_KEY (unencrypted PEM, mode 0600).
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from M2Crypto import EVP, RSA, X509, util

from ca.mint import key_type_of, new_ec_key, random_serial, set_validity
from proxy.errors import CAError

__all__ = ["CA", "CA_CERT", "CA_CERT_DER", "CA_KEY", "CA_SUBJECT_CN", "load", "load_or_create"]

CA_CERT = "httpsdump-ca.pem"
CA_CERT_DER = "httpsdump-ca.cer"
CA_KEY = "httpsdump-ca-key.pem"
CA_SUBJECT_CN = "httpsdump CA"
CA_SUBJECT_O = "httpsdump"
CA_LIFETIME = 3650 * 86_400
CA_BACKDATE = 86_400  # tolerate clients whose clock is a day slow
KEY_TYPES = ("ec", "rsa")
MIN_RSA_BITS = 2048  # CA/B BR 6.1.5: RSA moduli of at least 2048 bits


@dataclass(frozen=True, slots=True)
class CA:
    """A loaded CA: certificate, private key and the facts minting needs. The key is never shown."""

    cert: X509.X509 = field(repr=False)
    key: EVP.PKey = field(repr=False)
    cert_pem: bytes = field(repr=False)
    ski: bytes
    confdir: Path
    # (notBefore, notAfter) in epoch seconds, read once: minting needs them for every leaf, and
    # parsing the ASN.1 times into datetimes cost a quarter of minting one.
    validity: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "validity", (int(self.not_before.timestamp()), int(self.not_after.timestamp())))

    @property
    def subject(self) -> str:
        return self.cert.get_subject().as_text()

    @property
    def not_before(self) -> dt.datetime:
        return self.cert.get_not_before().get_datetime().astimezone(dt.timezone.utc)

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.get_not_after().get_datetime().astimezone(dt.timezone.utc)

    @property
    def fingerprint_sha256(self) -> str:
        digest = self.cert.get_fingerprint("sha256")
        return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))

    @property
    def key_type(self) -> str:
        return key_type_of(self.key)

    @property
    def cert_path(self) -> Path:
        return self.confdir / CA_CERT

    @property
    def cert_der_path(self) -> Path:
        return self.confdir / CA_CERT_DER

    @property
    def key_path(self) -> Path:
        return self.confdir / CA_KEY

    def __repr__(self) -> str:
        return f"CA(subject={self.subject!r}, sha256={self.fingerprint_sha256}, confdir={str(self.confdir)!r})"


def load_or_create(confdir: Path, *, key_type: str = "ec", now: float | None = None) -> CA:
    """The CA in `confdir`, created there first (EC P-256, or RSA-2048) when neither file exists."""
    if key_type not in KEY_TYPES:
        raise CAError(f"unknown CA key type {key_type!r}: use 'ec' (the default) or 'rsa'")
    now = time.time() if now is None else now
    confdir = Path(confdir)
    _ensure_dir(confdir)
    if not (confdir / CA_KEY).exists() and not (confdir / CA_CERT).exists():
        _create(confdir, key_type, now)
    ca = load(confdir, now=now)
    if not ca.cert_der_path.exists():
        _write_public(ca.cert_der_path, ca.cert.as_der())
    return ca


def load(confdir: Path, *, now: float | None = None) -> CA:
    """The CA in `confdir`, checked; never creates or writes anything."""
    now = time.time() if now is None else now
    confdir = Path(confdir)
    key_path, cert_path = confdir / CA_KEY, confdir / CA_CERT
    _check_both_present(confdir, key_path, cert_path)
    _check_key_mode(key_path)
    cert_pem = _read(cert_path)
    cert = _parse_cert(cert_path, cert_pem, key_path)
    key = _parse_key(key_path, _read(key_path), cert_path)
    _check_key(key_path, key)
    _check_pair(cert_path, cert, key_path, key)
    _check_is_ca(cert_path, cert, key_path)
    ca = CA(cert=cert, key=key, cert_pem=cert_pem, ski=_ski(cert, key), confdir=confdir)
    _check_validity(ca, now)
    return ca


# --- checks: each message names the file and the fix ---------------------------------------------


def _recreate_hint(*paths: Path) -> str:
    names = " and ".join(str(p) for p in paths)
    return f"delete {names} to let httpsdump create a new CA (then trust the new certificate again)"


def _check_both_present(confdir: Path, key_path: Path, cert_path: Path) -> None:
    has_key, has_cert = key_path.exists(), cert_path.exists()
    if not has_key and not has_cert:
        raise CAError(f"no CA in {confdir} yet: run httpsdump once to create it")
    if has_key and not has_cert:
        raise CAError(
            f"the CA key {key_path} exists but its certificate {cert_path} is missing: restore "
            f"the certificate, or {_recreate_hint(key_path)}"
        )
    if has_cert and not has_key:
        raise CAError(
            f"the CA certificate {cert_path} exists but its key {key_path} is missing: restore "
            f"the key, or {_recreate_hint(cert_path)}"
        )


def _check_key_mode(key_path: Path) -> None:
    mode = key_path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise CAError(f"the CA key {key_path} is not a regular file: replace it with the key file")
    if mode & 0o077:
        raise CAError(
            f"the CA key {key_path} is accessible to other users (mode {stat.S_IMODE(mode):04o}); "
            f"anyone who reads it can impersonate any site to you: run `chmod 600 {key_path}`"
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}: fix its ownership or permissions") from e


def _parse_cert(cert_path: Path, data: bytes, key_path: Path) -> X509.X509:
    try:
        return X509.load_cert_string(data, X509.FORMAT_PEM)
    except X509.X509Error as e:
        raise CAError(
            f"the CA certificate {cert_path} is not a readable PEM certificate: restore it, "
            f"or {_recreate_hint(cert_path, key_path)}"
        ) from e


def _parse_key(key_path: Path, data: bytes, cert_path: Path) -> EVP.PKey:
    try:
        # The callback refuses to prompt: an encrypted key fails here instead of blocking on stdin.
        return EVP.load_key_string(data, callback=lambda *_: None)
    except EVP.EVPError as e:
        raise CAError(
            f"the CA key {key_path} is not a readable unencrypted PEM private key: if it is "
            f"encrypted, decrypt it with `openssl pkey -in {key_path} -out {key_path}.new && "
            f"mv {key_path}.new {key_path}`; otherwise "
            f"restore it, or {_recreate_hint(cert_path, key_path)}"
        ) from e


def _check_key(key_path: Path, key: EVP.PKey) -> None:
    kind = key_type_of(key)
    if kind == "unsupported":
        raise CAError(f"the CA key {key_path} is neither RSA nor EC: use an RSA (>= 2048 bits) or EC key")
    if kind == "rsa" and len(key.get_rsa()) < MIN_RSA_BITS:
        raise CAError(
            f"the CA key {key_path} is RSA-{len(key.get_rsa())}, which clients refuse "
            f"(CA/Browser Forum BR 6.1.5): use an RSA key of at least {MIN_RSA_BITS} bits or an EC key"
        )


def _check_pair(cert_path: Path, cert: X509.X509, key_path: Path, key: EVP.PKey) -> None:
    # Compare the SubjectPublicKeyInfo of both (EVP.PKey.as_der is the public key's DER).
    cert_pub = cert.get_pubkey()
    if cert_pub.as_der() != key.as_der():
        raise CAError(
            f"the CA key {key_path} does not belong to the certificate {cert_path}: put the "
            f"matching pair there, or {_recreate_hint(cert_path, key_path)}"
        )


def _check_is_ca(cert_path: Path, cert: X509.X509, key_path: Path) -> None:
    # RFC 5280 4.2.1.9: only a certificate with basicConstraints cA=TRUE may sign certificates.
    # X509_check_ca() returns 1 exactly for that case (and keyCertSign, when keyUsage is present).
    if cert.check_ca() != 1:
        raise CAError(
            f"the certificate {cert_path} is not a CA certificate (it needs basicConstraints "
            f"CA:TRUE and keyUsage keyCertSign): use a CA certificate, or {_recreate_hint(cert_path, key_path)}"
        )


def _check_validity(ca: CA, now: float) -> None:
    at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    if at < ca.not_before:
        raise CAError(
            f"the CA certificate {ca.cert_path} is not valid before {ca.not_before:%Y-%m-%d %H:%M} "
            f"UTC and it is now {at:%Y-%m-%d %H:%M} UTC: check this machine's clock"
        )
    if at > ca.not_after:
        raise CAError(
            f"the CA certificate {ca.cert_path} expired on {ca.not_after:%Y-%m-%d}: "
            f"{_recreate_hint(ca.cert_path, ca.key_path, ca.cert_der_path)}"
        )


def _ski(cert: X509.X509, key: EVP.PKey) -> bytes:
    """The CA's subjectKeyIdentifier as written in its certificate (a user CA may not use method 1),
    or the RFC 5280 4.2.1.2 method-1 hash when the certificate has none."""
    try:
        ext = cert.get_ext("subjectKeyIdentifier")
    except LookupError:
        return key.get_key_identifier()
    return bytes.fromhex(ext.get_value().strip().replace(":", ""))


# --- creation ------------------------------------------------------------------------------------


def _ensure_dir(confdir: Path) -> None:
    if confdir.is_dir():
        return
    if confdir.exists():
        raise CAError(f"{confdir} exists but is not a directory: choose another config directory")
    try:
        confdir.mkdir(mode=0o700, parents=True)
        confdir.chmod(0o700)  # mkdir's mode is filtered by the umask; make it exact
    except OSError as e:
        raise CAError(f"cannot create {confdir}: {e.strerror}: choose another config directory") from e


def _new_key(key_type: str) -> EVP.PKey:
    if key_type == "ec":
        return new_ec_key()
    pkey = EVP.PKey()
    # The default callback prints progress dots on stdout (notes section 5).
    pkey.assign_rsa(RSA.gen_key(MIN_RSA_BITS, 65537, callback=util.quiet_genparam_callback))
    return pkey


def _build_cert(key: EVP.PKey, now: float) -> X509.X509:
    name = X509.X509_Name()
    name.O = CA_SUBJECT_O
    name.CN = CA_SUBJECT_CN
    cert = X509.X509()
    cert.set_version(2)  # X.509 v3
    cert.set_serial_number(random_serial())  # CA/B BR 7.1: positive, >= 64 random bits
    cert.set_subject(name)
    cert.set_issuer(name)  # self-signed
    cert.set_pubkey(key)
    set_validity(cert, int(now) - CA_BACKDATE, int(now) - CA_BACKDATE + CA_LIFETIME)
    ski = key.get_key_identifier()
    extensions = [
        # RFC 5280 4.2.1.9: cA=TRUE, critical, in every CA certificate.
        X509.new_extension("basicConstraints", "CA:TRUE", critical=1),
        # RFC 5280 4.2.1.3 / CA/B BR 7.1.2.1.2: keyCertSign and cRLSign, critical.
        X509.new_extension("keyUsage", "keyCertSign, cRLSign", critical=1),
        # RFC 5280 4.2.1.2: CA certificates MUST carry an SKI.
        X509.new_extension("subjectKeyIdentifier", ski.hex()),
        # CA/B BR 7.1.2.1.3: a root's AKI, when present, is its own key id.
        X509.AuthorityKeyIdentifier(ski).as_extension(),
    ]
    for ext in extensions:
        cert.add_ext(ext)
    cert.sign(key, "sha256")
    return cert


def _create(confdir: Path, key_type: str, now: float) -> None:
    key = _new_key(key_type)
    cert = _build_cert(key, now)
    # Key first: a crash before the certificate lands leaves a key alone, which load() reports.
    _write_private(confdir / CA_KEY, key.as_pem(cipher=None))  # cipher=None: no passphrase prompt
    _write_public(confdir / CA_CERT, cert.as_pem())
    _write_public(confdir / CA_CERT_DER, cert.as_der())


def _write_private(path: Path, data: bytes) -> None:
    """The key: mode 0600 from its first instant (O_EXCL), never half-written, and never over an
    existing file (it is hard-linked into place, which fails if `path` exists)."""
    _write_atomically(path, data, mode=0o600, publish=os.link)


def _write_public(path: Path, data: bytes) -> None:
    """A certificate file, mode 0644 (certificates are public), renamed into place atomically."""
    _write_atomically(path, data, mode=0o644, publish=os.replace)


def _write_atomically(path: Path, data: bytes, *, mode: int, publish: Callable[[Path, Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exact mode: the umask may have narrowed a public file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except FileExistsError as e:
        raise CAError(f"{path} appeared while creating the CA (another httpsdump running?): run again") from e
    except OSError as e:
        raise CAError(f"cannot write {path}: {e.strerror}: fix the permissions of {path.parent}") from e
    finally:
        tmp.unlink(missing_ok=True)
