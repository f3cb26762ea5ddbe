"""Regression: an origin whose last response bytes and close_notify arrive in ONE read, and which then
keeps TCP open waiting for our close_notify (as `openssl s_server -WWW` does; the Docker smoke test
found it). When TLSStream.recv() began handing over every buffered record at once, it consumed the
close_notify with the data and then waited on the network for an end it had already seen: the
close-delimited response never ended and the client timed out.

The origin here is made deterministic: it encrypts the response and its close_notify into memory
(ssl.SSLObject) and sends both with one sendall(), then waits for the proxy to close.
"""

from __future__ import annotations

import socket
import ssl

from helpers import connect_to
from test_e2e_relay import ScriptedOrigin

BODY = b"close-delimited body, then close_notify in the same segment\n"


def serve_with_close_notify(ctx: ssl.SSLContext, conn: socket.socket) -> None:
    """One connection: TLS over memory BIOs, so the response and close_notify leave in one send."""
    conn.settimeout(20)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
    while True:  # handshake
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            conn.sendall(outgoing.read())
            data = conn.recv(65536)
            if not data:
                return
            incoming.write(data)
    conn.sendall(outgoing.read())
    request = b""
    while b"\r\n\r\n" not in request:
        try:
            request += tls.read(65536)
        except ssl.SSLWantReadError:
            data = conn.recv(65536)
            if not data:
                return
            incoming.write(data)
            conn.sendall(outgoing.read())  # session tickets and the like
    tls.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + BODY)
    try:
        tls.unwrap()  # queues close_notify; ours was not received yet
    except ssl.SSLWantReadError:
        pass
    conn.sendall(outgoing.read())  # the body and close_notify in one write
    while conn.recv(65536):  # keep TCP open until the proxy closes
        pass


def test_close_delimited_response_ending_with_close_notify_in_the_same_read(proxy, pki, token):
    origin = ScriptedOrigin(pki, lambda conn: serve_with_close_notify(origin.ctx, conn), tls=False)
    try:
        r = proxy.curl("-w", "\n%{http_code}", *connect_to("good.test", origin.port),
                       f"https://good.test/x?t={token}", timeout=15)
        assert r.rc == 0 and r.out == BODY + b"\n200", str(r)
        f = proxy.flow()
        assert f["error"] is None and f["response"]["body"]["size"] == len(BODY)
    finally:
        origin.close()
