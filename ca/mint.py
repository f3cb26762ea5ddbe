"""Mint one leaf certificate for one host, signed by the local CA. Pure: no I/O, no clock, no RNG.

Why pure: the proxy mints a leaf the first time it sees a server name, so minting sits on the
connection path and must be fast and predictable. Time (`now`) and the serial are arguments, so a
test can pin every byte of the result without sleeping or patching.

What a leaf must carry for today's clients (each rule is cited next to the code enforcing it):
subjectAltName (browsers ignore the CN), serverAuth EKU, critical keyUsage and basicConstraints
CA:FALSE, an AKI equal to the CA's SKI so path building finds the issuer, a positive random serial,
and a short validity. One EC P-256 leaf key is generated per run and reused for every leaf: an EC
key costs ~0.06 ms where an RSA key costs ~114 ms (notes/m2crypto.md section 5).

M2Crypto trap (notes section 1.4 item 8): SWIG pointers do not keep their owners alive, so every
wrapper (names, extensions, times) is bound to a local variable while OpenSSL uses it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import TYPE_CHECKING, Callable

from M2Crypto import ASN1, EC, EVP, X509, m2

from proxy.errors import CAError

if TYPE_CHECKING:
    from ca.authority import CA

__all__ = [
    "LEAF_BACKDATE",
    "LEAF_LIFETIME",
    "MAX_LEAF_VALIDITY",
    "cert_to_pem",
    "key_type_of",
    "mint",
    "new_ec_key",
    "new_leaf_key",
    "normalize_host",
    "random_serial",
    "set_validity",
]

DAY = 86_400
# Clients whose clock runs slow still accept the leaf (mitmproxy uses the same two days).
LEAF_BACKDATE = 2 * DAY
LEAF_LIFETIME = 180 * DAY
# CA/Browser Forum Baseline Requirements 6.3.2 (ballot SC-081): at most 200 days from 2026-03-15.
MAX_LEAF_VALIDITY = 200 * DAY
assert LEAF_BACKDATE + LEAF_LIFETIME <= MAX_LEAF_VALIDITY
# RFC 5280 appendix A.1: ub-common-name INTEGER ::= 64.
MAX_CN_LENGTH = 64
# RFC 1035 2.3.4: labels of at most 63 octets, names of at most 253 characters in text form.
# Underscores are not in the LDH rule but occur in real host names, so they are let through.
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_MAX_NAME = 253
_DIGITS_DOTS = re.compile(r"[0-9.]+")


def new_ec_key() -> EVP.PKey:
    """A fresh EC P-256 key (the CA's default key type and every leaf's key type)."""
    ec = EC.gen_params(EC.NID_X9_62_prime256v1)
    ec.gen_key()
    pkey = EVP.PKey()
    pkey.assign_ec(ec)
    return pkey


def new_leaf_key() -> EVP.PKey:
    """The one leaf key of a proxy run: EC P-256, never the CA key."""
    return new_ec_key()


def key_type_of(pkey: EVP.PKey) -> str:
    """'rsa', 'ec', or 'unsupported'. M2Crypto has no EVP_PKEY_get_id, so probe (notes section 5)."""
    for kind, probe in (("rsa", pkey.get_rsa), ("ec", pkey.get_ec)):
        try:
            probe()
        except EVP.EVPError:
            # A failed probe leaves an error on this thread's queue; a later BIO read would report
            # it as its own failure (notes section 1.4 item 3).
            m2.err_clear_error()
            continue
        return kind
    return "unsupported"


def random_serial(rand: Callable[[int], bytes] = os.urandom) -> int:
    """A positive 127-bit serial with 126 random bits.

    CA/Browser Forum BR 7.1: serials are non-sequential, greater than zero, less than 2**159 and
    hold at least 64 bits of CSPRNG output. RFC 5280 4.1.2.2: at most 20 octets, positive. The top
    bit (2**126) is always set, so the serial is never 0 and always encodes in exactly 16 octets.
    """
    raw = rand(16)
    if len(raw) != 16:
        raise ValueError(f"random source returned {len(raw)} bytes, expected 16")
    return (int.from_bytes(raw, "big") >> 1) | (1 << 126)


def normalize_host(host: str) -> str | ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The host as a lower-case DNS name without trailing dot, or as an IP address.

    Raises ValueError for an empty or malformed name. The check is also what keeps a hostile SNI
    such as "a.test, IP:10.0.0.1" from injecting extra names into OpenSSL's extension syntax.
    """
    name = host.strip().rstrip(".").lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name:
        raise ValueError("cannot mint a certificate for an empty host name")
    try:
        # Only what could be an IP literal is tried as one (a failed parse is an exception, costly
        # for every name): IPv6 has a colon, IPv4 only digits and dots.
        ip = ipaddress.ip_address(name) if ":" in name or _DIGITS_DOTS.fullmatch(name) else None
    except ValueError:
        ip = None
    if ip is not None:
        # A zone (fe80::1%eth0) is local to this machine and has no place in a certificate.
        return ipaddress.ip_address(str(ip).split("%", 1)[0])
    labels = name.split(".")
    if len(name) > _MAX_NAME or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"not a valid host name for a certificate: {host!r}")
    return name


def set_validity(cert: X509.X509, not_before: int, not_after: int) -> None:
    """Set notBefore/notAfter from epoch seconds (the ASN1_TIME wrappers stay bound meanwhile)."""
    start = ASN1.ASN1_TIME()
    start.set_time(not_before)
    end = ASN1.ASN1_TIME()
    end.set_time(not_after)
    cert.set_not_before(start)
    cert.set_not_after(end)


