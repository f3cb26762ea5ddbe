"""Byte streams the relay talks to: plain TCP, or TLS over the sans-IO engine. (asyncio shell)

`Conn` is a lean asyncio Protocol: received chunks are handed to the one coroutine that reads, as the
same bytes objects (no copying through a StreamReader buffer), and writes honour the transport's flow
control (`drain`). It replaced asyncio streams, whose per-read futures and buffer copies were a
visible part of the per-request cost (ka_c50 profile; see bench/), and it is what uvloop runs fastest.

`PlainStream` and `TLSStream` offer the same coroutines, so the HTTP relay does not care which side is
encrypted: `recv()` → bytes (b"" at end of stream), `send(data)` (with backpressure), `send_eof()`,
`close()`. Failures of an established stream surface as the stream's own `error` class (a ProxyError
naming the side: ClientError for the browser's connection, UpstreamProtocolError for the origin's),
so the relay never has to guess which side an OSError came from. `TLSStream` moves ciphertext between
the socket and `TLSEngine` and flushes the engine's output after every operation (design.md
principle 2).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from .errors import ClientError, ProxyError
from .tls.engine import TLSEngine, TLSFailure

__all__ = ["Conn", "PlainStream", "TLSStream", "open_connection", "bytes_relayed"]

_SENT = [0]  # plaintext bytes handed to any stream's send(): the live status line's "relayed"


def bytes_relayed() -> int:
    return _SENT[0]


_HIGH_WATER = 1 << 18  # pause reading from the socket beyond this many unread bytes
_BATCH = 1 << 18  # plaintext handed to the relay per TLSStream.recv() at most (many records)
_LOW_WATER = 1 << 16


class Conn(asyncio.Protocol):
    """One TCP connection: read chunk by chunk, write with flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._deadline: float | None = None  # loop time by which the read in progress must get data
        self._timer: asyncio.TimerHandle | None = None  # the connection's one read timer (see _bound)
        self._timer_at = 0.0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop this connection runs on (kept: asyncio.get_running_loop() is a system call)."""
        return self._loop

    def peer_host(self) -> str | None:
        """The address this connection is connected to (its IP, without the port), if known."""
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return peer[0] if isinstance(peer, tuple) and peer else None

    # --- protocol callbacks ---------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        # Kept: asyncio.get_running_loop() is a getpid() system call on every use (Python 3.11's fork
        # check), and asyncio.timeout() makes several; per request they showed in the profile.
        self._loop = asyncio.get_running_loop()
        # TCP_NODELAY: both asyncio's and uvloop's TCP transports set it themselves (checked on both
        # sides of a connection); setting it again cost a socket object and a system call per connection.

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > _HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep the transport open: we may still write (half-close)

    def connection_lost(self, exc) -> None:
        self._eof = self._lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # --- for the streams ----------------------------------------------------------------------
    async def read(self, timeout: float | None = None) -> bytes:
        """The next received bytes, or b"" at end of stream. TimeoutError when nothing arrived within
        `timeout` seconds (see _bound: cheaper than asyncio.timeout() around the call)."""
        if not self._chunks:
            if self._eof:
                return b""
            waiter = self._waiter = self._loop.create_future()
            if timeout is not None:
                self._bound(self._loop.time() + timeout)
            try:
                await waiter
            finally:
                self._waiter = None
                self._deadline = None
            if not self._chunks:
                return b""
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._reading_paused and not self._lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def _bound(self, deadline: float) -> None:
        """Fail the read in progress with TimeoutError if no data came by `deadline` (loop time). One
        timer per connection, left armed when a read ends and moved on only when it fires: uvloop's
        call_later() and cancel() cost ~2 us, once per request before (keep-alive reads each start a
        new idle deadline; the timer then fires once per idle timeout and finds the read still young)."""
        self._deadline = deadline
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline, waiter = self._deadline, self._waiter
        if deadline is None or waiter is None:
            return  # no read is waiting: the next one arms the timer again
        if self._loop.time() >= deadline:
            _expire(waiter)
        else:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def write(self, data: bytes) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        self.transport.write(data)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait while the transport has paused writing; TimeoutError after `timeout` seconds."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._writing_paused:
            waiter = self._drain_waiter = self._loop.create_future()
            timer = None if timeout is None else self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                self._drain_waiter = None
                if timer is not None:
                    timer.cancel()
            if self._lost:
                raise ConnectionResetError("connection lost")

    def write_eof(self) -> None:
        t = self.transport
        if t is not None and not self._lost and t.can_write_eof() and not t.is_closing():
            t.write_eof()

    def is_closing(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()

    def get_extra_info(self, name: str, default=None):
        return self.transport.get_extra_info(name, default) if self.transport is not None else default

    def abort(self) -> None:
        """Drop the connection now, without waiting (for error and cancellation paths)."""
        if self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        t = self.transport
        if t is None:
            return
        with contextlib.suppress(Exception):
            t.close()
        if not self._lost:
            waiter = self._drain_waiter = self._loop.create_future()
            timer = self._loop.call_later(2.0, _expire, waiter)  # as in read(): no asyncio.timeout()
            try:
                await waiter  # connection_lost: the kernel has the socket back
            except TimeoutError:
                t.abort()
            except BaseException:
                t.abort()  # cancelled while closing: never leave the socket behind
                raise
            finally:
                timer.cancel()
                self._drain_waiter = None


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def open_connection(host: str, port: int) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Conn, host, port)
    return conn


class PlainStream:
    __slots__ = ("conn", "_pending", "error", "bytes_in", "bytes_out")

    def __init__(self, conn: Conn, initial: bytes = b"", error: type[ProxyError] = ClientError) -> None:
        self.error = error
        self.conn = conn
        self._pending = initial
        self.bytes_in = 0
        self.bytes_out = 0

    async def recv(self, timeout: float | None = None) -> bytes:
        """Next bytes (b"" at the end); TimeoutError after `timeout` seconds without any."""
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        data = await self.conn.read(timeout)
        self.bytes_in += len(data)
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the stream (used after peeking at a ClientHello)."""
        self._pending = data + self._pending

    async def send(self, data: bytes, last: bool = False) -> None:
        """`last` (nothing follows) changes nothing here: close() ends the connection."""
        if data:
            self.bytes_out += len(data)
            _SENT[0] += len(data)
            conn = self.conn
            try:
                conn.write(data)
                if conn._writing_paused or conn._lost:  # else drain() would return at once: no coroutine
                    await conn.drain()
            except (ConnectionError, OSError, RuntimeError) as e:
                raise self.error(_lost(e)) from None

    def at_eof(self) -> bool:
        return not self._pending and self.conn.at_eof()

    async def send_eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.conn.write_eof()

    async def close(self) -> None:
        await self.conn.close()


