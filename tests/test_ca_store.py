"""ca.store.LeafStore: one factory call per host under racing threads, LRU eviction, the cap."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable

import pytest

from ca.store import LeafStore, StoreStats

THREADS = 8
TIMEOUT = 10.0


def run_threads(target: Callable[[int], None], n: int = THREADS) -> None:
    """Run target(0..n-1) in n threads; an assertion failing in any of them fails the test."""
    failures: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - reported below, in the test's thread
            failures.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    if failures:
        raise failures[0]


def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for other threads to reach a state (an event wait, not a fixed sleep)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "other threads never got there"
        threading.Event().wait(0.001)


def test_racing_first_requests_share_one_factory_call() -> None:
    calls: list[str] = []
    release = threading.Event()

    def factory(host: str) -> object:
        calls.append(host)
        assert release.wait(TIMEOUT)
        return object()

    store: LeafStore[object] = LeafStore(factory)
    start = threading.Barrier(THREADS)
    results: list[object] = [None] * THREADS

    def worker(i: int) -> None:
        start.wait()
        results[i] = store.get("a.test")

    runner = threading.Thread(target=run_threads, args=(worker,))
    runner.start()
    wait_until(lambda: store.stats == StoreStats(hits=THREADS - 1, misses=1))  # all 8 asked while in flight
    release.set()
    runner.join(TIMEOUT)
    assert calls == ["a.test"]
    assert all(r is results[0] for r in results) and results[0] is not None
    assert len(store) == 1


def test_many_hosts_many_threads_one_call_each() -> None:
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def factory(host: str) -> str:
        with lock:
            counts[host] += 1
        return host.upper()

    store: LeafStore[str] = LeafStore(factory)
    hosts = [f"h{i}.test" for i in range(200)]
    start = threading.Barrier(THREADS)

    def worker(i: int) -> None:
        start.wait()
        for host in hosts[i:] + hosts[:i]:
            assert store.get(host) == host.upper()

    run_threads(worker)
    assert counts == Counter({h: 1 for h in hosts})
    assert store.stats == StoreStats(hits=THREADS * len(hosts) - len(hosts), misses=len(hosts))


def test_different_hosts_mint_concurrently() -> None:
    b_ran = threading.Event()

    def factory(host: str) -> str:
        if host == "a.test":
            # Blocks until b.test's factory has run: a store that serialised factories would time out.
            assert b_ran.wait(TIMEOUT), "b.test waited for a.test's factory"
        else:
            b_ran.set()
        return host

    store: LeafStore[str] = LeafStore(factory)
    got: dict[int, str] = {}
    run_threads(lambda i: got.__setitem__(i, store.get("a.test" if i == 0 else "b.test")), n=2)
    assert got == {0: "a.test", 1: "b.test"}


def test_lru_eviction_order() -> None:
    calls: list[str] = []
    store: LeafStore[str] = LeafStore(lambda h: calls.append(h) or h, cap=2)
    store.get("a")
    store.get("b")
    store.get("a")  # a is now the most recently used
    store.get("c")  # evicts b
    assert "a" in store and "c" in store and "b" not in store
    assert len(store) == 2
    store.get("b")  # minted again, evicts a
    assert calls == ["a", "b", "c", "b"]
    assert "a" not in store
    assert store.stats == StoreStats(hits=1, misses=4)


def test_cap_is_respected() -> None:
    store: LeafStore[int] = LeafStore(len, cap=16)
    for i in range(100):
        store.get("x" * i)
        assert len(store) <= 16
    assert len(store) == 16


def test_a_failing_factory_is_not_cached() -> None:
    attempts: list[str] = []

    def factory(host: str) -> str:
        attempts.append(host)
        if len(attempts) == 1:
            raise ValueError("boom")
        return "ok"

    store: LeafStore[str] = LeafStore(factory)
    with pytest.raises(ValueError, match="boom"):
        store.get("a.test")
    assert len(store) == 0
    assert store.get("a.test") == "ok"
    assert attempts == ["a.test", "a.test"]


def test_waiters_see_the_leaders_error() -> None:
    release = threading.Event()

    def factory(host: str) -> str:
        assert release.wait(TIMEOUT)
        raise ValueError("boom")

    store: LeafStore[str] = LeafStore(factory)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            store.get("a.test")
        except ValueError as e:
            errors.append(e)

    runner = threading.Thread(target=run_threads, args=(worker, 3))
    runner.start()
    wait_until(lambda: store.stats.hits + store.stats.misses == 3)
    release.set()
    runner.join(TIMEOUT)
    assert len(errors) == 3 and store.stats.misses == 1


def test_bad_cap() -> None:
    with pytest.raises(ValueError):
        LeafStore(str, cap=0)


def test_repr() -> None:
    store: LeafStore[str] = LeafStore(str, cap=3)
    store.get("a")
    assert repr(store) == "LeafStore(entries=1, cap=3, hits=0, misses=1)"
