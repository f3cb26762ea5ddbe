"""End to end: --workers 2 (SO_REUSEPORT) and the logger process that serves them, with real curl and
http.client through the real proxy to a real TLS origin."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import stat
import threading
import time

from helpers import client_context, https, poll, run_cli
from proxy.store import open_store

N = 24


def _workers(proxy) -> list[int]:
    m = re.search(r"listening on 127\.0\.0\.1:\d+ \(2 workers: (\d+) (\d+)\)", proxy.stderr_text())
    assert m, proxy.stderr_text()
    return [int(m.group(1)), int(m.group(2))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _exited_on_purpose(proxy) -> None:
    """We stopped it ourselves: the fixture must not report a crash; a traceback is still a failure."""
    proxy._finished = True
    assert "Traceback" not in proxy.stderr_text(), proxy.stderr_text()


def _get(proxy, origin, path: str) -> int:
    """One request on a new connection (CONNECT + TLS) with http.client."""
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=client_context(proxy.ca_pem), timeout=20)
    conn.set_tunnel("localhost", origin.port)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_two_workers_share_the_port_and_one_log(start_proxy, origin, token, tmp_path):
    store, har = tmp_path / "flows.sqlite3", tmp_path / "flows.har"
    proxy = start_proxy("--workers", "2", "--store", str(store), "--har-file", str(har), verbose=False)
    pids = _workers(proxy)
    assert proxy.stderr_text().count("listening on") == 1
    assert all(_alive(p) for p in pids)
    # New connections from two kinds of client, concurrently: the kernel spreads them over both queues.
    results: list[int] = []
    def client(k: int) -> None:
        for i in range(k, N, 4):
            if i % 2:
                r = proxy.curl(*https("good.test", origin, f"/hello?t={token}&i={i}"))
                results.append(200 if r.rc == 0 else -1)
            else:
                results.append(_get(proxy, origin, f"/hello?t={token}&i={i}"))
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(200) == N, results
    proxy.flows(N)
    proxy.stop()  # SIGTERM: the workers stop, the logger writes everything, then the proxy exits 0
    assert proxy.proc.returncode == 0, proxy.stderr_text()
    assert not any(_alive(p) for p in pids)

    data = proxy.log_path.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.split(b"\n")[:-1]]  # every line whole
    assert len(records) == N and len({r["id"] for r in records}) == N
    assert sorted(int(r["request"]["url"].rsplit("=", 1)[1]) for r in records) == list(range(N))
    with open_store(store) as s:
        assert s.count() == N
    assert len(json.loads(har.read_text())["log"]["entries"]) == N
    for path in (proxy.log_path, store, har):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    m = re.search(r"logger: (\d+) flows written \(worker 1: (\d+), worker 2: (\d+)\)", proxy.stderr_text())
    assert m, proxy.stderr_text()
    assert int(m.group(1)) == N and int(m.group(2)) > 0 and int(m.group(3)) > 0  # both workers served


def test_sigterm_lets_an_exchange_in_flight_finish_and_logs_it(start_proxy, origin, token):
    proxy = start_proxy("--workers", "2", "--no-store", verbose=False)
    pids = _workers(proxy)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=proxy.curl(*https("good.test", origin, f"/slow?ms=800&t={token}"))))
    t.start()
    poll(lambda: origin.requests_with(token), what="the slow request at the origin")
    proxy.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert out["r"].rc == 0, str(out["r"])
    assert proxy.proc.wait(20) == 0
    _exited_on_purpose(proxy)
    [record] = proxy.read_flows()
    assert record["response"]["status"] == 200 and record["error"] is None
    assert not any(_alive(p) for p in pids)


def test_a_worker_that_dies_is_reported_and_the_other_keeps_serving(start_proxy, origin, token):
    proxy = start_proxy("--workers", "2", "--no-store", verbose=False)
    victim, survivor = _workers(proxy)
    os.kill(victim, signal.SIGKILL)
    poll(lambda: "worker 1 (pid" in proxy.stderr_text() and "ended (signal 9)" in proxy.stderr_text(),
         what="the report of the dead worker")
    for i in range(5):
        r = proxy.curl(*https("good.test", origin, f"/hello?t={token}&i={i}"))
        assert r.rc == 0, str(r)
    assert len(proxy.flows(5)) == 5
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 1  # a worker died: the exit status says so
    _exited_on_purpose(proxy)
    assert not _alive(survivor)


def test_workers_must_be_positive():
    r = run_cli("--workers", "0")
    assert r.returncode == 2
    err = r.stderr.decode()
    assert "config key 'workers': must be positive" in err and "Traceback" not in err


def test_the_logger_dying_is_visible_and_the_proxy_keeps_relaying(start_proxy, origin, token, tmp_path):
    # one worker has a logger process when it keeps a flow store (without one it writes the log itself)
    proxy = start_proxy("--store", str(tmp_path / "flows.sqlite3"), verbose=False)
    children = open(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read().split()
    [logger] = [int(c) for c in children]
    os.kill(logger, signal.SIGKILL)
    time.sleep(0.2)
    for i in range(3):
        r = proxy.curl(*https("good.test", origin, f"/hello?t={token}&i={i}"))
        assert r.rc == 0, str(r)
    poll(lambda: "the logger process has stopped" in proxy.stderr_text(), what="the report")
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 1
    _exited_on_purpose(proxy)
    assert "flows were not logged" in proxy.stderr_text()


def test_one_worker_without_a_store_writes_its_log_itself(start_proxy, origin, token):
    """No logger process when it would only take over plain appends (it costs ~10 MiB)."""
    proxy = start_proxy("--no-store")
    assert open(f"/proc/{proxy.pid}/task/{proxy.pid}/children").read().split() == []
    r = proxy.curl(*https("good.test", origin, f"/hello?t={token}"))
    assert r.rc == 0, str(r)
    assert token in proxy.flow()["request"]["target"]
