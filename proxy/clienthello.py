"""Peek at a TLS ClientHello: which host (SNI), which application protocols (ALPN), which versions.

Why: M2Crypto has no SNI callback, so the proxy must know the host *before* it creates the server-side
TLS object (to pick the leaf certificate), and it needs the ALPN offer to mirror it upstream. The
bytes are only peeked at; the relay feeds the very same bytes to the TLS engine afterwards.

Theory of operation
-------------------
The input is whatever the client has sent so far. Parsing is restartable rather than incremental:
the caller calls `parse()` again on the longer buffer; each call is linear in the input.

1. Records (RFC 8446 §5.1). Each is type(1) legacy_record_version(2) length(2) fragment. We walk
   consecutive records of type 22 (handshake) and concatenate their fragments, because one handshake
   message may be fragmented across records. Anything else before the hello is complete (another
   content type, an SSLv2 header, a length over 2^14, an empty fragment) is `NotTLS`, and so is a
   record that goes on past the hello's last byte. Records after the hello are left alone.
2. Handshake header (RFC 8446 §4): msg_type(1) length(3). The type must be client_hello (1) and the
   length at most `MAX_HELLO`, which bounds the work and memory for a hostile peer.
3. ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2), read through `_Reader`. Every read is
   checked against two limits: the *declared* end of the enclosing vector (exceeding it means the
   lengths are inconsistent: `NotTLS`) and the end of the bytes *received* so far (`NeedMore`). So a
   malformed prefix is refused as early as possible, and every proper prefix of a well-formed hello
   yields `NeedMore`.
4. Extensions (RFC 8446 §4.2): only server_name (0), ALPN (16) and supported_versions (43) are
   decoded; the others are skipped after their lengths are checked.
"""

from __future__ import annotations

import ipaddress
import re

try:  # compiled (proxy/accel.py): _Reader is an extension type and the loops index bytes in C
    import cython
except ImportError:
    from ._cython import cython

__all__ = ["ClientHello", "ClientHelloError", "NeedMore", "NotTLS", "parse", "MAX_HELLO"]

MAX_HELLO = 64 * 1024  # our own bound on the handshake message body; real hellos are < 2 KiB

_HANDSHAKE = 22  # RFC 8446 §5.1 ContentType.handshake
_CLIENT_HELLO = 1  # RFC 8446 §4 HandshakeType.client_hello
_MAX_FRAGMENT = 1 << 14  # RFC 8446 §5.1: "The length MUST NOT exceed 2^14 bytes."
_EXT_SERVER_NAME, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS = 0, 16, 43

# A DNS name as clients send it: LDH labels of 1..63 octets (RFC 1035 §2.3.4). Underscores are
# tolerated because real hostnames carry them and browsers send them.
_LABEL = re.compile(rb"[a-z0-9_-]{1,63}")


class ClientHelloError(Exception):
    """Base of the two outcomes that are not a ClientHello."""


class NeedMore(ClientHelloError):
    """The bytes so far are a valid prefix of a ClientHello; read more and call `parse` again."""


class NotTLS(ClientHelloError):
    """The bytes are not (the start of) a TLS ClientHello we accept; the message says why."""


@cython.dataclasses.dataclass(frozen=True)
@cython.cclass
class ClientHello:
    sni: str | None  # host_name from server_name; lower case, no trailing dot; may be an IP literal
    alpn: tuple[str, ...]  # protocol names in the client's order, decoded as latin-1 (lossless)
    versions: tuple[int, ...]  # supported_versions without GREASE values, else (legacy_version,)
    legacy_version: int
    length: int  # bytes of records the hello occupied at the start of the input


def _is_grease(v: int) -> bool:
    # RFC 8701 §2: 0x0A0A, 0x1A1A, ..., 0xFAFA are reserved and never mean a real version.
    return v & 0x0F0F == 0x0A0A and v >> 8 == v & 0xFF


