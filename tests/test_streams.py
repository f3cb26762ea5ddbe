"""proxy/streams.py: its connections on both event loops the proxy runs on (asyncio's and uvloop), and
when a TLS stream writes."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

import pytest
import uvloop
from M2Crypto import EVP, X509

from proxy import upstream as upstream_mod
from proxy.relay import RelayPolicy
from proxy.streams import Conn, TLSStream, open_connection
from proxy.tls.contexts import server_context, upstream_context
from proxy.tls.engine import TLSEngine


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_both_ends_of_a_connection_have_nodelay(new_loop):
    """Small writes (a response head, a TLS record) go out at once: the proxy relies on the loop's
    transports setting TCP_NODELAY on accepted and on opened connections, and sets nothing itself."""

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()

        class Server(Conn):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                if not accepted.done():
                    accepted.set_result(self)

        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = await open_connection("127.0.0.1", port)
        srv = await accepted
        opts = tuple(c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                     for c in (client, srv))
        client.transport.close()
        srv.transport.close()
        server.close()
        await server.wait_closed()
        return opts

    loop = new_loop()
    try:
        assert loop.run_until_complete(main()) == (1, 1)
    finally:
        loop.close()


@pytest.mark.parametrize("version", ["TLSv1_3", "TLSv1_2"])
def test_a_server_stream_sends_what_ends_its_handshake_with_its_first_write_and_never_waits_on_it(pki, version):
    """Real TCP, a stdlib ssl client. TLS 1.3: the session ticket that ends the server's handshake
    leaves in the response's write, not in a write of its own (the client's Finished and request
    arrive together, as from curl or Go). TLS 1.2: the server's Finished ends its handshake and the
    client waits for it before it sends the request: recv() must send it before waiting. The last
    response (send(last=True)) carries the close_notify."""
    leaf = pki.leaves["good"]
    sctx = server_context(EVP.load_key(str(leaf.key)))
    cert = X509.load_cert(str(leaf.cert))
    cctx = ssl.create_default_context(cafile=str(pki.root_pem))
    cctx.maximum_version = getattr(ssl.TLSVersion, version)
    got: dict = {}

    def client(port: int) -> None:  # over memory BIOs, so that its last flight and request share one send()
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = cctx.wrap_bio(inc, out, server_hostname="good.test")
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.settimeout(10)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(out.read())
                    inc.write(raw.recv(65536))
            tls.write(b"ping")
            raw.sendall(out.read())
            reply = b""
            while not reply:
                try:
                    reply = tls.read(100)
                except ssl.SSLWantReadError:
                    inc.write(raw.recv(65536))
            got["reply"] = reply
            got["ticket"] = tls.session is not None and tls.session.has_ticket
            try:  # then the close_notify (sent with the reply: send(last=True)), read as b""
                got["after"] = tls.read(100)
            except ssl.SSLWantReadError:
                got["after"] = "nothing yet"

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future = loop.create_future()

        class Server(Conn):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                accepted.set_result(self)

        server = await loop.create_server(Server, "127.0.0.1", 0)
        thread = threading.Thread(target=client, args=(server.sockets[0].getsockname()[1],))
        thread.start()
        conn = await accepted
        writes: list[bytes] = []
        conn.transport = _Spied(conn.transport, writes)
        stream = TLSStream(conn, TLSEngine(sctx, server_side=True, cert=cert))
        await stream.handshake(timeout=10)
        data = b""
        while len(data) < 4:
            data += await stream.recv(10)
        assert data == b"ping"
        await stream.send(b"pong", last=True)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        await stream.close()
        server.close()
        return writes

    writes = uvloop.run(main())
    assert got["reply"] == b"pong" and got["after"] == b""
    if version == "TLSv1_3":
        assert got["ticket"]  # the client had it by the time it read the reply
        # the server's flight; then ticket, reply and close_notify in one write (close() adds none)
        assert len(writes) == 2 and _record_types(writes[1]) == [23, 23, 23]
    else:
        # the server's flight; its Finished, sent before recv() waited; the reply and close_notify
        assert len(writes) == 3 and _record_types(writes[2]) == [23, 21]


@pytest.mark.parametrize("request_ready", [True, False])
def test_an_upstream_sends_its_finished_with_the_request_only_when_one_is_waiting(pki, request_ready, monkeypatch):
    """Real TCP, a stdlib ssl origin (TLS 1.3). With a request waiting (the relay's case once it has
    read one), our Finished leaves in the request's write; without, open() sends it at once: the
    origin must never wait for it."""
    leaf = pki.leaves["good"]
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(leaf.serve), str(leaf.key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict = {}

    def origin() -> None:
        raw, _ = listener.accept()
        with sctx.wrap_socket(raw, server_side=True) as s:
            s.settimeout(10)
            seen["request"] = s.recv(100)
            s.sendall(b"ok")

    thread = threading.Thread(target=origin)
    thread.start()
    cctx = upstream_context((str(pki.root_pem),))
    writes: list[bytes] = []
    real_open = upstream_mod.open_tcp

    async def spied_open(*args, **kwargs):
        conn = await real_open(*args, **kwargs)
        conn.transport = _Spied(conn.transport, writes)
        return conn

    monkeypatch.setattr(upstream_mod, "open_tcp", spied_open)

    async def main() -> int:
        up = upstream_mod.Upstream("127.0.0.1", port, "good.test", sni=True, ctx_for=lambda name: cctx,
                                   policy=RelayPolicy(), clock=time.monotonic)
        up.request_ready = request_ready
        await up.open()
        after_open = len(writes)
        await up.stream.send(b"GET / HTTP/1.1\r\n\r\n")
        assert await up.stream.recv(10) == b"ok"
        await up.close()
        return after_open

    try:
        after_open = uvloop.run(main())
    finally:
        thread.join(10)
        listener.close()
    assert seen["request"] == b"GET / HTTP/1.1\r\n\r\n"
    if request_ready:  # ClientHello; change_cipher_spec, Finished and request in one write; close_notify
        assert after_open == 1 and len(writes) == 3
        assert _record_types(writes[1]) == [20, 23, 23]
    else:  # ClientHello; change_cipher_spec and Finished, sent by open(); the request; close_notify
        assert after_open == 2 and len(writes) == 4
        assert _record_types(writes[1]) == [20, 23]


def _record_types(data: bytes) -> list[int]:
    """The content types of the TLS records in `data` (20 change_cipher_spec, 21 alert, 23 encrypted)."""
    types = []
    while data:
        types.append(data[0])
        data = data[5 + int.from_bytes(data[3:5], "big"):]
    return types


class _Spied:
    """A real transport, each write recorded on its way through."""

    def __init__(self, real, writes: list) -> None:
        self.real, self.writes = real, writes

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)
