"""End to end: a TLS handshake that stalls on either side is bounded by `handshake_timeout`. The client
that stops half-way is dropped and logged; an origin that never answers its ClientHello gives 504."""

from __future__ import annotations

import socket
import ssl
import threading
import time

from helpers import https


def _config(tmp_path, text: str):
    cfg = tmp_path / "timeouts.toml"
    cfg.write_text(text)
    return cfg


def test_a_client_that_stalls_in_its_tls_handshake_is_dropped_and_logged(start_proxy, tmp_path, origins):
    p = start_proxy("--config", str(_config(tmp_path, "handshake_timeout = 1\n")))
    good = origins["good"]
    s = socket.create_connection(("127.0.0.1", p.port), timeout=15)
    s.sendall(f"CONNECT 127.0.0.1:{good.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    # A real ClientHello, then silence: the client never sends its Finished.
    tls = ssl.create_default_context(cafile=str(p.ca_pem)).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                                     server_hostname="good.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    s.sendall(out.read())
    t0 = time.monotonic()
    got = b""
    while True:  # the proxy's flight (ServerHello ... Finished), then its close
        data = s.recv(65536)
        if not data:
            break
        got += data
    waited = time.monotonic() - t0
    s.close()
    assert got[:1] == b"\x16", "the proxy answered the ClientHello"
    assert 0.8 <= waited < 8, f"dropped after {waited:.1f} s, handshake_timeout is 1 s"
    err = p.flow()["error"]
    assert err["kind"] == "client_timeout" and "did not complete in time" in err["message"], err


class _SilentTLSOrigin:
    """Accepts TCP, reads the ClientHello and never answers (a TLS server that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_an_origin_that_never_answers_the_tls_handshake_gives_504(start_proxy, tmp_path):
    p = start_proxy("--config", str(_config(tmp_path, "handshake_timeout = 1\n")))
    origin = _SilentTLSOrigin()
    try:
        t0 = time.monotonic()
        r = p.curl("-s", "-w", "\n%{http_code}", *https("good.test", origin, "/hello"))
        waited = time.monotonic() - t0
        assert origin.accepted.is_set()
        body, _, code = r.out.rpartition(b"\n")
        assert code == b"504", str(r)
        assert b"TLS handshake with good.test timed out after 1 s" in body, body
        assert waited < 10, waited
        err = p.flow()["error"]
        assert err["kind"] == "upstream_timeout" and err["status"] == 504, err
    finally:
        origin.close()