@cython.cclass
class _Reader:
    """A cursor over `buf` (the bytes received) bounded by `end` (the declared end of a vector).
    Compiled, an extension type with C integer positions (the parse of a new connection's hello
    was ~115k instructions as a plain class); from source a plain class."""

    buf = cython.declare(bytes, visibility="public")
    pos = cython.declare(cython.Py_ssize_t, visibility="public")
    end = cython.declare(cython.Py_ssize_t, visibility="public")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    @cython.cfunc
    @cython.locals(n=cython.Py_ssize_t, p=cython.Py_ssize_t, q=cython.Py_ssize_t)
    def _advance(self, n: int, what: str) -> int:
        """Move past n bytes, checked against the declared end and the bytes received; returns where
        they start."""
        p, q = self.pos, self.pos + n
        if q > self.end:
            raise NotTLS(f"malformed ClientHello: {what} overruns its enclosing length")
        if q > len(self.buf):
            raise NeedMore
        self.pos = q
        return p

    # ccall: called from parse() with the reader's type known, a C call; from Python a method as ever.
    @cython.ccall
    @cython.locals(n=cython.Py_ssize_t, p=cython.Py_ssize_t)
    def take(self, n: int, what: str) -> bytes:
        p = self._advance(n, what)
        return self.buf[p:self.pos]

    @cython.ccall
    @cython.locals(n=cython.Py_ssize_t, p=cython.Py_ssize_t, v=cython.Py_ssize_t)
    def uint(self, n: int, what: str) -> int:
        """A big-endian integer of n (at most 3) bytes."""
        p = self._advance(n, what)
        v = 0
        while p < self.pos:
            v = v << 8 | self.buf[p]
            p += 1
        return v

    @cython.ccall
    @cython.locals(n=cython.Py_ssize_t)
    def vector(self, len_bytes: int, what: str, lo: int = 0, hi: int = 1 << 24) -> _Reader:
        """A sub-reader over a length-prefixed vector `<lo..hi>` (RFC 8446 §3.4)."""
        n = self.uint(len_bytes, what + " length")
        if not lo <= n <= hi:
            raise NotTLS(f"malformed ClientHello: {what} length {n} outside {lo}..{hi}")
        if self.pos + n > self.end:
            raise NotTLS(f"malformed ClientHello: {what} overruns its enclosing length")
        sub = _Reader(self.buf, self.pos, self.pos + n)
        self.pos += n
        return sub

    @cython.ccall
    def finish(self, what: str) -> None:
        """The enclosing length must be used up exactly (known from the lengths alone)."""
        if self.pos != self.end:
            raise NotTLS(f"malformed ClientHello: {self.end - self.pos} stray bytes after {what}")

    @cython.ccall
    def done(self) -> bool:
        """True at the declared end; NeedMore if the bytes up to it have not all arrived."""
        if self.pos >= self.end:
            return True
        if self.pos >= len(self.buf):
            raise NeedMore
        return False


def _reassemble(data: bytes) -> tuple[bytes, int, int]:
    """Concatenate handshake fragments from consecutive records until the ClientHello is whole.

    Returns (handshake bytes received, declared hello body length or -1 if unknown, bytes of
    records consumed). Raises NotTLS on any record-layer violation.
    """
    frags: list[bytes] = []
    have = 0  # handshake bytes received so far
    declared = 0  # handshake bytes the records seen so far announce
    pos = 0
    need = -1  # 4 + body length once the handshake header is known
    while need < 0 or have < need:
        header = data[pos:pos + 5]
        if header[:1] and header[0] != _HANDSHAKE:
            if pos == 0 and header[0] & 0x80:
                # SSLv2 CLIENT-HELLO (RFC 6101 Appendix E.2): two-byte length with the top bit set.
                raise NotTLS("SSLv2-format ClientHello is not supported")
            raise NotTLS(f"not a TLS handshake record (content type {header[0]})")
        # legacy_record_version: 0x0300..0x0304 (RFC 8446 §5.1 allows 0x0301 in the first hello).
        if header[1:2] not in (b"", b"\x03") or header[2:3] > b"\x04":
            raise NotTLS(f"not a TLS record (version bytes {header[1:3].hex()})")
        if len(header) < 5:
            break
        rlen = header[3] << 8 | header[4]
        # RFC 8446 §5.1: at most 2^14 bytes, and no zero-length fragments of handshake type.
        if rlen > _MAX_FRAGMENT or rlen == 0:
            raise NotTLS(f"TLS record length {rlen} is not allowed")
        frag = data[pos + 5:pos + 5 + rlen]
        frags.append(frag)
        have += len(frag)
        declared += rlen
        if need < 0 and have >= 4:
            need = _check_handshake_header(frags[0] if len(frags[0]) >= 4 else b"".join(frags))
        if need >= 0 and declared > need:
            # RFC 8446 §5.1: a message preceding a key change must end at a record boundary, and a
            # client sends nothing else in its first flight, so the hello must end its record.
            raise NotTLS("unexpected handshake bytes after the ClientHello in the same record")
        if len(frag) < rlen:
            break  # the record itself is still arriving
        pos += 5 + rlen
    if need < 0 and have:
        _check_handshake_header(b"".join(frags))
    hs = frags[0] if len(frags) == 1 else b"".join(frags)
    return hs, (need - 4 if need >= 0 else -1), pos


