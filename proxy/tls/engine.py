"""One TLS endpoint over memory BIOs, M2Crypto on both sides: bytes in, bytes out, no sockets.

Theory of operation
-------------------
`TLSEngine` owns one `SSL*` and its two memory BIOs. The caller feeds ciphertext that arrived from
the network with `receive()` (or `receive_eof()`), drives the handshake with `handshake()`, moves
plaintext with `read()`/`write()`, and after EVERY call takes the ciphertext to send with
`outgoing()` (design.md principle 2: drain after every TLS operation).

We use the raw `m2.ssl_*`/`m2.bio_*` functions rather than `SSL.Connection`, which fences off the
traps measured in ../shared/notes/m2crypto.md in one place:
- no real socket is ever opened (`SSL.Connection(ctx)` opens one per object, §1.4.1);
- the BIO pointers never leave this object and are never used after `SSL_free` (§1.4.2: SIGSEGV),
  and `SSL_set_bio` is called exactly once (a second call frees the first pair);
- no `Connection.__del__` calling `SSL_shutdown` on a half-open SSL from the garbage collector, and
  the thread's OpenSSL error queue is cleared before every operation (§1.4.3: stale errors make
  `bio_read` raise);
- EOF from the network is signalled explicitly with `bio_set_mem_eof_return` (§1.4.4), so a
  truncated stream is an error, not a hang;
- the session is never read with `Connection.get_session()` (a double free, §1.4.7);
- the `SSL.Context` is referenced for the engine's whole life, keeping any ctypes callbacks pinned
  on it alive (§4).
Errors are translated here, at the boundary, into `TLSFailure` carrying OpenSSL's reason string and
the X509 verify code; contexts.py/relay turn those into the typed hierarchy of errors.py.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress

from M2Crypto import SSL, X509, m2

from ..flow import CertInfo
from . import openssl_ext

# M2Crypto's C functions on the per-request path, bound once: in the compiled build (proxy/accel.py) a
# module attribute lookup per call, ~20 per proxied request, showed in the instruction profile.
_bio_write, _bio_read, _bio_pending, _ssl_pending = m2.bio_write, m2.bio_read, m2.bio_ctrl_pending, m2.ssl_pending
_ssl_read, _ssl_write, _err_clear = m2.ssl_read_nbio, m2.ssl_write_nbio, m2.err_clear_error

__all__ = ["TLSEngine", "TLSFailure", "cert_info", "cert_info_der", "has_san", "is_ip"]

_WANT = (m2.ssl_error_want_read, m2.ssl_error_want_write)
_READ_SIZE = 16384  # one TLS record at most per ssl_read_nbio call (§1.4.10)


class TLSFailure(Exception):
    """A TLS operation failed. `reason` is OpenSSL's reason string (or ours); `verify_code` is
    SSL_get_verify_result() for client-mode engines (0 = the certificate verified)."""

    def __init__(self, reason: str, verify_code: int = 0, *, eof: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.verify_code = verify_code
        self.eof = eof


def is_ip(host: str) -> bool:
    # An IPv6 literal has a colon and an IPv4 literal ends in a digit: anything else is a name, found
    # without ipaddress's failed parse (an exception, on every new connection).
    if ":" not in host and not host[-1:].isdigit():
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_SSL_R_UNEXPECTED_EOF_WHILE_READING = 294  # include/openssl/sslerr.h
_ERR_REASON_MASK = 0x7FFFFF  # ERR_GET_REASON (OpenSSL 3)


def _drain_errors() -> tuple[str, int]:
    """Pop the thread's OpenSSL error queue; return the first reason string and reason code."""
    first = ("", 0)
    while True:
        code = m2.err_get_error()
        if not code:
            return first
        if not first[0]:
            first = (m2.err_reason_error_string(code) or f"error {code:#x}", code & _ERR_REASON_MASK)


