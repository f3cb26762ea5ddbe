"""The flow store: rows and columns, file modes, the writer thread (batching, back-pressure, close),
retention, readers during writes, crash safety, queries and clear.

The flow factories here (`make_flow`, `failed_flow`, `handshake_failure`, `binary_flow`, `post_flow`)
are shared with test_har.py and test_flowscli.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from proxy.decode import render_body
from proxy.errors import CertificateError, CertReason, ConfigError
from proxy.flow import CertInfo, Flow, Request, Response, Timing, TlsInfo, TlsSide
from proxy.sinks import Sink
from proxy.store import (AmbiguousFlow, FlowFilter, SqliteSink, StoreError, UnknownFlow, default_store_path,
                         open_store, record_columns)

ROOT = Path(__file__).resolve().parent.parent
START = 1_795_723_953.64


# --- flows -------------------------------------------------------------------------------------------


def make_flow(start: float = START, *, host: str = "good.test", method: str = "GET", target: str = "/path",
              status: int = 200, body: bytes = b"<p>hello</p>", ctype: bytes = b"text/html; charset=utf-8",
              gzipped: bool = False, mode: str = "https", extra_headers=(), **kw) -> Flow:
    wire = gzip.compress(body) if gzipped else body
    req = Request(method=method, host=host, port=443, target=target,
                  headers=[(b"Host", host.encode()), (b"User-Agent", b"curl/8.5.0"),
                           (b"Cookie", b"session=abc123; theme=dark"), *extra_headers])
    req.scheme = "https" if mode == "https" else "http"
    req.port = 443 if mode == "https" else 80
    headers = [(b"Content-Type", ctype), (b"Content-Length", str(len(wire)).encode()),
               (b"Set-Cookie", b"id=a3fWa; Expires=Thu, 21 Oct 2027 07:28:00 GMT; Path=/; Secure; HttpOnly")]
    if gzipped:
        headers.append((b"Content-Encoding", b"gzip"))
    resp = Response(status=status, reason="OK" if status == 200 else "Whatever", headers=headers)
    resp.body.feed(wire, 1 << 20)
    upstream = TlsSide(sni=host, version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", alpn="http/1.1",
                       verified=True, verify_code=0, verify_result="ok",
                       cert=CertInfo(f"CN={host}", "CN=Test Root", (f"DNS:{host}",), "ab" * 32,
                                     "Jan  1 00:00:00 2026 GMT", "Jan  1 00:00:00 2027 GMT"))
    client = TlsSide(sni=host, version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", alpn="http/1.1",
                     alpn_offer=("h2", "http/1.1"))
    tls = TlsInfo(client=client, upstream=upstream) if mode == "https" else TlsInfo()
    return Flow(client_addr="127.0.0.1:50312", mode=mode, request=req, response=resp, tls=tls,
                timing=Timing(start=start, client_tls_ms=3.0, connect_ms=1.5, upstream_tls_ms=4.5,
                              request_sent_ms=0.5, first_byte_ms=10.0, total_ms=12.25), **kw)


def failed_flow(start: float = START) -> Flow:
    err = CertificateError(CertReason.EXPIRED, 10, "for expired.test")
    req = Request(method="GET", host="expired.test", port=443, target="/",
                  headers=[(b"Host", b"expired.test")])
    up = TlsSide(sni="expired.test", verified=False, verify_code=10, verify_result="certificate has expired")
    return Flow(client_addr="127.0.0.1:50313", mode="https", request=req, error=err.to_record(),
                tls=TlsInfo(upstream=up), timing=Timing(start=start, total_ms=35.0))


def handshake_failure(start: float = START) -> Flow:
    """Failed before any request was read: no request, no response."""
    return Flow(client_addr="127.0.0.1:50314", mode="https", tls=TlsInfo(client=TlsSide(sni="pinned.test")),
                error={"kind": "client_tls", "side": "client", "status": 400,
                       "message": "the client does not trust our CA"}, timing=Timing(start=start))


def binary_flow(start: float = START) -> Flow:
    return make_flow(start, body=bytes(range(256)) * 4, ctype=b"application/octet-stream")


def post_flow(start: float = START) -> Flow:
    f = make_flow(start, method="POST", target="/api/items?q=a%20b&flag&x=1", status=201,
                  body=b'{"id":7,"name":"caf\xc3\xa9"}', ctype=b"application/json", mode="http",
                  extra_headers=[(b"Content-Type", b"application/json")])
    f.request.body.feed(b'{"name":"caf\xc3\xa9"}', 1 << 20)
    f.timing.client_tls_ms = None
    return f


def expected_record(flow: Flow) -> dict:
    return json.loads(json.dumps(flow.to_dict(decode_body=render_body)))


def store_path(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "flows.sqlite3"


def fill(path: Path, flows: list[Flow], **kw) -> None:
    sink = SqliteSink(path, **kw)
    for f in flows:
        sink.emit(f)
    sink.close()


# --- the sink: rows ----------------------------------------------------------------------------------


def test_sink_satisfies_the_protocol(tmp_path):
    sink = SqliteSink(store_path(tmp_path))
    assert isinstance(sink, Sink)
    sink.close()


def test_default_path_is_in_the_confdir(tmp_path):
    assert default_store_path(tmp_path) == tmp_path / "flows.sqlite3"
    assert str(default_store_path("~/.httpsdump")).startswith(os.path.expanduser("~"))


def test_one_row_per_flow_with_indexed_columns_and_the_full_record(tmp_path):
    path = store_path(tmp_path)
    flows = [make_flow(START, gzipped=True, body=b"<p>Gr\xc3\xbc\xc3\x9fe</p>" * 50), failed_flow(START + 1),
             handshake_failure(START + 2), binary_flow(START + 3), post_flow(START + 4)]
    fill(path, flows)
    with open_store(path) as store:
        assert store.count() == 5
        records = list(store.query())
        rows = list(store.summaries())
    assert [r["id"] for r in records] == [f.id for f in flows]  # oldest first
    for flow, rec in zip(flows, records):
        assert rec == expected_record(flow)  # headers, rendered bodies, TLS, timings, error: all of it
    assert records[0]["response"]["body"]["text"].startswith("<p>Grüße</p>")
    assert records[3]["response"]["body"]["base64"]
    by_id = {r["id"]: r for r in rows}
    good, failed, hs, _, post = (by_id[f.id] for f in flows)
    assert good == {"id": flows[0].id, "start": START, "host": "good.test", "method": "GET", "status": 200,
                    "url": "https://good.test/path", "mode": "https", "error_kind": None,
                    "size": flows[0].response.body.size, "duration": 12.25}
    assert (failed["status"], failed["error_kind"], failed["host"], failed["size"]) == \
        (None, "upstream_certificate", "expired.test", None)
    assert (hs["host"], hs["method"], hs["url"], hs["error_kind"]) == ("pinned.test", None, None, "client_tls")
    assert (post["method"], post["status"], post["mode"], post["url"]) == \
        ("POST", 201, "http", "http://good.test/api/items?q=a%20b&flag&x=1")


@pytest.mark.parametrize("one_statement", [True, False])
def test_both_ways_of_writing_a_batch_store_the_same_rows(tmp_path, one_statement):
    # A writer thread inserts a batch of small records in one statement (JSON unpacked by SQLite); the
    # logger process inserts row by row. Same rows, same columns, same text, either way.
    from proxy.flow import dumps_line
    from proxy.store import StoreWriter

    path = store_path(tmp_path)
    flows = [make_flow(START), failed_flow(START + 1), handshake_failure(START + 2), binary_flow(START + 3),
             post_flow(START + 4), make_flow(START + 5, body="\u00e9\"\\\n\t\u2028".encode() * 3)]
    rows = []
    for f in flows:
        record = f.to_dict(decode_body=render_body)
        rows.append((record["id"], *record_columns(record), dumps_line(record)[:-1].decode()))
    writer = StoreWriter(path, one_statement=one_statement)
    try:
        assert writer.write_rows(rows, sum(len(r[-1]) for r in rows)) == 0
    finally:
        writer.close()
    with open_store(path) as store:
        assert list(store.query()) == [expected_record(f) for f in flows]
        summaries = list(store.summaries())
    assert [tuple(s.values()) for s in summaries] == [row[:-1] for row in rows]
    conn = sqlite3.connect(path)
    try:
        texts = [t for (t,) in conn.execute("SELECT record FROM flows ORDER BY start")]
    finally:
        conn.close()
    assert texts == [row[-1] for row in rows]


def test_schema_columns_and_indexes(tmp_path):
    path = store_path(tmp_path)
    fill(path, [make_flow()])
    conn = sqlite3.connect(path)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(flows)")]
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(flows)")}
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    assert cols == ["id", "start", "host", "method", "status", "url", "mode", "error_kind", "size", "duration",
                    "record"]
    assert {"flows_start", "flows_host", "flows_status"} <= indexes


def test_record_columns_tolerate_odd_records():
    assert record_columns({}) == (0.0, None, None, None, None, None, None, None, None)
    assert record_columns({"error": "boom", "response": {"status": "x"}})[3] is None


# --- files -----------------------------------------------------------------------------------------


def _modes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir() if p.name.startswith(path.name)}


def test_files_are_private_even_with_a_permissive_umask(tmp_path):
    path = store_path(tmp_path)
    old = os.umask(0)
    try:
        sink = SqliteSink(path)
        sink.emit(make_flow())
        assert sink.flush(10)
        modes = _modes(path)
        assert set(modes) >= {"flows.sqlite3", "flows.sqlite3-wal", "flows.sqlite3-shm"}
        assert set(modes.values()) == {0o600}, modes
        assert path.parent.stat().st_mode & 0o777 == 0o700  # a confdir we create is private too
        sink.close()
    finally:
        os.umask(old)


def test_existing_loose_files_are_tightened(tmp_path):
    path = store_path(tmp_path)
    fill(path, [make_flow()])
    os.chmod(path, 0o644)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        side.write_bytes(b"") if not side.exists() else None
        os.chmod(side, 0o666)
    sink = SqliteSink(path)
    sink.emit(make_flow())
    sink.close()
    assert set(_modes(path).values()) == {0o600}


def test_open_failures_are_config_errors_naming_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (blocker / "flows.sqlite3", tmp_path):  # parent is a file; the path is a directory
        with pytest.raises(ConfigError) as e:
            SqliteSink(bad)
        assert str(bad) in e.value.message
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError) as e:
        SqliteSink(junk)
    assert str(junk) in e.value.message and "not a database" in e.value.message
    with pytest.raises(ConfigError) as e:
        open_store(tmp_path / "missing.sqlite3")
    assert "no flow store at" in e.value.message
    with pytest.raises(ConfigError) as e:
        SqliteSink(store_path(tmp_path), max_flows=0)


def test_a_newer_schema_is_refused(tmp_path):
    path = store_path(tmp_path)
    fill(path, [make_flow()])
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    for opener in (lambda: SqliteSink(path), lambda: open_store(path)):
        with pytest.raises(ConfigError, match="newer httpsdump"):
            opener()


def test_a_database_without_the_table_is_not_a_store(tmp_path):
    other = tmp_path / "other.sqlite3"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ConfigError, match="not an httpsdump flow store"):
        open_store(other)


# --- the writer thread -----------------------------------------------------------------------------


def test_emits_from_many_threads_all_arrive(tmp_path):
    path = store_path(tmp_path)
    sink = SqliteSink(path, batch_size=50)
    ids: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(250):
            f = make_flow(START + n * 1000 + i, host=f"h{n}.test")
            with lock:
                ids.append(f.id)
            sink.emit(f)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    assert sink.written == 2000 and sink.dropped == 0 and sink.pending == 0
    with open_store(path) as store:
        assert store.count() == 2000
        assert {r["id"] for r in store.summaries()} == set(ids)
        assert store.count(FlowFilter(host="h3.test")) == 250


def test_emit_does_not_wait_for_the_disk(tmp_path):
    """emit only queues: with the writer stuck, emit still returns at once."""
    gate = threading.Event()

    def slow_render(message):
        gate.wait(10)
        return render_body(message)

    sink = SqliteSink(store_path(tmp_path), render=slow_render)
    t0 = time.monotonic()
    for i in range(100):
        sink.emit(make_flow(START + i))
    assert time.monotonic() - t0 < 1.0
    gate.set()
    sink.close()
    assert sink.written == 100


def test_close_flushes_everything_queued(tmp_path):
    path = store_path(tmp_path)
    sink = SqliteSink(path, batch_size=10_000, batch_interval=30.0)  # would otherwise wait 30 s to batch
    for i in range(500):
        sink.emit(make_flow(START + i))
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 10
    with open_store(path) as store:
        assert store.count() == 500
    sink.close()  # idempotent


def test_batches_are_transactions(tmp_path, monkeypatch):
    """Inserts are grouped: far fewer commits than flows."""
    path = store_path(tmp_path)
    sink = SqliteSink(path, batch_size=100, batch_interval=0.5)
    commits = []
    sink._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    for i in range(300):
        sink.emit(make_flow(START + i))
    sink.close()
    assert sink.written == 300
    assert 3 <= len(commits) <= 10, len(commits)


def test_flush_waits_until_rows_are_visible_to_readers(tmp_path):
    path = store_path(tmp_path)
    sink = SqliteSink(path, batch_interval=0.2)
    for i in range(30):
        sink.emit(make_flow(START + i))
    assert sink.flush(10)
    with open_store(path) as store:
        assert store.count() == 30
    sink.close()


def test_emit_after_close_only_warns(tmp_path, caplog):
    sink = SqliteSink(store_path(tmp_path))
    sink.close()
    with caplog.at_level(logging.WARNING):
        sink.emit(make_flow())
    assert "emitted after close" in caplog.text


def test_backpressure_slows_emit_but_loses_nothing(tmp_path, caplog):
    path = store_path(tmp_path)

    def slow_render(message):
        time.sleep(0.002)
        return render_body(message)

    sink = SqliteSink(path, queue_flows=5, batch_size=2, render=slow_render, block_timeout=30)
    with caplog.at_level(logging.WARNING):
        for i in range(200):
            sink.emit(make_flow(START + i))
        sink.close()
    assert sink.written == 200 and sink.dropped == 0
    assert "falling behind" in caplog.text and "caught up" in caplog.text
    with open_store(path) as store:
        assert store.count() == 200


def test_a_hung_writer_costs_flows_only_after_the_timeout_and_says_so(tmp_path, caplog):
    gate = threading.Event()

    def stuck_render(message):
        gate.wait(20)
        return render_body(message)

    sink = SqliteSink(store_path(tmp_path), queue_flows=2, batch_size=1, render=stuck_render, block_timeout=0.2)
    with caplog.at_level(logging.WARNING):
        t0 = time.monotonic()
        for i in range(6):
            sink.emit(make_flow(START + i))
        waited = time.monotonic() - t0
    assert sink.dropped >= 1
    assert waited >= 0.2
    assert "NOT stored" in caplog.text and "no room after waiting" in caplog.text
    gate.set()
    sink.close()
    assert sink.written + sink.dropped == 6


def test_queue_bytes_bound_applies_back_pressure_too(tmp_path):
    path = store_path(tmp_path)
    sink = SqliteSink(path, queue_bytes=64 << 10, block_timeout=30)
    big = b"x" * (40 << 10)
    for i in range(20):
        sink.emit(make_flow(START + i, body=big, ctype=b"text/plain"))
        assert sink._pending_bytes <= (64 << 10) + (41 << 10)
    sink.close()
    assert sink.written == 20


def test_a_flow_that_cannot_be_rendered_is_logged_and_the_rest_are_kept(tmp_path, caplog):
    path = store_path(tmp_path)
    bad = make_flow(START)
    bad.request.headers = [(b"Host", None)]  # not bytes: to_dict fails
    with caplog.at_level(logging.ERROR):
        fill(path, [make_flow(START - 1), bad, make_flow(START + 1)])
    assert "cannot render flow" in caplog.text and bad.id in caplog.text
    with open_store(path) as store:
        assert store.count() == 2


def test_a_refused_write_is_retried(tmp_path, caplog):
    path = store_path(tmp_path)
    sink = SqliteSink(path)
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: the sink's BEGIN waits, then fails
    sink._conn.execute("PRAGMA busy_timeout = 50")
    with caplog.at_level(logging.WARNING):
        sink.emit(make_flow())
        time.sleep(0.3)
        blocker.rollback()
        blocker.close()
        sink.close()
    assert "retrying" in caplog.text
    assert sink.written == 1 and sink.dropped == 0


# --- retention -------------------------------------------------------------------------------------


def test_retention_by_count_keeps_the_newest(tmp_path):
    path = store_path(tmp_path)
    sink = SqliteSink(path, max_flows=100, retention_every=10, batch_size=10)
    for i in range(300):
        sink.emit(make_flow(START + i))
    sink.close()
    with open_store(path) as store:
        n = store.count()
        starts = [r["start"] for r in store.summaries()]
    assert 90 <= n <= 110
    assert max(starts) == START + 299
    assert min(starts) >= START + 300 - 110  # the oldest went first
    assert sink.deleted == 300 - n


def test_retention_is_by_start_time_not_insertion_order(tmp_path):
    path = store_path(tmp_path)
    sink = SqliteSink(path, max_flows=10, retention_every=1, batch_size=1)
    old = make_flow(START - 10_000)
    for i in range(10):
        sink.emit(make_flow(START + i))
    sink.emit(old)  # inserted last, started first
    sink.close()
    with open_store(path) as store:
        ids = {r["id"] for r in store.summaries()}
    assert old.id not in ids


def test_retention_by_size_bounds_the_file(tmp_path):
    path = store_path(tmp_path)
    limit = 1 << 20
    sink = SqliteSink(path, max_bytes=limit, retention_every=1000, batch_size=4)
    noise = os.urandom(48 << 10)  # incompressible: stored as base64, ~64 KiB a record
    for i in range(100):
        sink.emit(make_flow(START + i, body=noise, ctype=b"application/octet-stream"))
    sink.close()
    with open_store(path) as store:
        n = store.count()
        newest = max(r["start"] for r in store.summaries())
    assert 5 <= n < 20 and newest == START + 99
    assert path.stat().st_size < 3 * limit
    conn = sqlite3.connect(path)
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    used = (conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0])
    conn.close()
    assert used * page <= limit + (limit // 16) + (256 << 10)  # at most one check interval over


def test_retention_runs_when_the_sink_opens(tmp_path):
    path = store_path(tmp_path)
    fill(path, [make_flow(START + i) for i in range(50)])
    sink = SqliteSink(path, max_flows=20)
    sink.close()
    with open_store(path) as store:
        assert store.count() <= 20


# --- readers ---------------------------------------------------------------------------------------


def test_readers_work_while_the_proxy_writes(tmp_path):
    path = store_path(tmp_path)
    sink = SqliteSink(path, batch_size=20, batch_interval=0.01)
    sink.emit(make_flow(START))
    assert sink.flush(10)
    seen: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        last = 0
        try:
            while not stop.is_set():
                with open_store(path) as store:
                    n = store.count()
                    newest = list(store.summaries(FlowFilter(limit=5), newest_first=True))
                    # Rows only ever arrive: a later query sees at least what the count saw.
                    assert min(n, 5) <= len(newest) <= 5
                    assert n >= last
                    last = n
                    seen.append(n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    for i in range(1, 600):
        sink.emit(make_flow(START + i))
        if i % 100 == 0:
            time.sleep(0.02)
    sink.close()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    assert len(seen) > 3
    with open_store(path) as store:
        assert store.count() == 600


def test_a_read_only_store_refuses_changes(tmp_path):
    path = store_path(tmp_path)
    fill(path, [make_flow()])
    with open_store(path) as store:
        with pytest.raises(StoreError, match="read-only"):
            store.clear()
        assert store.count() == 1


def run_script(body: str) -> None:
    """Run `body` in a fresh interpreter that can import the project and these test helpers."""
    head = (f"import os, sys\nsys.path.insert(0, {str(ROOT / 'tests')!r}); sys.path.insert(0, {str(ROOT)!r})\n"
            "from test_store import make_flow\nfrom proxy.store import SqliteSink\n")
    subprocess.run([sys.executable, "-c", head + textwrap.dedent(body)], check=True, timeout=60, cwd=ROOT)


def test_a_killed_proxy_leaves_a_readable_store(tmp_path):
    """A crash (no close, no atexit) loses at most the batch being gathered; the database is intact."""
    path = store_path(tmp_path)
    run_script(f"""
        sink = SqliteSink({str(path)!r}, batch_interval=0.01)
        for i in range(200):
            sink.emit(make_flow({START} + i))
        assert sink.flush(30)
        for i in range(200, 230):
            sink.emit(make_flow({START} + i))  # may or may not make it
        os._exit(0)
    """)
    with open_store(path) as store:
        n = store.count()
        assert 200 <= n <= 230
        assert len(list(store.query())) == n
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    fill(path, [make_flow(START + 1000)])  # and the proxy can go on writing to it
    with open_store(path) as store:
        assert store.count() == n + 1


def test_atexit_flushes_a_sink_that_was_never_closed(tmp_path):
    path = store_path(tmp_path)
    run_script(f"""
        sink = SqliteSink({str(path)!r}, batch_interval=5)
        for i in range(50):
            sink.emit(make_flow({START} + i))
    """)
    with open_store(path) as store:
        assert store.count() == 50


# --- queries -------------------------------------------------------------------------------------


@pytest.fixture
def populated(tmp_path):
    path = store_path(tmp_path)
    flows = {
        "home": make_flow(START, host="www.example.com", target="/"),
        "api404": make_flow(START + 10, host="api.example.com", target="/v1/missing", status=404,
                            body=b'{"error":"not found"}', ctype=b"application/json"),
        "post": post_flow(START + 20),
        "expired": failed_flow(START + 30),
        "hs": handshake_failure(START + 40),
        "other500": make_flow(START + 50, host="Other.TEST", status=503, body=b"Service Unavailable: try later",
                              ctype=b"text/plain"),
    }
    fill(path, list(flows.values()))
    return path, flows


def _ids(store, **kw) -> set[str]:
    return {r["id"] for r in store.query(FlowFilter(**kw))}


def test_filters(populated):
    path, fl = populated
    with open_store(path) as store:
        ids = lambda *names: {fl[n].id for n in names}  # noqa: E731
        assert _ids(store) == ids(*fl)
        assert _ids(store, host="*.example.com") == ids("home", "api404")
        assert _ids(store, host="other.test") == ids("other500")  # case-insensitive
        assert _ids(store, host="OTHER.*") == ids("other500")
        assert _ids(store, method="post") == ids("post")
        assert _ids(store, status=((400, 499),)) == ids("api404")
        assert _ids(store, status=((404, 404), (500, 599))) == ids("api404", "other500")
        assert _ids(store, failed=True) == ids("expired", "hs")
        assert _ids(store, status=((200, 299),), failed=True) == ids("home", "post", "expired", "hs")
        assert _ids(store, since=START + 25) == ids("expired", "hs", "other500")
        assert _ids(store, host="*.example.com", status=((200, 299),)) == ids("home")
        assert store.count(FlowFilter(failed=True)) == 2


def test_failed_includes_responses_cut_short(tmp_path):
    path = store_path(tmp_path)
    cut = make_flow(START, error={"kind": "upstream_protocol", "side": "upstream", "status": 502,
                                  "message": "the origin closed the connection mid-body"})
    fill(path, [cut, make_flow(START + 1), failed_flow(START + 2)])
    with open_store(path) as store:
        assert [r["status"] for r in store.summaries(FlowFilter(failed=True))] == [200, None]
        assert store.count(FlowFilter(status=((500, 599),), failed=True)) == 2


def test_grep_searches_urls_headers_bodies_and_errors_only(populated):
    path, fl = populated
    with open_store(path) as store:
        ids = lambda *names: {fl[n].id for n in names}  # noqa: E731
        assert _ids(store, grep="v1/MISSING") == ids("api404")  # URL, ASCII case-insensitive
        assert _ids(store, grep='"error":"not found"') == ids("api404")  # body text with quotes
        assert _ids(store, grep="café") == ids("post")  # non-ASCII body text
        assert _ids(store, grep="try later") == ids("other500")
        assert _ids(store, grep="has expired") == ids("expired")  # error message
        assert _ids(store, grep="trust our ca") == ids("hs")
        assert _ids(store, grep="theme=dark") == ids("home", "api404", "post", "other500")  # a header value
        assert _ids(store, grep="set-cookie") == ids("home", "api404", "post", "other500")  # a header name
        assert _ids(store, grep="http_version") == set()  # a JSON key is not content
        assert _ids(store, grep="127.0.0.1") == set()  # nor is the client address
        assert store.count(FlowFilter(grep="theme=dark", limit=2)) == 2


def test_order_and_limit(populated):
    path, fl = populated
    with open_store(path) as store:
        oldest_first = [r["id"] for r in store.summaries()]
        assert oldest_first[0] == fl["home"].id and oldest_first[-1] == fl["other500"].id
        newest = [r["id"] for r in store.summaries(FlowFilter(limit=2), newest_first=True)]
        assert newest == [fl["other500"].id, fl["hs"].id]
        grepped = [r["id"] for r in store.query(FlowFilter(grep="theme=dark", limit=2), newest_first=True)]
        assert grepped == [fl["other500"].id, fl["post"].id]


def test_get_by_id_and_prefix(populated):
    path, fl = populated
    with open_store(path) as store:
        f = fl["post"]
        assert store.get(f.id)["id"] == f.id
        assert store.get(f.id[:10].upper())["id"] == f.id
        with pytest.raises(UnknownFlow, match="no flow with an id starting with 'ffffffffff'"):
            store.get("ffffffffff")
        with pytest.raises(UnknownFlow, match="is not a flow id"):
            store.get("ab*")
        with pytest.raises(UnknownFlow):
            store.get("")


def test_an_ambiguous_prefix_names_the_candidates(tmp_path):
    path = store_path(tmp_path)
    fill(path, [make_flow(id="abc1" + "0" * 28), make_flow(id="abc2" + "0" * 28), make_flow(id="abd" + "0" * 29)])
    with open_store(path) as store:
        with pytest.raises(AmbiguousFlow) as e:
            store.get("abc")
        assert e.value.candidates == ["abc1" + "0" * 28, "abc2" + "0" * 28]
        assert "abc1" in str(e.value) and "abc2" in str(e.value)
        assert store.get("abd")["id"] == "abd" + "0" * 29


def test_clear_removes_everything_even_while_the_proxy_writes(tmp_path):
    path = store_path(tmp_path)
    secret = b"TOKEN-5f2b9c-never-keep-me"
    sink = SqliteSink(path)
    for i in range(20):
        sink.emit(make_flow(START + i, body=secret, ctype=b"text/plain"))
    assert sink.flush(10)
    with open_store(path, readonly=False) as store:
        assert store.clear() == 20
        assert store.count() == 0
    sink.emit(make_flow(START + 100))  # the proxy goes on
    sink.close()
    with open_store(path) as store:
        assert store.count() == 1
    for f in path.parent.iterdir():  # the content is gone from the disk, not just unlinked
        if f.name.startswith(path.name):
            assert secret not in f.read_bytes(), f.name


def test_add_imports_records(tmp_path):
    path = store_path(tmp_path)
    recs = [expected_record(make_flow(START + i)) for i in range(3)]
    with open_store(path, readonly=False) as store:
        assert store.add(recs) == 3
        assert list(store.query()) == recs