def _check_handshake_header(hs: bytes) -> int:
    """Validate what has arrived of the 4-byte handshake header; return 4 + body length if known."""
    if hs[0] != _CLIENT_HELLO:
        raise NotTLS(f"first handshake message is type {hs[0]}, not client_hello")
    if len(hs) < 4:
        return -1
    n = int.from_bytes(hs[1:4], "big")
    if n > MAX_HELLO:
        raise NotTLS(f"ClientHello of {n} bytes exceeds the {MAX_HELLO}-byte limit")
    return 4 + n


def _server_name(r: _Reader) -> str | None:
    # RFC 6066 §3: ServerNameList server_name_list<1..2^16-1>; ServerName = name_type(1) + opaque
    # HostName<1..2^16-1>. "The ServerNameList MUST NOT contain more than one name of the same
    # name_type." Other name types share the layout in practice and are skipped.
    names = r.vector(2, "server_name list", 1, 0xFFFF)
    r.finish("server_name list")
    host: bytes | None = None
    seen: set[int] = set()
    while not names.done():
        kind = names.uint(1, "server_name type")
        name = names.vector(2, "server name", 1, 0xFFFF)
        if kind in seen:
            raise NotTLS("malformed ClientHello: repeated server_name type")
        seen.add(kind)
        value = name.take(name.end - name.pos, "server name")
        if kind == 0:
            host = value
    return None if host is None else _host_name(host)


def _host_name(raw: bytes) -> str:
    if not raw.isascii():
        raise NotTLS("SNI is not an ASCII DNS name")
    text = raw.decode("ascii")
    # RFC 6066 §3 forbids IP literals in SNI, but clients send them; report them unchanged. (The
    # cheap pre-test keeps ipaddress, which costs microseconds per miss, off the common path.)
    if b":" in raw or raw.replace(b".", b"").isdigit():
        try:
            ipaddress.ip_address(text)
            return text
        except ValueError:
            pass
    # RFC 6066 §3: "without a trailing dot"; tolerated, as many clients leave it in.
    name = raw.lower()[:-1] if raw.endswith(b".") else raw.lower()
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(lb) for lb in name.split(b".")):
        raise NotTLS(f"SNI {text!r} is not a valid DNS name")
    return name.decode("ascii")


def _alpn(r: _Reader) -> tuple[str, ...]:
    # RFC 7301 §3.1: ProtocolNameList protocol_name_list<2..2^16-1>; ProtocolName opaque<1..2^8-1>.
    names = r.vector(2, "ALPN list", 2, 0xFFFF)
    r.finish("ALPN list")
    buf, p, end = names.buf, names.pos, names.end
    out = []
    while p < end:
        if p >= len(buf):
            raise NeedMore
        q = p + 1 + buf[p]
        if q == p + 1 or q > end:  # "Empty strings MUST NOT be included"
            raise NotTLS("malformed ClientHello: bad ALPN protocol name length")
        if q > len(buf):
            raise NeedMore
        out.append(buf[p + 1:q].decode("latin-1"))
        p = q
    return tuple(out)


