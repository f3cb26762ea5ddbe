"""The TLS engine against an in-memory peer (stdlib ssl over MemoryBIO): verification outcomes, SNI,
truncation, and one test per M2Crypto trap of ../shared/notes/m2crypto.md that could crash or
silently weaken TLS, showing the engine cannot reach it."""

from __future__ import annotations

import gc
import ssl
import subprocess

import pytest
from M2Crypto import EVP, X509, m2

from proxy.errors import CertificateError, CertReason, UpstreamTLSError
from proxy.tls import openssl_ext
from proxy.tls.contexts import describe_names, server_context, upstream_context, upstream_failure
from proxy.tls.engine import TLSEngine, TLSFailure


class Peer:
    """A stdlib ssl server over memory BIOs, serving one of the test PKI's leaves."""

    def __init__(self, leaf, record_sni: list | None = None, tls12: bool = False, client_order: bool = False):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(leaf.serve), str(leaf.key))
        if client_order:  # as nginx by default: the client's preference picks the cipher suite
            ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if record_sni is not None:
            ctx.sni_callback = lambda obj, name, c: record_sni.append(name)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)


def run_handshake(engine: TLSEngine, peer: Peer) -> None:
    for _ in range(20):
        done = engine.handshake()
        peer.inc.write(engine.outgoing())
        try:
            peer.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            pass
        engine.receive(peer.out.read())
        if done:
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture(scope="module")
def ctx(pki):
    return upstream_context((str(pki.root_pem),))


def test_good_handshake_and_data_both_ways(ctx, pki):
    peer = Peer(pki.leaves["good"])
    e = TLSEngine(ctx, server_side=False, hostname="good.test")
    run_handshake(e, peer)
    assert e.version in ("TLSv1.3", "TLSv1.2") and e.cipher and e.verify_code == 0
    e.write(b"ping")
    peer.inc.write(e.outgoing())
    assert peer.obj.read() == b"ping"
    peer.obj.write(b"pong")
    e.receive(peer.out.read())
    assert e.read() == b"pong"
    assert e.read() is None  # nothing more yet
    assert X509.load_cert_der_string(e.leaf_der).get_subject().CN == pki.leaves["good"].subject_cn
    e.free()


@pytest.mark.parametrize(
    "flavour,host,reason,code",
    [
        ("expired", "good.test", CertReason.EXPIRED, 10),
        ("notyet", "good.test", CertReason.NOT_YET_VALID, 9),
        ("wronghost", "good.test", CertReason.HOSTNAME_MISMATCH, 62),
        ("selfsigned", "good.test", CertReason.SELF_SIGNED, 18),
        ("unknownroot", "good.test", CertReason.UNKNOWN_ISSUER, 20),
        ("incomplete", "good.test", CertReason.UNKNOWN_ISSUER, 20),
        ("good", "127.0.0.2", CertReason.IP_MISMATCH, 64),
        ("wildcard", "a.b.wild.test", CertReason.HOSTNAME_MISMATCH, 62),
        ("wildcard", "wild.test", CertReason.HOSTNAME_MISMATCH, 62),
    ],
)
def test_verification_failures_carry_the_verify_code(ctx, pki, flavour, host, reason, code):
    e = TLSEngine(ctx, server_side=False, hostname=host)
    with pytest.raises(TLSFailure) as info:
        run_handshake(e, Peer(pki.leaves[flavour]))
    assert info.value.verify_code == code
    err = upstream_failure(info.value, host, e.leaf_der)
    assert isinstance(err, CertificateError) and err.reason is reason and err.verify_code == code
    if reason is CertReason.HOSTNAME_MISMATCH:
        assert f"asked for {host}" in err.message and "wild.test" in err.message or "other.test" in err.message
    e.free()


@pytest.mark.parametrize("flavour,host", [("chain", "good.test"), ("wildcard", "a.wild.test"), ("ip", "127.0.0.1"),
                                          ("good", "GOOD.TEST."), ("good", "127.0.0.1")])
def test_verification_successes(ctx, pki, flavour, host):
    e = TLSEngine(ctx, server_side=False, hostname=host)
    run_handshake(e, Peer(pki.leaves[flavour]))
    assert e.verify_code == 0
    e.free()


