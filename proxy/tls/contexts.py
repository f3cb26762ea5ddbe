"""The two kinds of SSL_CTX the proxy uses, and the translation of TLS failures into errors.py.

Upstream (proxy → origin): ONE hardened context per trust configuration, shared by every upstream
connection (loading the system bundle costs ~22 ms, notes §1.5). M2Crypto's default context is unsafe
on OpenSSL 3 (its SSL_OP_ALL value turns off Extended Master Secret and makes truncation look like a
clean EOF, notes §1.3), so we build it with `weak_crypto=1` (M2 sets no options) and set our own.

Client-facing (browser → proxy): one small context per minted host, certificate and key loaded from
memory (no files), cached by ca.store.LeafStore.
"""

from __future__ import annotations

import logging
import os

from M2Crypto import SSL, X509, m2

from ..errors import CertificateError, CertReason, ClientTLSError, UpstreamTLSError
from . import openssl_ext
from .sessions import SessionCache
from .engine import TLSFailure

__all__ = ["upstream_context", "server_context", "upstream_failure", "describe_names"]

log = logging.getLogger(__name__)

_NO_RENEGOTIATION = 1 << 30  # SSL_OP_NO_RENEGOTIATION (OpenSSL 3)
_HARDENED_OPTIONS = m2.SSL_OP_NO_SSLv3 | m2.SSL_OP_NO_TLSv1 | m2.SSL_OP_NO_TLSv1_1 | _NO_RENEGOTIATION
# TLS 1.3 suites offered to origins, in the order Chrome offers them: AES-128-GCM first costs less per
# handshake (SHA-256 key schedule) and per byte than OpenSSL's default AES-256-GCM-SHA384 first, at
# the strength browsers settle for. Towards clients, the client's own order decides (OpenSSL default).
_UPSTREAM_TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# One TLS 1.3 ticket per client handshake instead of OpenSSL's two (what a browser keeps and uses; the
# second one cost ~2.5% of a new proxied connection, callgrind).
_SERVER_TICKETS = 1
_ALPN_SERVER = (b"http/1.1",)  # this release relays HTTP/1.1 only


def _hardened() -> SSL.Context:
    ctx = SSL.Context("tls", weak_crypto=1)  # skip M2's OpenSSL-1.0-era option bits (notes §1.3)
    ctx.set_options(_HARDENED_OPTIONS)
    openssl_ext.set_min_version(ctx, openssl_ext.TLS1_2_VERSION)
    openssl_ext.set_release_buffers(ctx)
    return ctx


def upstream_context(extra_cafiles: tuple[str, ...] = (), *, insecure: bool = False,
                     client_cert: str | None = None, keylog=None, resumption: bool = True) -> SSL.Context:
    """Verifying client context: the system trust store plus `extra_cafiles` (never instead of it).
    With `insecure`, verification still runs (its result is logged) but does not stop the
    handshake; the caller must log that choice."""
    ctx = _hardened()
    openssl_ext.set_ciphersuites(ctx, _UPSTREAM_TLS13_SUITES)
    if not ctx.set_default_verify_paths():
        log.warning("could not load the system trust store; only --upstream-ca files are trusted")
    for path in extra_cafiles:
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        if ctx.load_verify_locations(cafile=path) != 1:
            raise ValueError(f"{path}: no usable CA certificate in this file")
    m2.ssl_ctx_set_verify_depth(ctx.ctx, 9)
    mode = openssl_ext.SSL_VERIFY_NONE if insecure else openssl_ext.SSL_VERIFY_PEER
    openssl_ext.ctx_set_verify(ctx, mode)
    if resumption:  # sessions of verified connections are resumed (tls/sessions.py)
        ctx._httpsdump_sessions = SessionCache()
        ctx._httpsdump_sessions.install(ctx)
    else:
        m2.ssl_ctx_set_session_cache_mode(ctx.ctx, 0)  # no client sessions: each connection verifies in full
    if keylog is not None:
        openssl_ext.ctx_set_keylog(ctx, keylog)
    if client_cert is not None:
        if not os.path.isfile(client_cert):
            raise FileNotFoundError(client_cert)
        try:
            # An encrypted key would make M2Crypto prompt on the terminal: answer with no passphrase.
            ctx.load_cert_chain(client_cert, callback=lambda *a: b"")
        except SSL.SSLError as e:
            raise ValueError(f"{client_cert}: not a PEM certificate with its unencrypted private key ({e})") from None
    return ctx


def server_context(key, keylog=None) -> SSL.Context:  # key: EVP.PKey
    """The one client-facing context: it holds the leaf key that every minted certificate shares,
    and each connection is given its name's certificate (TLSEngine(cert=...), SSL_use_certificate).
    One context instead of one per name: creating an OpenSSL 3 SSL_CTX cost ~175 us per new name
    (as much as minting the certificate) and kept its own tables for every cached name."""
    ctx = _hardened()
    # Bound wrappers: the SWIG pointers do not keep their owners alive (notes §1.4.8).
    if m2.ssl_ctx_use_pkey_privkey(ctx.ctx, key.pkey) != 1:
        raise ValueError("cannot load the leaf key into a TLS context")
    ctx._httpsdump_leaf_key = key
    openssl_ext.set_num_tickets(ctx, _SERVER_TICKETS)
    openssl_ext.ctx_select_alpn(ctx, _ALPN_SERVER)
    if keylog is not None:
        openssl_ext.ctx_set_keylog(ctx, keylog)
    return ctx


def describe_names(leaf_der: bytes | None) -> str:
    """'a.test, b.test' from a certificate's SAN (or CN when it has none), for error messages."""
    if not leaf_der:
        return "unknown names"
    try:
        cert = X509.load_cert_der_string(leaf_der)
    except Exception:
        return "unknown names"
    try:
        san = cert.get_ext("subjectAltName").get_value()
        names = [s.split(":", 1)[-1].strip() for s in san.split(",") if s.strip()]
        return ", ".join(names) or "no names"
    except LookupError:
        cn = cert.get_subject().CN
        return f"CN={cn} (no subjectAltName)" if cn else "no names"


def upstream_failure(failure: TLSFailure, hostname: str, leaf_der: bytes | None) -> Exception:
    """Map an upstream handshake failure to CertificateError or UpstreamTLSError."""
    code = failure.verify_code
    if code:
        reason = CertReason.from_verify_code(code)
        if reason in (CertReason.HOSTNAME_MISMATCH, CertReason.IP_MISMATCH):
            detail = f"asked for {hostname}, certificate is for {describe_names(leaf_der)}"
        else:
            detail = f"for {hostname} (OpenSSL verify error {code}: {m2.x509_get_verify_error(code)})"
        return CertificateError(reason, code, detail)
    if failure.eof:
        return UpstreamTLSError(f"the origin closed the connection during the TLS handshake with {hostname}")
    return UpstreamTLSError(f"TLS handshake with {hostname} failed: {failure.reason}")


def client_failure(failure: TLSFailure, sni: str | None) -> ClientTLSError:
    who = sni or "the client"
    if failure.eof:
        return ClientTLSError(f"the client closed the connection during the TLS handshake for {who} "
                              "(does it trust the httpsdump CA?)")
    hint = ""
    if any(a in failure.reason for a in ("unknown ca", "bad certificate", "certificate unknown")):
        hint = " (the client does not trust the httpsdump CA: see 'httpsdump ca path' and the README)"
    return ClientTLSError(f"TLS handshake with the client for {who} failed: {failure.reason}{hint}")