def _supported_versions(r: _Reader) -> tuple[int, ...]:
    # RFC 8446 §4.2.1: in a ClientHello, ProtocolVersion versions<2..254>.
    vs = r.vector(1, "supported_versions", 2, 254)
    r.finish("supported_versions")
    if (vs.end - vs.pos) % 2:
        raise NotTLS("malformed ClientHello: odd supported_versions length")
    raw = vs.take(vs.end - vs.pos, "supported_versions")
    versions = (raw[i] << 8 | raw[i + 1] for i in range(0, len(raw), 2))
    return tuple(v for v in versions if not _is_grease(v))


@cython.locals(hs=bytes, r=_Reader, exts=_Reader, p=cython.Py_ssize_t, q=cython.Py_ssize_t,
               end=cython.Py_ssize_t, kind=cython.int)
def parse(data: bytes) -> ClientHello:
    """Parse the ClientHello at the start of `data` (bytes as received from the client).

    Raises `NeedMore` if `data` is a valid but incomplete prefix, `NotTLS` if it cannot be one.
    Bytes after the hello's last record (e.g. 0-RTT data) are ignored; see `ClientHello.length`.
    """
    if not data:
        raise NeedMore
    data = bytes(data)
    hs, body_len, consumed = _reassemble(data)
    if body_len < 0:
        raise NeedMore  # the handshake header has not fully arrived
    r = _Reader(hs, 4, 4 + body_len)
    legacy_version = r.uint(2, "legacy_version")
    if legacy_version >> 8 != 3:
        raise NotTLS(f"ClientHello legacy_version {legacy_version:#06x} is not SSL 3 / TLS")
    r.take(32, "random")
    r.vector(1, "legacy_session_id", 0, 32)  # RFC 8446 §4.1.2: legacy_session_id<0..32>
    suites = r.vector(2, "cipher_suites", 2, 0xFFFE)  # cipher_suites<2..2^16-2>, 2 bytes each
    if (suites.end - suites.pos) % 2:
        raise NotTLS("malformed ClientHello: odd cipher_suites length")
    r.vector(1, "legacy_compression_methods", 1, 0xFF)
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] | None = None
    # RFC 5246 §7.4.1.2: a hello may end after compression_methods (no extensions at all).
    if not r.done():
        exts = r.vector(2, "extensions", 0, 0xFFFF)
        r.finish("the extensions")
        # Walked by hand rather than with a _Reader per extension: hellos carry 15-20 extensions
        # and this loop is most of the parse time.
        seen: set[int] = set()
        p, end = exts.pos, exts.end
        while p < end:
            if p + 4 > end:
                raise NotTLS("malformed ClientHello: truncated extension header")
            if p + 4 > len(hs):
                raise NeedMore
            kind, q = hs[p] << 8 | hs[p + 1], p + 4 + (hs[p + 2] << 8 | hs[p + 3])
            if q > end:
                raise NotTLS(f"malformed ClientHello: extension {kind} overruns the extensions")
            # RFC 8446 §4.2: "There MUST NOT be more than one extension of the same type".
            if kind in seen:
                raise NotTLS(f"malformed ClientHello: extension {kind} repeated")
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                sni = _server_name(_Reader(hs, p + 4, q))
            elif kind == _EXT_ALPN:
                alpn = _alpn(_Reader(hs, p + 4, q))
            elif kind == _EXT_SUPPORTED_VERSIONS:
                versions = _supported_versions(_Reader(hs, p + 4, q))
            p = q
    if len(hs) < 4 + body_len:
        raise NeedMore  # the last extension skipped ends at the body's end but has not all arrived
    return ClientHello(
        sni=sni,
        alpn=alpn,
        versions=versions if versions is not None else (legacy_version,),
        legacy_version=legacy_version,
        length=consumed,
    )