def test_sni_is_sent_for_names_and_never_for_ip_literals(ctx, pki):
    seen: list = []
    run_handshake(TLSEngine(ctx, server_side=False, hostname="good.test"), Peer(pki.leaves["good"], seen))
    run_handshake(TLSEngine(ctx, server_side=False, hostname="127.0.0.1"), Peer(pki.leaves["good"], seen))
    assert seen == ["good.test", None]  # RFC 6066 §3: no IP literals in SNI


def test_empty_hostname_is_refused_because_it_disables_the_check(ctx):
    # notes §1.4.6: set1_host("") silently turns hostname verification off.
    for bad in ("", None):
        with pytest.raises(ValueError):
            TLSEngine(ctx, server_side=False, hostname=bad)


def test_truncation_is_an_error_not_a_clean_eof(ctx, pki):
    # The hardened context does not set SSL_OP_IGNORE_UNEXPECTED_EOF (notes §1.3).
    peer = Peer(pki.leaves["good"])
    e = TLSEngine(ctx, server_side=False, hostname="good.test")
    run_handshake(e, peer)
    e.receive_eof()  # TCP FIN without close_notify
    with pytest.raises(TLSFailure, match="unexpected eof"):
        e.read()
    e.free()


def test_close_notify_is_a_clean_eof(ctx, pki):
    peer = Peer(pki.leaves["good"])
    e = TLSEngine(ctx, server_side=False, hostname="good.test")
    run_handshake(e, peer)
    try:
        peer.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    e.receive(peer.out.read())
    assert e.read() == b""
    e.free()


def test_tls_1_1_and_older_are_refused(ctx, pki):
    m2ctx = upstream_context((str(pki.root_pem),))
    # Our floor is TLS 1.2: a TLS 1.2 peer works...
    e = TLSEngine(m2ctx, server_side=False, hostname="good.test")
    run_handshake(e, Peer(pki.leaves["good"], tls12=True))
    assert e.version == "TLSv1.2"
    e.free()
    # ...and the context's minimum version refuses anything below it.
    assert openssl_ext._lib.SSL_CTX_ctrl(int(m2ctx.ctx), 130, 0, None) == openssl_ext.TLS1_2_VERSION  # GET_MIN


def test_hardened_context_keeps_extended_master_secret(pki, tmp_path):
    """M2's default options disable EMS on OpenSSL 3 (notes §1.3); ours must not."""
    ctx = upstream_context()  # bound: a temporary Context frees its SSL_CTX at once (notes §1.4.8)
    options = openssl_ext.ctx_get_options(ctx)
    assert options & 0x1 == 0, "SSL_OP_NO_EXTENDED_MASTER_SECRET must be clear"
    assert options & (1 << 7) == 0, "SSL_OP_IGNORE_UNEXPECTED_EOF must be clear"
    assert options & m2.SSL_OP_NO_TLSv1_1 and options & m2.SSL_OP_NO_TLSv1


def test_verify_mode_is_peer_unless_insecure(pki):
    strict, lax = upstream_context(), upstream_context(insecure=True)
    assert m2.ssl_ctx_get_verify_mode(strict.ctx) == 1
    assert m2.ssl_ctx_get_verify_mode(lax.ctx) == 0


def test_insecure_context_completes_but_records_the_failure(pki):
    lax = upstream_context((str(pki.root_pem),), insecure=True)
    e = TLSEngine(lax, server_side=False, hostname="good.test")
    run_handshake(e, Peer(pki.leaves["expired"]))
    assert e.verify_code == 10  # still measured and logged
    e.free()