class TLSStream:
    __slots__ = ("conn", "engine", "truncated", "_eof", "_closed_by_peer", "_failure", "error", "bytes_in", "bytes_out")

    def __init__(self, conn: Conn, engine: TLSEngine, error: type[ProxyError] = ClientError) -> None:
        self.error = error
        self.conn = conn
        self.engine = engine
        self.truncated = False  # the peer closed TCP without close_notify (RFC 8446 §6.1)
        self._eof = False
        self._closed_by_peer = False  # close_notify seen by _more(): the next recv() reports the end
        self._failure: TLSFailure | None = None  # an error met by _more(): the next recv() reports it
        self.bytes_in = 0
        self.bytes_out = 0

    def flush(self) -> None:
        """Write out what the engine has for the peer."""
        out = self.engine.outgoing()
        if out and not self.conn.is_closing():
            self.conn.transport.write(out)

    async def _fill(self, timeout: float | None = None) -> None:
        data = await self.conn.read(timeout)
        if data:
            self.engine.receive(data)
        else:
            self._eof = True
            self.engine.receive_eof()

    async def handshake(self, initial: bytes = b"", timeout: float | None = None) -> None:
        """Complete the handshake. Raises TLSFailure, or TimeoutError when it takes more than `timeout`
        seconds: every wait for the peer is bounded by what is left (loop timers, where asyncio.timeout()
        around the call cost ~10 us on Python 3.11, and a proxied connection had three of them)."""
        loop = self.conn.loop
        deadline = None if timeout is None else loop.time() + timeout
        self.engine.receive(initial)
        engine = self.engine
        while True:
            done = engine.handshake()
            if not done:
                self.flush()
            # else: what ends the handshake (a server's TLS 1.3 session tickets or TLS 1.2 Finished, a
            # client's Finished) waits in the engine for the stream's next write, or for recv() to
            # need the peer: it goes out in the first response's or request's write instead of one of
            # its own. A caller that will not write at once calls flush().
            left = None if deadline is None else deadline - loop.time()
            if done:
                if left is None or left > 0:
                    with contextlib.suppress(ConnectionError):
                        await self.conn.drain(left)
                return
            if left is not None and left <= 0:
                raise TimeoutError()
            if self._eof:
                raise TLSFailure("connection closed during the TLS handshake", self.engine.verify_code, eof=True)
            await self._fill(left)

    async def recv(self, timeout: float | None = None) -> bytes:
        """Next plaintext (b"" at the end); TimeoutError when no bytes at all arrived for `timeout`
        seconds (each wait for the network is bounded: a record trickling in keeps it alive)."""
        engine = self.engine
        if self._closed_by_peer:
            return b""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            if self._eof:  # TCP closed without close_notify: end of stream, but remember it
                self.truncated = True
                return b""
            raise self.error(f"TLS error: {failure.reason}")
        while True:
            if engine.has_input():
                try:
                    data = engine.read()
                except TLSFailure as e:
                    self.flush()  # the alert
                    if self._eof:  # TCP closed without close_notify: end of stream, but remember it
                        self.truncated = True
                        return b""
                    raise self.error(f"TLS error: {e.reason}") from None
                # A read's own output (a KeyUpdate's answer) waits for the next write or wait, as
                # what handshake() held back does
                if data is not None:
                    if data and engine.has_input():
                        data = self._more(data)
                    if data:
                        self.bytes_in += len(data)
                    return data
            if self._eof:
                self.truncated = True
                return b""
            self.flush()  # nothing is held back while we wait for the peer (handshake(), _more())
            # _fill() written out: one coroutine less on every wait for the peer (twice per request)
            data = await self.conn.read(timeout)
            if data:
                engine.receive(data)
            else:
                self._eof = True
                engine.receive_eof()

    def _more(self, first: bytes) -> bytes:
        """The records already received after `first`, decrypted now: one SSL_read returns one record
        (16 KiB at most), so a large download would otherwise take a trip through the relay per
        record. Stops at what is buffered (never waits), at _BATCH bytes, at close_notify or at an
        error; the next recv() then reports the end or the error (the data before it goes first)."""
        engine = self.engine
        parts = [first]
        size = len(first)
        while size < _BATCH and engine.has_input():
            try:
                data = engine.read()
            except TLSFailure as e:
                self._failure = e
                break
            if data is None:  # a partial record: the rest comes from the network
                break
            if not data:  # close_notify: this data is the last; the next recv() says so at once (the
                self._closed_by_peer = True  # peer may keep TCP open waiting for ours)
                break
            parts.append(data)
            size += len(data)
        if self._failure is not None:
            self.flush()  # the alert
        return b"".join(parts)

    async def send(self, data: bytes, last: bool = False) -> None:
        """`last`: nothing follows on this connection; the close_notify goes in the same write."""
        if data:
            self.bytes_out += len(data)
            _SENT[0] += len(data)
            try:
                self.engine.write(data)
                if last:
                    self.engine.shutdown()
                self.flush()
                conn = self.conn
                if conn._writing_paused or conn._lost:  # else drain() would return at once: no coroutine
                    await conn.drain()
            except TLSFailure as e:
                raise self.error(f"TLS error: {e.reason}") from None
            except (ConnectionError, OSError, RuntimeError) as e:
                raise self.error(_lost(e)) from None

    def at_eof(self) -> bool:
        return self._eof or self.conn.at_eof()

    async def send_eof(self) -> None:
        self.engine.shutdown()
        self.flush()
        with contextlib.suppress(OSError, RuntimeError, ConnectionError):
            await self.conn.drain()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.conn.is_closing():
                self.engine.shutdown()
                self.flush()
        await self.conn.close()
        self.engine.free()


def _lost(e: BaseException) -> str:
    return f"connection lost ({getattr(e, 'strerror', None) or type(e).__name__})"