def _leaf_window(ca: CA, now: float) -> tuple[int, int]:
    """Validity from now - 2 days to now + 180 days, kept inside the CA's own validity: a leaf
    that outlives its issuer fails path validation anyway (RFC 5280 6.1.3 (a)(2))."""
    ca_not_before, ca_not_after = ca.validity
    not_before = max(int(now) - LEAF_BACKDATE, ca_not_before)
    not_after = min(int(now) + LEAF_LIFETIME, ca_not_after)
    if not_after <= not_before:
        raise CAError(
            f"the CA in {ca.confdir} is not valid at the current time (valid "
            f"{ca.not_before:%Y-%m-%d} to {ca.not_after:%Y-%m-%d}): restart httpsdump to see "
            "why, or create a new CA"
        )
    return not_before, not_after


def _leaf_extensions(
    ca: CA, leaf_key: EVP.PKey, san: str, critical_san: bool
) -> list[X509.X509_Extension]:
    shared = _shared(ca, leaf_key)[1]
    # RFC 5280 4.2.1.6: SAN carries the name; critical when the subject is empty. (In the place it
    # always had: after basicConstraints, keyUsage and extendedKeyUsage, before SKI and AKI.)
    return [*shared[:3], X509.new_extension("subjectAltName", san, critical=int(critical_san)), *shared[3:]]


# What every leaf of one CA and key shares, built once: (id(ca), id(leaf_key)) -> (ca, leaf_key,
# (the CA's subject name, the constant extensions)). X509_add_ext and set_issuer copy into each
# certificate; parsing the extensions per leaf cost a sixth of minting one. The CA and key are held
# so that their ids stay theirs.
_SHARED: dict[tuple[int, int], tuple] = {}
_SHARED_MAX = 8


def _shared(ca: CA, leaf_key: EVP.PKey) -> tuple[X509.X509_Name, list[X509.X509_Extension]]:
    entry = _SHARED.get((id(ca), id(leaf_key)))
    if entry is not None:
        return entry[2]
    # CA/B BR 7.1.2.7.11: digitalSignature; keyEncipherment only for RSA keys (RSA key transport).
    usage = "digitalSignature, keyEncipherment" if key_type_of(leaf_key) == "rsa" else "digitalSignature"
    exts = [
        # RFC 5280 4.2.1.9 and CA/B BR 7.1.2.7.8: an end-entity certificate, marked critical.
        X509.new_extension("basicConstraints", "CA:FALSE", critical=1),
        # RFC 5280 4.2.1.3: keyUsage SHOULD be critical.
        X509.new_extension("keyUsage", usage, critical=1),
        # CA/B BR 7.1.2.7.10: id-kp-serverAuth must be present for a TLS server certificate.
        X509.new_extension("extendedKeyUsage", "serverAuth"),
        # RFC 5280 4.2.1.2: SKI, the SHA-1 of the leaf's public key (method 1).
        X509.new_extension("subjectKeyIdentifier", leaf_key.get_key_identifier().hex()),
        # RFC 5280 4.2.1.1: AKI keyIdentifier = the issuer's SKI. "keyid:always" raises in M2Crypto
        # (notes section 5), so the key id is passed explicitly.
        X509.AuthorityKeyIdentifier(ca.ski).as_extension(),
    ]
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    # The subject name wrapper is bound to the CA's certificate, which the entry holds too.
    value = (ca.cert.get_subject(), exts)
    _SHARED[(id(ca), id(leaf_key))] = (ca, leaf_key, value)
    return value


def mint(ca: CA, leaf_key: EVP.PKey, host: str, now: float, serial: int) -> X509.X509:
    """A v3 TLS server certificate for `host` (DNS name or IP literal), signed by `ca` with SHA-256.

    Raises ValueError for an empty or malformed host or a serial outside RFC 5280's range, and
    CAError when the CA is not valid at `now`.
    """
    name = normalize_host(host)
    if not 0 < serial < 2**159:
        # RFC 5280 4.1.2.2: positive, at most 20 octets. M2Crypto accepts anything (notes section 5).
        raise ValueError(f"certificate serial must be in 1..2**159-1, got {serial}")
    text = str(name)
    san = f"IP:{text}" if isinstance(name, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else f"DNS:{text}"
    not_before, not_after = _leaf_window(ca, now)

    cert = X509.X509()
    cert.set_version(2)  # 0-based: 2 means X.509 v3, needed for extensions (RFC 5280 4.1.2.1)
    cert.set_serial_number(serial)
    subject = X509.X509_Name()
    has_cn = len(text) <= MAX_CN_LENGTH
    if has_cn:
        subject.CN = text  # legacy clients only; CA/B BR 7.1.4.3: the CN repeats a SAN value
    cert.set_subject(subject)
    cert.set_issuer(_shared(ca, leaf_key)[0])  # RFC 5280 4.1.2.4: issuer = the CA's subject, byte for byte
    cert.set_pubkey(leaf_key)
    set_validity(cert, not_before, not_after)
    extensions = _leaf_extensions(ca, leaf_key, san, critical_san=not has_cn)
    for ext in extensions:
        cert.add_ext(ext)
    ca_key = ca.key
    cert.sign(ca_key, "sha256")
    return cert


def cert_to_pem(cert: X509.X509) -> bytes:
    """The certificate in PEM form."""
    return cert.as_pem()
