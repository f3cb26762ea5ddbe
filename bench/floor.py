"""The TLS floor of a proxied new connection on this machine: the CPU that OpenSSL's two handshakes
alone take, measured with the proxy's own TLS code and nothing else.

For every new proxied connection an intercepting proxy makes two handshakes: one as the server (the
client's, full: the load client does not resume) and one as the client (the origin's; httpsdump resumes
the origin's session, tls/sessions.py). This probe runs exactly those with the proxy's contexts and
TLSEngine (proxy/tls: the client-facing context with a certificate minted by the bench's httpsdump CA,
the verifying upstream context with its session cache) against in-process peers, over memory BIOs: no
sockets, no event loop, no HTTP, no log. Only the proxy side's handshake() calls and the reads that take
in the origin's session tickets are timed (the peers' work is not counted), with the thread's CPU
clock. The sum is what OpenSSL (through M2Crypto) needs per new connection on this machine, whatever
the proxy around it does: the newconn CPU goal can only be met if it leaves room above this.

  python bench/floor.py CONFDIR PKI_DIR [--batches N] [--per-batch M]   (prints one JSON object)
Run from a checkout (or with PYTHONPATH) whose proxy/ and ca/ are to be measured; bench/run.py runs it
once per round on the proxy's CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from M2Crypto import EVP, SSL, X509, m2

from ca import authority
from ca.mint import mint, new_leaf_key, random_serial
from proxy.tls import contexts
from proxy.tls.engine import TLSEngine

NAME = "floor.bench.test"  # covered by the origin's *.bench.test certificate
_cpu = time.thread_time_ns


def _run(engine: TLSEngine, measured: TLSEngine, op) -> int:
    """op(engine); the ns of CPU it took if `engine` is the measured side, else 0."""
    if engine is not measured:
        op(engine)
        return 0
    t = _cpu()
    op(engine)
    return _cpu() - t


def _pump(client: TLSEngine, server: TLSEngine, measured: TLSEngine) -> int:
    """Run the handshake to its end (and the client's read of the server's tickets); the ns of CPU
    that `measured`'s calls took."""
    spent = 0
    for _ in range(16):
        for engine, peer in ((client, server), (server, client)):
            spent += _run(engine, measured, TLSEngine.handshake)
            out = engine.outgoing()
            if out:
                peer.receive(out)
        if client.handshake_done and server.handshake_done:
            break
    else:
        raise RuntimeError("the handshake did not finish")
    # TLS 1.3 tickets come with the server's last handshake step (already passed on): the client
    # takes them in on its first read.
    return spent + _run(client, measured, TLSEngine.read)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("confdir", type=Path, help="httpsdump's config directory (its CA mints the leaf)")
    ap.add_argument("pki", type=Path, help="the bench PKI: ca.pem, origin.pem, origin-key.pem")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--per-batch", type=int, default=60)
    a = ap.parse_args()

    ca = authority.load_or_create(a.confdir)
    leaf_key = new_leaf_key()
    leaf = mint(ca, leaf_key, NAME, time.time(), random_serial())
    proxy_server_ctx = contexts.server_context(leaf_key)
    proxy_upstream_ctx = contexts.upstream_context((str(a.pki / "ca.pem"),))
    fresh_upstream_ctx = contexts.upstream_context((str(a.pki / "ca.pem"),), resumption=False)
    sessions = proxy_upstream_ctx._httpsdump_sessions

    # The peers: a client that verifies the proxy's leaf as a browser would, and an origin like the
    # bench's nginx (same certificate and key, OpenSSL's defaults: TLS 1.3, two tickets).
    browser_ctx = contexts.upstream_context((str(ca.confdir / authority.CA_CERT),), resumption=False)
    origin_ctx = SSL.Context("tls", weak_crypto=1)  # no option bits of M2Crypto's own (notes §1.3)
    origin_cert = X509.load_cert(str(a.pki / "origin.pem"))
    origin_key = EVP.load_key(str(a.pki / "origin-key.pem"))
    if m2.ssl_ctx_use_x509(origin_ctx.ctx, origin_cert.x509) != 1 or \
            m2.ssl_ctx_use_pkey_privkey(origin_ctx.ctx, origin_key.pkey) != 1:
        raise RuntimeError("cannot load the origin's certificate and key")
    alpn = ("http/1.1",)

    def client_facing() -> int:
        browser = TLSEngine(browser_ctx, server_side=False, hostname=NAME, alpn=alpn)
        proxy = TLSEngine(proxy_server_ctx, server_side=True, cert=leaf)
        try:
            spent = _pump(browser, proxy, proxy)
            if browser.verify_code != 0:
                raise RuntimeError(f"the browser side did not verify the minted leaf (code {browser.verify_code})")
            return spent
        finally:
            browser.free()
            proxy.free()

    def upstream(ctx) -> tuple[int, bool]:
        proxy = TLSEngine(ctx, server_side=False, hostname=NAME, alpn=alpn,
                          sessions=getattr(ctx, "_httpsdump_sessions", None), session_key=(NAME, 443, True, alpn))
        origin = TLSEngine(origin_ctx, server_side=True)
        try:
            spent = _pump(proxy, origin, proxy)
            if proxy.verify_code != 0:
                raise RuntimeError(f"the origin's certificate did not verify (code {proxy.verify_code})")
            return spent, proxy.session_reused
        finally:
            proxy.shutdown()  # as the proxy closes (untimed): OpenSSL marks the sessions of an SSL freed
            proxy.free()      # without close_notify not resumable
            origin.free()

    for _ in range(10):  # warm up: caches, the first session, lazily loaded providers
        client_facing()
        upstream(proxy_upstream_ctx)
        upstream(fresh_upstream_ctx)
    kinds = {"server_full": [], "client_resumed": [], "client_full": []}
    resumed = offered = 0
    for _ in range(a.batches):
        s = r = f = 0
        for _ in range(a.per_batch):
            s += client_facing()
            ns, reused = upstream(proxy_upstream_ctx)
            r += ns
            offered += 1
            resumed += reused
            f += upstream(fresh_upstream_ctx)[0]
        kinds["server_full"].append(s / a.per_batch / 1000)
        kinds["client_resumed"].append(r / a.per_batch / 1000)
        kinds["client_full"].append(f / a.per_batch / 1000)
    med = {k: statistics.median(v) for k, v in kinds.items()}
    print(json.dumps({
        "openssl": m2.OPENSSL_VERSION_TEXT,
        "server_full_us": round(med["server_full"], 1),
        "client_resumed_us": round(med["client_resumed"], 1),
        "client_full_us": round(med["client_full"], 1),
        # what a new proxied connection needs: the client's full handshake, the origin's resumed one
        "new_connection_us": round(med["server_full"] + med["client_resumed"], 1),
        "resumed_share": round(resumed / offered, 3),
        "batches": {k: [round(x, 1) for x in v] for k, v in kinds.items()},
        "sessions_offered": sessions.offered,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
