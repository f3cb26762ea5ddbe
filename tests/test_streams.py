"""proxy/streams.py's connections on both event loops the proxy runs on (asyncio's and uvloop)."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from proxy.streams import Conn, open_connection


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