class TLSEngine:
    """A TLS endpoint in client mode (`server_side=False`: the proxy talking to an origin) or server
    mode (the proxy talking to the browser). Not thread-safe; one per connection."""

    __slots__ = ("_ctx", "_ssl", "_rb", "_wb", "server_side", "handshake_done", "_closed", "hostname", "leaf_der",
                 "_sessions", "offered_leaf")

    def __init__(
        self,
        ctx: SSL.Context,
        *,
        server_side: bool,
        hostname: str | None = None,
        sni: bool = True,
        alpn: tuple[str, ...] = (),
        sessions=None,  # client mode: a tls.sessions.SessionCache to resume from and feed
        session_key: tuple = (),
        session_group: tuple | None = None,  # sibling sessions: see tls/sessions.py
        cert: X509.X509 | None = None,  # server mode: the certificate to serve (contexts.server_context)
    ) -> None:
        self._ctx = ctx  # keeps the SSL_CTX and its pinned ctypes callbacks alive (§4)
        self.server_side = server_side
        self.handshake_done = False
        self._closed = False
        self.hostname = hostname
        self.leaf_der: bytes | None = None  # client mode: the origin's leaf, even if it was refused
        self._sessions = None
        self.offered_leaf: bytes | None = None  # the verified leaf of the session offered, if one was
        m2.err_clear_error()
        self._ssl = m2.ssl_new(ctx.ctx)
        self._rb = m2.bio_new(m2.bio_s_mem())
        self._wb = m2.bio_new(m2.bio_s_mem())
        m2.ssl_set_bio(self._ssl, self._rb, self._wb)  # SSL owns both BIOs from here on: never free them
        if server_side:
            if cert is not None:
                try:
                    openssl_ext.ssl_use_certificate(int(self._ssl), int(cert.x509))
                except ValueError:
                    self.free()
                    raise
            m2.ssl_set_accept_state(self._ssl)
            return
        if not hostname:
            # set1_host("") silently disables the hostname check (§1.4.6): refuse outright.
            self.free()
            raise ValueError("an upstream TLS connection needs a host name to verify")
        host = hostname.rstrip(".").lower()  # a trailing dot never matches (§1.4.6)
        m2.ssl_set_connect_state(self._ssl)
        if sni and not is_ip(host):
            # RFC 6066 §3: "Literal IPv4 and IPv6 addresses are not permitted in HostName".
            m2.ssl_set_tlsext_host_name(self._ssl, host)
        m2.ssl_set1_host(self._ssl, host)  # checked during the handshake (verify code 62/64)
        if alpn:
            openssl_ext.ssl_set_alpn_protos(int(self._ssl), alpn)
        if sessions is not None:
            self._sessions = sessions
            source = sessions.attach(int(self._ssl), session_key, session_group, host)
            if source is not None:
                self.offered_leaf = sessions.leaf(source)

    def choose_alpn(self, protocols: tuple[str, ...]) -> None:
        """Server mode, before the handshake: answer the client's ALPN offer with the first of
        `protocols` it offers (none: no ALPN). ALPN mirroring selects what the origin selected."""
        openssl_ext.ssl_set_alpn_choice(int(self._ssl), tuple(p.encode("ascii") for p in protocols))

    # --- ciphertext in/out --------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        if data and not self._closed:
            _bio_write(self._rb, data)

    def receive_eof(self) -> None:
        if not self._closed:
            m2.bio_set_mem_eof_return(self._rb, 0)

    def has_input(self) -> bool:
        """Ciphertext waiting in the read BIO or plaintext buffered in OpenSSL: read() may return data.
        False means read() could only say "need more", so the caller waits for the network instead."""
        if self._closed:
            return True  # read() then raises, which is what the caller must see
        return _bio_pending(self._rb) > 0 or _ssl_pending(self._ssl) > 0

    def outgoing(self) -> bytes:
        if self._closed:
            return b""
        n = _bio_pending(self._wb)
        if not n:
            return b""
        _err_clear()
        return _bio_read(self._wb, n) or b""

    # --- TLS operations -----------------------------------------------------------------------

    def handshake(self) -> bool:
        """Advance the handshake; True once complete. Raises TLSFailure."""
        if self.handshake_done:
            return True
        if self._closed:
            raise TLSFailure("connection already closed")
        m2.err_clear_error()
        r = m2.ssl_do_handshake(self._ssl)
        if r == 1:
            self.handshake_done = True
            self._take_leaf()
            return True
        err = m2.ssl_get_error(self._ssl, r)
        if err in _WANT:
            return False
        self._take_leaf()
        reason, code = _drain_errors()
        verify = 0 if self.server_side else m2.ssl_get_verify_result(self._ssl)
        eof = code == _SSL_R_UNEXPECTED_EOF_WHILE_READING or (
            not reason and err in (m2.ssl_error_syscall, m2.ssl_error_zero_return))
        if eof:
            reason = "connection closed during the TLS handshake"
        raise TLSFailure(reason or f"TLS error {err}", verify, eof=eof)

    def _take_leaf(self) -> None:
        if not self.server_side:
            der = openssl_ext.take_leaf_der(int(self._ssl))
            if der:
                self.leaf_der = der

    def read(self) -> bytes | None:
        """Decrypted bytes: data, b"" once the peer closed (close_notify), None if more input is
        needed. Raises TLSFailure (e.g. "unexpected eof while reading": truncation)."""
        if self._closed:
            raise TLSFailure("connection already closed")
        try:
            data = _ssl_read(self._ssl, _READ_SIZE)
        except SSL.SSLError as e:
            _err_clear()
            raise TLSFailure(str(e) or "TLS read error") from None
        return data

    def write(self, data: bytes) -> None:
        """Encrypt `data` (the whole buffer: memory BIOs never block after the handshake)."""
        if not data:
            return
        if self._closed:
            raise TLSFailure("connection already closed")
        try:
            n = _ssl_write(self._ssl, data)
        except (SSL.SSLError, BrokenPipeError) as e:
            _err_clear()
            raise TLSFailure(str(e) or "TLS write error") from None
        if n != len(data):
            raise TLSFailure(f"TLS write incomplete ({n} of {len(data)} bytes)")

    def shutdown(self) -> None:
        """Queue a close_notify (send it with outgoing())."""
        if self.handshake_done and not self._closed:
            m2.ssl_shutdown(self._ssl)
            m2.err_clear_error()

    def free(self) -> None:
        """Release the SSL and its BIOs now. Idempotent; the engine is unusable afterwards."""
        if not self._closed:
            self._closed = True
            ptr = int(self._ssl)
            openssl_ext.take_leaf_der(ptr)
            if self.server_side:
                openssl_ext.ssl_clear_alpn_choice(ptr)
            elif self._sessions is not None:
                self._sessions.detach(ptr)
            m2.ssl_free(self._ssl)  # also frees _rb and _wb
            self._ssl = self._rb = self._wb = None
            m2.err_clear_error()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass

    # --- facts for the log --------------------------------------------------------------------

    @property
    def version(self) -> str | None:
        return m2.ssl_get_version(self._ssl) if self.handshake_done and not self._closed else None

    @property
    def cipher(self) -> str | None:
        if not self.handshake_done:
            return None
        c = m2.ssl_get_current_cipher(self._ssl)
        return m2.ssl_cipher_get_name(c) if c else None

    @property
    def alpn(self) -> str | None:
        return openssl_ext.ssl_get_alpn_selected(int(self._ssl)) if self.handshake_done else None

    @property
    def session_reused(self) -> bool:
        """Client mode: the handshake resumed a session (no certificate was sent or verified)."""
        return self.handshake_done and not self._closed and openssl_ext.ssl_session_reused(int(self._ssl))

    @property
    def verify_code(self) -> int:
        return m2.ssl_get_verify_result(self._ssl)

    def peer_cert(self) -> X509.X509 | None:
        ptr = m2.ssl_get_peer_cert(self._ssl)  # get1: we own the reference
        return X509.X509(ptr, 1) if ptr else None

    def __repr__(self) -> str:
        side = "server" if self.server_side else f"client for {self.hostname}"
        state = "closed" if self._closed else ("up" if self.handshake_done else "handshaking")
        return f"<TLSEngine {side} {state}>"


@functools.lru_cache(maxsize=256)
def cert_info_der(der: bytes) -> CertInfo:
    """cert_info() of a DER certificate, cached: an origin shows the same certificate on every
    connection, and parsing it showed in the new-connection profile."""
    return cert_info(X509.load_cert_der_string(der))


def cert_info(cert: X509.X509) -> CertInfo:
    """The upstream certificate's facts for the flow record."""
    try:
        san = cert.get_ext("subjectAltName").get_value()
        sans = tuple(s.strip() for s in san.split(",") if s.strip())
    except LookupError:
        sans = ()
    der = cert.as_der()
    return CertInfo(
        subject=cert.get_subject().as_text(),
        issuer=cert.get_issuer().as_text(),
        sans=sans,
        sha256=hashlib.sha256(der).hexdigest(),
        not_before=str(cert.get_not_before()),
        not_after=str(cert.get_not_after()),
    )


def has_san(cert: X509.X509) -> bool:
    try:
        cert.get_ext("subjectAltName")
    except LookupError:
        return False
    return True
