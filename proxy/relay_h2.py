"""The asyncio shell around http2.H2Bridge: one task reads the client, one reads the origin, both
feed the bridge and write what it queued. (asyncio shell)

Writes to one side are serialised by a lock that is held from taking the bridge's bytes until they
are drained, so frames leave in the order h2 produced them and a side that reads slowly holds back
the task that feeds it (TCP backpressure on top of HTTP/2 flow control).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from .errors import ProxyError
from .flow import Flow
from .http2 import H2Bridge

__all__ = ["relay_h2"]


async def relay_h2(client, up, *, new_flow: Callable[[int], Flow], emit: Callable[[Flow], None], policy,
                   clock, wall, host: str, port: int, started: Callable[[Flow], None] | None = None) -> None:
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
    sides = {"client": [client, asyncio.Lock(), bridge.to_client, bridge.client_eof, False],
             "server": [up, asyncio.Lock(), bridge.to_server, bridge.server_eof, False]}

    async def flush() -> None:
        for _ in range(3):  # a failed side makes the bridge queue GOAWAY/RST for the other: go round again
            failed = False
            for side in sides.values():
                stream, lock, take, eof, dead = side
                async with lock:
                    data = take()
                    if data and not dead:
                        try:
                            await stream.send(data)
                        except ProxyError as e:
                            side[4] = True
                            eof(e.message)
                            failed = True
            if not failed:
                return

    async def pump(name: str, feed) -> None:
        side = sides[name]
        stream, eof = side[0], side[3]
        timeout = policy.idle_timeout
        while not bridge.closed:
            try:
                if name == "client" and not bridge.idle:
                    data = await stream.recv()  # the client may think for as long as streams are open
                else:
                    data = await stream.recv(timeout)
            except TimeoutError:
                if name == "client":
                    bridge.close_idle()
                else:
                    eof(f"the origin sent nothing for {timeout:g} s")
                await flush()
                return
            except ProxyError as e:
                side[4] = True
                eof(e.message)
                await flush()
                return
            if not data:
                side[4] = True
                eof()
                await flush()
                return
            feed(data)
            await flush()

    await flush()  # both prefaces
    tasks = [asyncio.ensure_future(pump("client", bridge.client_data)),
             asyncio.ensure_future(pump("server", bridge.server_data))]
    try:
        pending = set(tasks)
        while pending and not bridge.closed:
            done_tasks, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done_tasks:
                if t.exception() is not None:  # a bug: the relay's caller logs it; the flows are kept below
                    raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        for handle in timers.values():
            handle.cancel()
        bridge.abandon()  # anything still open (cancelled from outside) is recorded, not lost