def test_server_mode_with_in_memory_leaf_and_alpn(pki):
    leaf = pki.leaves["good"]
    sctx = server_context(EVP.load_key(str(leaf.key)))
    gc.collect()  # the ALPN callback is pinned on the context (notes §4: a collected callback is a SIGSEGV)
    cert = X509.load_cert(str(leaf.cert))
    e = TLSEngine(sctx, server_side=True, cert=cert)
    del sctx, cert
    gc.collect()  # the engine keeps its context alive, OpenSSL the certificate
    cctx = ssl.create_default_context(cafile=str(pki.root_pem))
    cctx.set_alpn_protocols(["h2", "http/1.1"])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cctx.wrap_bio(inc, out, server_hostname="good.test")
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        e.receive(out.read())
        e.handshake()
        inc.write(e.outgoing())
    assert client.selected_alpn_protocol() == "http/1.1"
    e.receive(out.read())
    assert e.handshake()
    assert e.alpn == "http/1.1"
    e.free()


def test_upstream_offers_aes_128_gcm_first_like_browsers(ctx, pki):
    peer = Peer(pki.leaves["good"], client_order=True)
    e = TLSEngine(ctx, server_side=False, hostname="good.test")
    run_handshake(e, peer)
    assert (e.version, e.cipher) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    e.free()


def test_server_engine_refuses_a_certificate_that_does_not_match_the_key(pki):
    sctx = server_context(EVP.load_key(str(pki.leaves["good"].key)))
    with pytest.raises(ValueError, match="does not match"):
        TLSEngine(sctx, server_side=True, cert=X509.load_cert(str(pki.leaves["wildcard"].cert)))
    assert openssl_ext.ssl_verify_result  # the module is still usable: no stale error left behind
    assert m2.err_get_error() == 0


def test_server_context_sends_one_session_ticket(pki):
    """Our own client (which keeps every ticket it gets) against a client-facing context."""
    leaf = pki.leaves["good"]
    server = TLSEngine(server_context(EVP.load_key(str(leaf.key))), server_side=True,
                       cert=X509.load_cert(str(leaf.cert)))
    cctx = upstream_context((str(pki.root_pem),))
    client = TLSEngine(cctx, server_side=False, hostname="good.test", sessions=cctx._httpsdump_sessions,
                       session_key=("good.test", 443, True, ()))
    for _ in range(10):
        client.handshake()
        server.receive(client.outgoing())
        server.handshake()
        client.receive(server.outgoing())
    client.write(b"x")  # the tickets follow the server's Finished; reading processes them
    server.receive(client.outgoing())
    assert server.read() == b"x"
    assert client.read() is None
    assert client.version == "TLSv1.3" and cctx._httpsdump_sessions.stored == 1
    client.free()
    server.free()


def test_freed_engine_cannot_touch_its_bios(ctx, pki):
    """notes §1.4.2: a BIO used after SSL_free is a SIGSEGV. After free() every call is inert or a
    clean TLSFailure; free() is idempotent (no double free)."""
    e = TLSEngine(ctx, server_side=False, hostname="good.test")
    e.handshake()
    e.free()
    e.free()
    assert e.outgoing() == b""
    e.receive(b"\x16\x03\x03")
    e.receive_eof()
    for op in (e.handshake, e.read, lambda: e.write(b"x")):
        with pytest.raises(TLSFailure):
            op()
    assert not hasattr(e, "set_bio") and not hasattr(e, "get_session")  # §1.4.2 second set_bio, §1.4.7


def test_abandoned_half_open_engine_leaves_no_stale_openssl_error(ctx):
    """notes §1.4.3: a half-open SSL collected by the GC must not poison the error queue."""
    e = TLSEngine(ctx, server_side=False, hostname="good.test")
    e.handshake()
    del e
    gc.collect()
    assert m2.err_peek_error() == 0


def test_describe_names_cn_only(pki):
    der = subprocess.run(["openssl", "x509", "-in", str(pki.leaves["cnonly"].cert), "-outform", "DER"],
                         capture_output=True, check=True).stdout
    assert "no subjectAltName" in describe_names(der)
    assert describe_names(None) == "unknown names"


def test_peer_closing_during_handshake_is_an_upstream_tls_error(ctx):
    e = TLSEngine(ctx, server_side=False, hostname="good.test")
    e.handshake()
    e.receive_eof()
    with pytest.raises(TLSFailure) as info:
        e.handshake()
    err = upstream_failure(info.value, "good.test", None)
    assert isinstance(err, UpstreamTLSError) and "closed" in err.message
    e.free()
