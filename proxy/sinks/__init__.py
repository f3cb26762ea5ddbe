"""Where finished flows go: the console, a JSON Lines file, and later others.

The relay hands every finished (or failed) Flow to each sink through `emit`. A sink renders it and
writes it; it never reaches back into the relay. Sinks are called from the event loop and possibly
from worker threads, so each one serialises its own writes, keeps `emit` short, and does not raise
on odd data: a sink that fails logs through `logging` instead, so traffic keeps flowing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..flow import Flow
from .console import ConsoleSink
from .jsonl import JsonlSink

__all__ = ["Sink", "ConsoleSink", "JsonlSink"]


@runtime_checkable
class Sink(Protocol):
    def emit(self, flow: Flow) -> None:
        """Record one finished flow. Must not raise for any flow the relay can produce."""

    def close(self) -> None:
        """Flush and release what the sink holds; later `emit` calls are dropped (with a warning)."""


# Optional: `started(flow)` — a response that is still streaming a while after its head arrived
# (server-sent events, long polls, slow downloads). The console shows it at once; `emit` follows
# with the complete flow when it ends. Sinks without the method are simply not told.
