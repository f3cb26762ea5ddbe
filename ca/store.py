"""A per-host cache of minted leaves (or whatever the factory builds), with a cap.

Why: a browser opens many connections to the same host at once. Minting per connection would waste
CPU and, worse, give one host several certificates with different serials. So the first request for
a host calls the factory; concurrent first requests for the same host wait for that one call and
share its result; requests for different hosts do not wait for each other (the lock is never held
while the factory runs). The cap bounds memory when a client visits many hosts: the least recently
used entry is evicted.

Theory of operation: `_entries` (an OrderedDict in LRU order) holds finished values; `_pending`
holds one `_Flight` per host being built. Both are only touched under `_lock`. A failed factory call
is not cached: its waiters see the same exception, and the next request tries again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, NamedTuple, TypeVar

__all__ = ["LeafStore", "StoreStats"]

T = TypeVar("T")


class StoreStats(NamedTuple):
    """`misses` counts factory calls; `hits` counts every other `get` (cached or shared in flight)."""

    hits: int
    misses: int


class _Flight(Generic[T]):
    """One factory call in progress, which later requesters for the same host wait on."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


class LeafStore(Generic[T]):
    """host → factory(host), built once per host, at most `cap` kept (LRU). Thread-safe."""

    def __init__(self, factory: Callable[[str], T], cap: int = 2048) -> None:
        if cap < 1:
            raise ValueError(f"LeafStore cap must be at least 1, got {cap}")
        self._factory = factory
        self._cap = cap
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, T] = OrderedDict()
        self._pending: dict[str, _Flight[T]] = {}
        self._hits = 0
        self._misses = 0

    def get(self, host: str) -> T:
        """The value for `host`, calling the factory only if no value is cached or in flight."""
        with self._lock:
            if host in self._entries:
                self._entries.move_to_end(host)
                self._hits += 1
                return self._entries[host]
            flight = self._pending.get(host)
            leader = flight is None
            if flight is None:
                flight = self._pending[host] = _Flight()
                self._misses += 1
            else:
                self._hits += 1
        if leader:
            return self._build(host, flight)
        return self._wait(flight)

    def _build(self, host: str, flight: _Flight[T]) -> T:
        try:
            value = self._factory(host)
        except BaseException as e:
            flight.error = e
            with self._lock:
                del self._pending[host]
            flight.done.set()
            raise
        flight.value = value
        with self._lock:
            del self._pending[host]
            self._entries[host] = value
            while len(self._entries) > self._cap:
                self._entries.popitem(last=False)  # the least recently used
        flight.done.set()
        return value

    @staticmethod
    def _wait(flight: _Flight[T]) -> T:
        flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value  # type: ignore[return-value]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, host: object) -> bool:
        with self._lock:
            return host in self._entries

    @property
    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self._hits, self._misses)

    def __repr__(self) -> str:
        hits, misses = self.stats
        return f"LeafStore(entries={len(self)}, cap={self._cap}, hits={hits}, misses={misses})"
