"""Byte streams the relay talks to: plain TCP, or TLS over the sans-IO engine. (asyncio shell)

Both offer the same four coroutines, so the HTTP relay does not care which side is encrypted:
`recv()` → bytes (b"" at end of stream), `send(data)` (with backpressure: `drain()`), `send_eof()`,
`close()`. Failures of an established stream surface as the stream's own `error` class (a ProxyError
naming the side: ClientError for the browser's connection, UpstreamProtocolError for the origin's),
so the relay never has to guess which side an OSError came from. `TLSStream` moves ciphertext between the socket and `TLSEngine` and flushes the engine's
output after every operation (design.md principle 2).
"""

from __future__ import annotations

import asyncio
import contextlib

from .errors import ClientError, ProxyError
from .tls.engine import TLSEngine, TLSFailure

__all__ = ["PlainStream", "TLSStream", "READ_SIZE"]

READ_SIZE = 65536


class PlainStream:
    __slots__ = ("reader", "writer", "_pending", "error", "bytes_in", "bytes_out")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, initial: bytes = b"",
                 error: type[ProxyError] = ClientError) -> None:
        self.error = error
        self.reader = reader
        self.writer = writer
        self._pending = initial
        self.bytes_in = 0
        self.bytes_out = 0

    async def recv(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        self.bytes_in += len(data)
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the stream (used after peeking at a ClientHello)."""
        self._pending = data + self._pending

    async def send(self, data: bytes) -> None:
        if data:
            self.bytes_out += len(data)
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError, RuntimeError) as e:
                raise self.error(_lost(e)) from None

    def at_eof(self) -> bool:
        return not self._pending and self.reader.at_eof()

    async def send_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof() and not self.writer.is_closing():
                self.writer.write_eof()

    async def close(self) -> None:
        await _close_writer(self.writer)


class TLSStream:
    __slots__ = ("reader", "writer", "engine", "truncated", "_eof", "error", "bytes_in", "bytes_out")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, engine: TLSEngine,
                 error: type[ProxyError] = ClientError) -> None:
        self.error = error
        self.reader = reader
        self.writer = writer
        self.engine = engine
        self.truncated = False  # the peer closed TCP without close_notify (RFC 8446 §6.1)
        self._eof = False
        self.bytes_in = 0
        self.bytes_out = 0

    def _flush(self) -> None:
        out = self.engine.outgoing()
        if out and not self.writer.is_closing():
            self.writer.write(out)

    async def _fill(self) -> None:
        try:
            data = await self.reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            data = b""
        if data:
            self.engine.receive(data)
        else:
            self._eof = True
            self.engine.receive_eof()

    async def handshake(self, initial: bytes = b"") -> None:
        """Complete the handshake (the caller bounds it with a timeout). Raises TLSFailure."""
        self.engine.receive(initial)
        while True:
            done = self.engine.handshake()
            self._flush()
            if done:
                await self.writer.drain()
                return
            if self._eof:
                raise TLSFailure("connection closed during the TLS handshake", self.engine.verify_code, eof=True)
            await self.writer.drain()
            await self._fill()

    async def recv(self) -> bytes:
        while True:
            try:
                data = self.engine.read()
            except TLSFailure as e:
                if self._eof:  # TCP closed without close_notify: end of stream, but remember it
                    self.truncated = True
                    return b""
                raise self.error(f"TLS error: {e.reason}") from None
            finally:
                self._flush()  # reads can produce output (alerts, key updates)
            if data is not None:
                if data:
                    self.bytes_in += len(data)
                return data
            if self._eof:
                self.truncated = True
                return b""
            await self._fill()

    async def send(self, data: bytes) -> None:
        if data:
            self.bytes_out += len(data)
            try:
                self.engine.write(data)
                self._flush()
                await self.writer.drain()
            except TLSFailure as e:
                raise self.error(f"TLS error: {e.reason}") from None
            except (ConnectionError, OSError, RuntimeError) as e:
                raise self.error(_lost(e)) from None

    def at_eof(self) -> bool:
        return self._eof or self.reader.at_eof()

    async def send_eof(self) -> None:
        self.engine.shutdown()
        self._flush()
        with contextlib.suppress(OSError, RuntimeError, ConnectionError):
            await self.writer.drain()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.engine.shutdown()
                self._flush()
        await _close_writer(self.writer)
        self.engine.free()


def _lost(e: BaseException) -> str:
    return f"connection lost ({getattr(e, 'strerror', None) or type(e).__name__})"


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 2.0)
