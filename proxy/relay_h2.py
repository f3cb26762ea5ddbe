"""The asyncio shell around http2.H2Bridge: one task reads the client, one reads each origin
connection, all feed the bridge and write what it queued. (asyncio shell)

Writes to one connection are serialised by a lock that is held from taking the bridge's bytes until
they are drained, so frames leave in the order h2 produced them and a side that reads slowly holds
back the task that feeds it (TCP backpressure on top of HTTP/2 flow control). When the origin retires
its connection (GOAWAY) and requests wait, the shell opens a new one with `open_origin` and the
bridge moves them there; a retired connection is closed once its last stream is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, Callable

from .errors import ProxyError
from .flow import Flow
from .http2 import H2Bridge

__all__ = ["relay_h2"]


class _Side:
    """One connection of the relay: its stream, write lock, and whether it failed."""

    __slots__ = ("stream", "lock", "take", "eof", "dead", "origin", "closer")

    def __init__(self, stream, take, eof, origin=None, closer=None) -> None:
        self.stream, self.take, self.eof = stream, take, eof
        self.lock = asyncio.Lock()
        self.dead = False
        self.origin = origin  # the bridge's _Origin (None for the client)
        self.closer = closer  # closes the origin connection once it is retired


async def relay_h2(client, up, *, new_flow: Callable[[int], Flow], emit: Callable[[Flow], None], policy,
                   clock, wall, host: str, port: int, started: Callable[[Flow], None] | None = None,
                   open_origin: Callable[[], Awaitable[tuple]] | None = None,
                   close_first: Callable[[], Awaitable[None]] | None = None) -> None:
    """`open_origin()` -> (stream, tls facts, close coroutine function) of a new h2 connection to the
    origin, or raises ProxyError. `close_first()` closes `up` (idempotent: its owner may close it
    again); without it, a retired first connection stays open until the client's connection ends."""
    loop = asyncio.get_running_loop()
    timers: dict[str, asyncio.TimerHandle] = {}

    def announce(flow: Flow) -> None:  # a response still streaming after a while is shown early
        if started is not None and policy.stream_announce > 0:
            timers[flow.id] = loop.call_later(policy.stream_announce, started, flow)

    def done(flow: Flow) -> None:
        handle = timers.pop(flow.id, None)
        if handle is not None:
            handle.cancel()
        emit(flow)

    bridge = H2Bridge(new_flow=new_flow, emit=done, clock=clock, wall=wall, host=host, port=port,
                      body_capture_limit=policy.body_capture_limit, max_header_list_size=policy.limits.max_head,
                      response_started=announce)
    bridge.start()
    first = bridge.origin
    client_side = _Side(client, bridge.to_client, bridge.client_eof)
    sides: list[_Side] = [client_side,
                          _Side(up, lambda o=first: bridge.to_server(o),
                                lambda why="the origin closed the connection", o=first: bridge.server_eof(why, o), first,
                                close_first)]
    tasks: set[asyncio.Task] = set()
    finished = asyncio.Event()
    failures: list[BaseException] = []
    opening = [False]

    def spawn(coro) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(on_done)

    def on_done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # a bug: the relay's caller logs it; the flows are kept below
            finished.set()

    async def flush() -> None:
        for _ in range(3):  # a failed side makes the bridge queue GOAWAY/RST for the others: go round again
            failed = False
            for side in list(sides):
                async with side.lock:
                    data = side.take()
                    if data and not side.dead:
                        try:
                            await side.stream.send(data)
                        except ProxyError as e:
                            side.dead = True
                            side.eof(e.message)
                            failed = True
            if not failed:
                break
        await housekeeping()

    async def housekeeping() -> None:
        if bridge.closed:
            finished.set()
            return
        for side in [s for s in sides if s.origin is not None and s.origin.retired]:
            sides.remove(side)  # its GOAWAY went out with the flush above
            side.dead = True
            if side.closer is not None:
                spawn(side.closer())
        if bridge.wants_origin and open_origin is not None and not opening[0]:
            opening[0] = True
            spawn(reconnect())

    async def reconnect() -> None:
        try:
            stream, tls, closer = await open_origin()
        except ProxyError as e:
            bridge.origin_failed(e)
        else:
            o = bridge.add_origin()
            o.tls = tls
            side = _Side(stream, lambda o=o: bridge.to_server(o),
                         lambda why="the origin closed the connection", o=o: bridge.server_eof(why, o), o, closer)
            sides.append(side)
            spawn(pump(side, lambda data, o=o: bridge.server_data(data, o)))
        finally:
            opening[0] = False
        await flush()

    async def pump(side: _Side, feed) -> None:
        timeout = policy.idle_timeout
        is_client = side is client_side
        while not bridge.closed and not side.dead and side in sides:
            try:
                if is_client and not bridge.idle:
                    data = await side.stream.recv()  # the client may think for as long as streams are open
                elif is_client or side.origin.by_sid:
                    data = await side.stream.recv(timeout)
                else:
                    data = await side.stream.recv()  # an origin connection with nothing in flight
            except TimeoutError:
                if is_client:
                    bridge.close_idle()
                else:
                    side.eof(f"the origin sent nothing for {timeout:g} s")
                await flush()
                return
            except ProxyError as e:
                side.dead = True
                side.eof(e.message)
                await flush()
                return
            if not data:
                side.dead = True
                side.eof()
                await flush()
                return
            feed(data)
            await flush()

    try:
        await flush()  # both prefaces
        spawn(pump(client_side, bridge.client_data))
        spawn(pump(sides[1], lambda data, o=first: bridge.server_data(data, o)))
        while not finished.is_set():
            await finished.wait()
            if failures:
                raise failures[0]
    finally:
        for t in list(tasks):
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        for side in sides:  # origin connections (the first one too when close_first was given)
            if side.closer is not None:
                with contextlib.suppress(BaseException):
                    await side.closer()
        for handle in timers.values():
            handle.cancel()
        bridge.abandon()  # anything still open (cancelled from outside) is recorded, not lost
