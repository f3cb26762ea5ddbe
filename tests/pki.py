"""A throw-away test PKI, built with `cryptography` and written into a directory.

Layout (all EC P-256, SHA-256 signatures):

* ``Test Root``: the root CA the proxy is told about (``--upstream-ca``).
* ``Test Intermediate``: a CA signed by the root (used by the ``incomplete``/``chain`` leaf).
* ``Other Test Root``: a root the proxy is NOT told about (issuer of ``unknownroot``).
* one origin leaf per *flavour*, each with its key, and a "serve" file (the certificate chain the
  origin server sends: the leaf alone, or leaf + intermediate for ``chain``).

``make_pki(directory)`` writes everything once (a ``manifest.json`` marks a complete set) and returns
a :class:`Pki` with the paths; calling it again on the same directory reuses the files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Leaf", "Pki", "make_pki", "FLAVOURS", "BAD_FLAVOURS", "load_cert", "cert_sha256", "cert_sans"]

# name -> what the leaf is. The origin fixture starts one TLS server per flavour.
FLAVOURS = (
    "good",         # SAN localhost, good.test, 127.0.0.1; signed by the root
    "expired",      # notAfter in the past
    "notyet",       # notBefore in the future
    "wronghost",    # SAN other.test only
    "selfsigned",   # SAN localhost/good.test/127.0.0.1, self-signed
    "unknownroot",  # signed by "Other Test Root" (unknown to the proxy); served without it
    "incomplete",   # signed by the intermediate; served WITHOUT the intermediate
    "chain",        # the same leaf as "incomplete", served WITH the intermediate: must pass
    "cnonly",       # CN=localhost, no subjectAltName at all
    "wildcard",     # SAN *.wild.test
    "ip",           # SAN IP 127.0.0.1 only
)
# The flavours a verifying client must refuse when asking for good.test / localhost.
BAD_FLAVOURS = ("expired", "notyet", "wronghost", "selfsigned", "unknownroot", "incomplete", "cnonly")

_STD_SANS = ("DNS:localhost", "DNS:good.test", "IP:127.0.0.1")


@dataclass(frozen=True)
class Leaf:
    name: str
    cert: Path    # the leaf certificate alone (PEM)
    key: Path     # its private key (PEM, PKCS#8, unencrypted)
    serve: Path   # what the origin server sends: leaf [+ intermediate] (PEM)
    sha256: str   # lower-case hex SHA-256 of the leaf's DER
    subject_cn: str
    sans: tuple[str, ...]  # ("DNS:x", "IP:y"), empty for cnonly


@dataclass(frozen=True)
class Pki:
    dir: Path
    root_pem: Path           # give this to the proxy as --upstream-ca
    root_key: Path
    intermediate_pem: Path
    other_root_pem: Path     # the root the proxy does not know
    leaves: dict[str, Leaf] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Leaf:
        return self.leaves[name]

    # Convenience accessors, e.g. pki.cert("good"), pki.key("good"), pki.chain("chain").
    def cert(self, name: str) -> Path:
        return self.leaves[name].cert

    def key(self, name: str) -> Path:
        return self.leaves[name].key

    def chain(self, name: str) -> Path:
        return self.leaves[name].serve


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _name(cn: str, org: str = "httpsdump tests") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san(entries: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for e in entries:
        kind, _, value = e.partition(":")
        if kind == "DNS":
            names.append(x509.DNSName(value))
        elif kind == "IP":
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        else:  # pragma: no cover - programming error
            raise ValueError(e)
    return x509.SubjectAlternativeName(names)


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _ca(cn: str, key, issuer_name: x509.Name | None = None, issuer_key=None, path_len: int | None = None):
    now = _now()
    issuer_name = issuer_name or _name(cn)
    issuer_key = issuer_key or key
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer_key is not key:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _leaf(cn: str, key, sans: tuple[str, ...], issuer_cert, issuer_key, *, not_before=None, not_after=None,
          self_signed: bool = False):
    now = _now()
    subject = _name(cn)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(days=1))
        .not_valid_after(not_after or now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if sans:
        b = b.add_extension(_san(sans), critical=False)
    signer = key if self_signed else issuer_key
    if not self_signed:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return b.sign(signer, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, mode)
    tmp.replace(path)


def _write_key(path: Path, key) -> None:
    _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()), 0o600)


def load_cert(path: Path | str) -> x509.Certificate:
    data = Path(path).read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def cert_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def cert_sans(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    out = [f"DNS:{n}" for n in ext.get_values_for_type(x509.DNSName)]
    out += [f"IP:{n}" for n in ext.get_values_for_type(x509.IPAddress)]
    return tuple(out)


def _load(directory: Path) -> Pki | None:
    manifest = directory / "manifest.json"
    if not manifest.exists():
        return None
    try:
        m = json.loads(manifest.read_text())
        leaves = {
            name: Leaf(name=name, cert=directory / d["cert"], key=directory / d["key"], serve=directory / d["serve"],
                       sha256=d["sha256"], subject_cn=d["cn"], sans=tuple(d["sans"]))
            for name, d in m["leaves"].items()
        }
        pki = Pki(dir=directory, root_pem=directory / m["root_pem"], root_key=directory / m["root_key"],
                  intermediate_pem=directory / m["intermediate_pem"], other_root_pem=directory / m["other_root_pem"],
                  leaves=leaves)
        # Reuse only a complete, still-valid set (the "good" leaf must not be near its notAfter).
        if set(leaves) != set(FLAVOURS) or not all(p.exists() for p in (pki.root_pem, pki.root_key)):
            return None
        good = load_cert(pki.cert("good"))
        if good.not_valid_after_utc - _now() < dt.timedelta(days=2):
            return None
        return pki
    except (OSError, ValueError, KeyError):
        return None


def make_pki(directory: Path | str) -> Pki:
    """Create (or reuse) the test PKI in `directory` and return its paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cached = _load(directory)
    if cached is not None:
        return cached

    now = _now()
    root_key, inter_key, other_key = _key(), _key(), _key()
    root = _ca("Test Root", root_key)
    inter = _ca("Test Intermediate", inter_key, issuer_name=root.subject, issuer_key=root_key, path_len=0)
    other = _ca("Other Test Root", other_key)

    _write(directory / "root.pem", _pem(root))
    _write_key(directory / "root-key.pem", root_key)
    _write(directory / "intermediate.pem", _pem(inter))
    _write_key(directory / "intermediate-key.pem", inter_key)
    _write(directory / "other-root.pem", _pem(other))
    _write_key(directory / "other-root-key.pem", other_key)

    day = dt.timedelta(days=1)
    specs = {
        # name: (cn, sans, issuer cert, issuer key, extra kwargs)
        "good": ("good.test", _STD_SANS, root, root_key, {}),
        "expired": ("expired.test", _STD_SANS, root, root_key, {"not_before": now - 30 * day, "not_after": now - day}),
        "notyet": ("notyet.test", _STD_SANS, root, root_key, {"not_before": now + day, "not_after": now + 30 * day}),
        "wronghost": ("other.test", ("DNS:other.test",), root, root_key, {}),
        "selfsigned": ("selfsigned.test", _STD_SANS, None, None, {"self_signed": True}),
        "unknownroot": ("unknownroot.test", _STD_SANS, other, other_key, {}),
        "incomplete": ("chain.test", _STD_SANS, inter, inter_key, {}),
        "cnonly": ("localhost", (), root, root_key, {}),
        "wildcard": ("*.wild.test", ("DNS:*.wild.test",), root, root_key, {}),
        "ip": ("127.0.0.1", ("IP:127.0.0.1",), root, root_key, {}),
    }
    manifest: dict = {
        "root_pem": "root.pem", "root_key": "root-key.pem", "intermediate_pem": "intermediate.pem",
        "other_root_pem": "other-root.pem", "leaves": {},
    }
    for name, (cn, sans, icert, ikey, kw) in specs.items():
        key = _key()
        cert = _leaf(cn, key, sans, icert, ikey, **kw)
        _write(directory / f"{name}.pem", _pem(cert))
        _write_key(directory / f"{name}-key.pem", key)
        _write(directory / f"{name}-serve.pem", _pem(cert))  # the leaf alone
        manifest["leaves"][name] = {"cert": f"{name}.pem", "key": f"{name}-key.pem", "serve": f"{name}-serve.pem",
                                    "sha256": cert_sha256(cert), "cn": cn, "sans": list(sans)}
    # "chain": the very same leaf and key as "incomplete", but served together with the intermediate.
    inc = manifest["leaves"]["incomplete"]
    _write(directory / "chain-serve.pem", (directory / inc["cert"]).read_bytes() + _pem(inter))
    manifest["leaves"]["chain"] = {**inc, "serve": "chain-serve.pem"}

    _write(directory / "manifest.json", json.dumps(manifest, indent=1).encode())
    result = _load(directory)
    assert result is not None
    return result
