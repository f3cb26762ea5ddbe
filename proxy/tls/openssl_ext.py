"""What M2Crypto 0.51 does not wrap, reached with ctypes on the very libssl M2Crypto loaded.

Theory of operation: `int(ctx.ctx)` and the raw `SSL*` from `m2.ssl_new` are plain pointers into
the libssl.so that M2Crypto's extension links. We open that same library (found in /proc/self/maps,
so there is exactly one OpenSSL in the process) and call the few functions we need: the protocol
floor, ALPN on both sides, the key-log callback and SSL_MODE_RELEASE_BUFFERS.

Rules measured in ../shared/notes/m2crypto.md §4, each one a crash when broken:
- every function gets `argtypes`/`restype`, pointers as `c_void_p` (an int would be truncated);
- every callback object is stored on the Python object that owns the SSL_CTX (`_pins`), because a
  collected CFUNCTYPE is a SIGSEGV on the next handshake;
- a callback body never raises into C: it is wrapped and fails the handshake with a fatal alert;
- OpenSSL never gets a pointer into Python memory that it keeps (ALPN select points `*out` into
  OpenSSL's own `in` buffer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

from M2Crypto import SSL, m2  # noqa: F401  (importing M2Crypto maps libssl into the process)

__all__ = [
    "TLS1_2_VERSION",
    "TLS1_3_VERSION",
    "set_min_version",
    "set_release_buffers",
    "ssl_set_alpn_protos",
    "ssl_get_alpn_selected",
    "ctx_select_alpn",
    "ssl_set_alpn_choice",
    "ssl_clear_alpn_choice",
    "ctx_set_keylog",
    "encode_alpn",
    "ctx_set_verify",
    "take_leaf_der",
    "ctx_get_options",
]

TLS1_2_VERSION = 0x0303
TLS1_3_VERSION = 0x0304
_SSL_CTRL_MODE = 33
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_SSL_MODE_RELEASE_BUFFERS = 0x10
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_ALERT_FATAL = 2
_SSL_TLSEXT_ERR_NOACK = 3


def _find_libssl() -> str:
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rsplit(None, 1)[-1]
            if "/libssl.so" in path:
                return path
    found = ctypes.util.find_library("ssl")  # not Linux-like /proc: fall back to the loader's choice
    if not found:
        raise OSError("libssl not found in the process")
    return found


_lib = ctypes.CDLL(_find_libssl())
_crypto = ctypes.CDLL(_find_libssl().replace("libssl", "libcrypto"))
_vp, _int, _long, _uint = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_uint

_lib.SSL_CTX_ctrl.argtypes = [_vp, _int, _long, _vp]
_lib.SSL_CTX_ctrl.restype = _long
_lib.SSL_CTX_get_options.argtypes = [_vp]
_lib.SSL_CTX_get_options.restype = ctypes.c_uint64
_lib.SSL_set_alpn_protos.argtypes = [_vp, ctypes.c_char_p, _uint]
_lib.SSL_set_alpn_protos.restype = _int
_lib.SSL_get0_alpn_selected.argtypes = [_vp, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(_uint)]
_lib.SSL_get0_alpn_selected.restype = None

_ALPN_SELECT_CB = ctypes.CFUNCTYPE(
    _int, _vp, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_ubyte), _vp, _uint, _vp
)
_lib.SSL_CTX_set_alpn_select_cb.argtypes = [_vp, _ALPN_SELECT_CB, _vp]
_lib.SSL_CTX_set_alpn_select_cb.restype = None

_KEYLOG_CB = ctypes.CFUNCTYPE(None, _vp, ctypes.c_char_p)
_lib.SSL_CTX_set_keylog_callback.argtypes = [_vp, _KEYLOG_CB]
_lib.SSL_CTX_set_keylog_callback.restype = None


_VERIFY_CB = ctypes.CFUNCTYPE(_int, _int, _vp)
_lib.SSL_CTX_set_verify.argtypes = [_vp, _int, _VERIFY_CB]
_lib.SSL_CTX_set_verify.restype = None
_lib.SSL_get_ex_data_X509_STORE_CTX_idx.argtypes = []
_lib.SSL_get_ex_data_X509_STORE_CTX_idx.restype = _int
_crypto.X509_STORE_CTX_get_ex_data.argtypes = [_vp, _int]
_crypto.X509_STORE_CTX_get_ex_data.restype = _vp
_crypto.X509_STORE_CTX_get_error_depth.argtypes = [_vp]
_crypto.X509_STORE_CTX_get_error_depth.restype = _int
_crypto.X509_STORE_CTX_get_current_cert.argtypes = [_vp]
_crypto.X509_STORE_CTX_get_current_cert.restype = _vp
_crypto.i2d_X509.argtypes = [_vp, ctypes.POINTER(ctypes.c_void_p)]
_crypto.i2d_X509.restype = _int
_SSL_EX_IDX = _lib.SSL_get_ex_data_X509_STORE_CTX_idx()
SSL_VERIFY_NONE = 0
SSL_VERIFY_PEER = 1

# The origin's leaf certificate as seen during verification, by SSL* address. OpenSSL does not keep
# the peer certificate of a handshake that failed verification, yet the 502 page must say which
# names the certificate is for; the engine takes (and so removes) its entry when it is freed.
_leaf_der: dict[int, bytes] = {}


def _x509_der(x509: int) -> bytes:
    n = _crypto.i2d_X509(x509, None)
    if n <= 0:
        return b""
    buf = ctypes.create_string_buffer(n)
    p = ctypes.c_void_p(ctypes.addressof(buf))  # i2d writes here and advances p; nothing is kept
    _crypto.i2d_X509(x509, ctypes.byref(p))
    return buf.raw


def _verify(preverify_ok: int, store_ctx: int) -> int:
    try:
        if _crypto.X509_STORE_CTX_get_error_depth(store_ctx) == 0:
            ssl_ptr = _crypto.X509_STORE_CTX_get_ex_data(store_ctx, _SSL_EX_IDX)
            cert = _crypto.X509_STORE_CTX_get_current_cert(store_ctx)
            if ssl_ptr and cert:
                _leaf_der[ssl_ptr] = _x509_der(cert)
    except BaseException:  # never unwind into C; OpenSSL's own verdict stands
        pass
    return preverify_ok


_VERIFY_CALLBACK = _VERIFY_CB(_verify)  # module-level: alive as long as the process


def ctx_set_verify(ctx: SSL.Context, mode: int) -> None:
    """SSL_CTX_set_verify with a callback that only records the leaf (never changes the verdict)."""
    _lib.SSL_CTX_set_verify(int(ctx.ctx), mode, _VERIFY_CALLBACK)


def take_leaf_der(ssl_ptr: int) -> bytes | None:
    return _leaf_der.pop(ssl_ptr, None)


def _pin(ctx: SSL.Context, obj: object) -> None:
    pins = getattr(ctx, "_httpsdump_pins", None)
    if pins is None:
        pins = []
        ctx._httpsdump_pins = pins  # lives exactly as long as the SSL_CTX's Python owner
    pins.append(obj)


def set_min_version(ctx: SSL.Context, version: int = TLS1_2_VERSION) -> None:
    """SSL_CTX_set_min_proto_version (a macro over SSL_CTX_ctrl)."""
    if _lib.SSL_CTX_ctrl(int(ctx.ctx), _SSL_CTRL_SET_MIN_PROTO_VERSION, version, None) != 1:
        raise ValueError(f"cannot set minimum TLS version {version:#x}")


_lib.SSL_CTX_set_ciphersuites.argtypes = [_vp, ctypes.c_char_p]
_lib.SSL_CTX_set_ciphersuites.restype = _int
_lib.SSL_CTX_set_num_tickets.argtypes = [_vp, ctypes.c_size_t]
_lib.SSL_CTX_set_num_tickets.restype = _int


def set_ciphersuites(ctx: SSL.Context, suites: str) -> None:
    """SSL_CTX_set_ciphersuites: the TLS 1.3 suites, in order of preference."""
    if _lib.SSL_CTX_set_ciphersuites(int(ctx.ctx), suites.encode("ascii")) != 1:
        raise ValueError(f"cannot set TLS 1.3 cipher suites {suites!r}")


_lib.SSL_use_certificate.argtypes = [_vp, _vp]
_lib.SSL_use_certificate.restype = _int
_lib.SSL_get_privatekey.argtypes = [_vp]
_lib.SSL_get_privatekey.restype = _vp
_crypto.ERR_clear_error.argtypes = []
_crypto.ERR_clear_error.restype = None


def ssl_use_certificate(ssl_ptr: int, x509_ptr: int) -> None:
    """SSL_use_certificate: this connection serves `x509_ptr` (OpenSSL takes its own reference).
    A certificate whose key is not the context's makes OpenSSL drop the key silently (the handshake
    would fail later, obscurely): refuse it here. (The key is then gone, which a pointer shows: no
    SSL_check_private_key, a key comparison that cost ~1.4% of a new connection.)"""
    if _lib.SSL_use_certificate(ssl_ptr, x509_ptr) != 1 or not _lib.SSL_get_privatekey(ssl_ptr):
        _crypto.ERR_clear_error()
        raise ValueError("the certificate does not match the context's private key")


def set_num_tickets(ctx: SSL.Context, n: int) -> None:
    """SSL_CTX_set_num_tickets: TLS 1.3 session tickets a server sends after each handshake."""
    _lib.SSL_CTX_set_num_tickets(int(ctx.ctx), n)


def ctx_get_options(ctx: SSL.Context) -> int:
    return _lib.SSL_CTX_get_options(int(ctx.ctx))


# --- client sessions (resumption towards origins; proxy/tls/sessions.py) ---------------------------

_NEW_SESSION_CB = ctypes.CFUNCTYPE(_int, _vp, _vp)
_lib.SSL_CTX_sess_set_new_cb.argtypes = [_vp, _NEW_SESSION_CB]
_lib.SSL_CTX_sess_set_new_cb.restype = None
_lib.SSL_set_session.argtypes = [_vp, _vp]
_lib.SSL_set_session.restype = _int
_lib.SSL_SESSION_free.argtypes = [_vp]
_lib.SSL_SESSION_free.restype = None
_lib.SSL_SESSION_get_protocol_version.argtypes = [_vp]
_lib.SSL_SESSION_get_protocol_version.restype = _int
_lib.SSL_session_reused.argtypes = [_vp]
_lib.SSL_session_reused.restype = _int
_lib.SSL_get_verify_result.argtypes = [_vp]
_lib.SSL_get_verify_result.restype = _long
_lib.SSL_SESSION_get0_peer.argtypes = [_vp]
_lib.SSL_SESSION_get0_peer.restype = _vp
_crypto.X509_check_host.argtypes = [_vp, ctypes.c_char_p, ctypes.c_size_t, _uint, _vp]
_crypto.X509_check_host.restype = _int
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_CLIENT = 0x0001
_SSL_SESS_CACHE_NO_INTERNAL = 0x0100 | 0x0200  # no lookup, no store: the Python cache owns them


def ctx_set_new_session_cb(ctx: SSL.Context, on_new: Callable[[int, int], bool]) -> None:
    """Client sessions (TLS 1.2 at the end of the handshake, TLS 1.3 with each NewSessionTicket) go
    to `on_new(ssl_ptr, session_ptr)`; when it returns True it keeps the session's reference and
    must SSL_SESSION_free it later (session_free)."""

    def new_session(ssl, sess):  # noqa: ANN001 - C signature
        try:
            return 1 if on_new(ssl, sess) else 0
        except BaseException:  # never unwind into C
            return 0

    cb = _NEW_SESSION_CB(new_session)
    _pin(ctx, cb)
    _lib.SSL_CTX_ctrl(int(ctx.ctx), _SSL_CTRL_SET_SESS_CACHE_MODE,
                      _SSL_SESS_CACHE_CLIENT | _SSL_SESS_CACHE_NO_INTERNAL, None)
    _lib.SSL_CTX_sess_set_new_cb(int(ctx.ctx), cb)


def ssl_set_session(ssl_ptr: int, session_ptr: int) -> bool:
    """Offer `session_ptr` for resumption (OpenSSL takes its own reference)."""
    return _lib.SSL_set_session(ssl_ptr, session_ptr) == 1


def session_version(session_ptr: int) -> int:
    return _lib.SSL_SESSION_get_protocol_version(session_ptr)


def session_free(session_ptr: int) -> None:
    _lib.SSL_SESSION_free(session_ptr)


def session_valid_for(session_ptr: int, host: str) -> bool:
    """The session's verified peer certificate is valid for `host` (X509_check_host with the flags
    SSL_set1_host uses by default, 0: the check a full handshake would have made)."""
    cert = _lib.SSL_SESSION_get0_peer(session_ptr)  # owned by the session: no copy, no decoding
    if not cert:
        return False
    name = host.encode()  # as SSL_set1_host gets it from M2Crypto
    return _crypto.X509_check_host(cert, name, len(name), 0, None) == 1


def ssl_session_reused(ssl_ptr: int) -> bool:
    return _lib.SSL_session_reused(ssl_ptr) == 1


def ssl_verify_result(ssl_ptr: int) -> int:
    return _lib.SSL_get_verify_result(ssl_ptr)


def set_release_buffers(ctx: SSL.Context) -> None:
    """SSL_MODE_RELEASE_BUFFERS: idle connections give their 34 KiB record buffers back."""
    _lib.SSL_CTX_ctrl(int(ctx.ctx), _SSL_CTRL_MODE, _SSL_MODE_RELEASE_BUFFERS, None)


def encode_alpn(protocols: tuple[str, ...] | list[str]) -> bytes:
    """RFC 7301 §3.1 ProtocolNameList wire format."""
    out = bytearray()
    for p in protocols:
        b = p.encode("ascii")
        if not 0 < len(b) < 256:
            raise ValueError(f"bad ALPN protocol name {p!r}")
        out.append(len(b))
        out += b
    return bytes(out)


def ssl_set_alpn_protos(ssl_ptr: int, protocols: tuple[str, ...] | list[str]) -> None:
    """Client side: offer `protocols`. Note SSL_set_alpn_protos returns 0 on success."""
    wire = encode_alpn(protocols)
    if _lib.SSL_set_alpn_protos(ssl_ptr, wire, len(wire)) != 0:
        raise ValueError("SSL_set_alpn_protos failed")


def ssl_get_alpn_selected(ssl_ptr: int) -> str | None:
    data = ctypes.c_void_p()
    length = _uint()
    _lib.SSL_get0_alpn_selected(ssl_ptr, ctypes.byref(data), ctypes.byref(length))
    if not data.value or not length.value:
        return None
    return ctypes.string_at(data.value, length.value).decode("ascii", "replace")


# Per-connection ALPN answers for the server side (ALPN mirroring, issue #7): SSL* address -> the
# protocols this connection may select, in order. Set before the handshake, cleared when the SSL is
# freed (TLSEngine.free); connections without an entry use the context's default preference.
_ALPN_CHOICE: dict[int, tuple[bytes, ...]] = {}


def ssl_set_alpn_choice(ssl_ptr: int, protocols: tuple[bytes, ...]) -> None:
    """Server side, one connection: select the first of `protocols` the client offers (NOACK if none)."""
    _ALPN_CHOICE[ssl_ptr] = protocols


def ssl_clear_alpn_choice(ssl_ptr: int) -> None:
    _ALPN_CHOICE.pop(ssl_ptr, None)


def ctx_select_alpn(ctx: SSL.Context, supported: tuple[bytes, ...]) -> None:
    """Server side: pick the first of `supported` (our preference order, or the connection's own list
    from ssl_set_alpn_choice) that the client offers; when none is offered, answer without ALPN
    (NOACK) rather than failing the handshake, as RFC 7301 §3.2 allows for a server that does not
    support the client's protocols."""

    def select(ssl, out, outlen, inp, inlen, _arg):  # noqa: ANN001 - C signature
        try:
            offered = ctypes.string_at(inp, inlen)
            i = 0
            positions = {}
            while i < len(offered):
                n = offered[i]
                positions.setdefault(offered[i + 1 : i + 1 + n], i + 1)
                i += 1 + n
            for proto in _ALPN_CHOICE.get(ssl, supported):
                pos = positions.get(proto)
                if pos is not None:
                    out[0] = inp + pos  # points into OpenSSL's own buffer, never into Python memory
                    outlen[0] = len(proto)
                    return _SSL_TLSEXT_ERR_OK
            return _SSL_TLSEXT_ERR_NOACK
        except BaseException:  # never unwind into C
            return _SSL_TLSEXT_ERR_ALERT_FATAL

    cb = _ALPN_SELECT_CB(select)
    _pin(ctx, cb)
    _lib.SSL_CTX_set_alpn_select_cb(int(ctx.ctx), cb, None)


def ctx_set_keylog(ctx: SSL.Context, write_line: Callable[[bytes], None]) -> None:
    """NSS key log lines (for Wireshark) for every connection made from `ctx`."""

    def keylog(_ssl, line):  # noqa: ANN001 - C signature
        try:
            write_line(line)
        except BaseException:
            pass

    cb = _KEYLOG_CB(keylog)
    _pin(ctx, cb)
    _lib.SSL_CTX_set_keylog_callback(int(ctx.ctx), cb)
