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
import threading

from helpers import connect_to

BODY = b"close-delimited body, then close_notify in the same segment\n"


class CloseNotifyOrigin:
    def __init__(self, leaf):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(leaf.serve), str(leaf.key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.served = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.ctx.wrap_bio(incoming, outgoing, server_side=True)
        try:
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
            self.served += 1
            while conn.recv(65536):  # keep TCP open until the proxy closes
                pass
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_close_delimited_response_ending_with_close_notify_in_the_same_read(proxy, pki, token):
    origin = CloseNotifyOrigin(pki["good"])
    try:
        r = proxy.curl("-w", "\n%{http_code}", *connect_to("good.test", origin.port),
                       f"https://good.test/x?t={token}", timeout=15)
        assert r.rc == 0 and r.out == BODY + b"\n200", str(r)
        f = proxy.flow()
        assert f["error"] is None and f["response"]["body"]["size"] == len(BODY)
    finally:
        origin.close()
