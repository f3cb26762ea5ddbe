"""The logger process (proxy/logproc.py) without a proxy: channels in, JSONL/store/HAR out, nothing lost,
whole lines only, failures reported."""

from __future__ import annotations

import json
import os
import stat

import pytest

from proxy.errors import ConfigError
from proxy.logproc import LogChannel, LogSpec, start_logger
from proxy.store import open_store
from test_store import make_flow


def _spec(tmp_path, **kw) -> LogSpec:
    base = dict(log_file=str(tmp_path / "flows.jsonl"), store_path=str(tmp_path / "flows.sqlite3"),
                store_max_flows=1000, store_max_bytes=64 << 20, har_file=str(tmp_path / "flows.har"))
    base.update(kw)
    return LogSpec(**base)


def test_every_record_reaches_every_output_once(tmp_path):
    spec = _spec(tmp_path)
    logger = start_logger(spec, 2)
    channels = [LogChannel(s, columns=True, batch_bytes=4096) for s in logger.channels]
    flows = [make_flow(1_795_723_953.0 + i, target=f"/{i}", body=b"x" * (i * 100)) for i in range(300)]
    for i, f in enumerate(flows):
        channels[i % 2].emit(f)  # no event loop: each channel sends at once
    for c in channels:
        c.close()
    assert logger.wait(30) == 0
    lines = (tmp_path / "flows.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(ln) for ln in lines[:-1]]
    assert sorted(r["id"] for r in records) == sorted(f.id for f in flows)
    assert {r["id"]: r for r in records}[flows[7].id] == flows[7].rendered()[0]
    with open_store(spec.store_path) as store:
        assert store.count() == 300
        assert store.get(flows[42].id)["request"]["url"] == "https://good.test/42"
    har = json.loads((tmp_path / "flows.har").read_text())
    assert len(har["log"]["entries"]) == 300
    for name in ("flows.jsonl", "flows.sqlite3", "flows.har"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_a_bad_output_is_a_config_error_before_anything_starts(tmp_path):
    (tmp_path / "other.har").write_text("not a HAR file of ours")
    with pytest.raises(ConfigError, match="not a HAR file written by httpsdump"):
        start_logger(_spec(tmp_path, har_file=str(tmp_path / "other.har")), 1)
    assert not (tmp_path / "flows.jsonl").exists() or (tmp_path / "flows.jsonl").read_bytes() == b""


def test_a_dead_logger_is_reported_and_does_not_block(tmp_path, caplog):
    logger = start_logger(_spec(tmp_path, store_path=None, har_file=None), 1)
    channel = LogChannel(logger.channels[0], columns=False)
    channel.emit(make_flow())
    os.kill(logger.pid, 9)
    assert logger.wait(10) == 1
    for i in range(3):
        channel.emit(make_flow(target=f"/after-{i}"))
    channel.close(timeout=2)
    assert channel.dropped >= 3
    assert "the logger process has stopped" in caplog.text
    assert "NOT logged" in caplog.text


def test_frames_of_a_worker_that_died_mid_send_are_not_written(tmp_path, caplog):
    logger = start_logger(_spec(tmp_path, store_path=None, har_file=None), 1)
    sock = logger.channels[0]
    good = make_flow()
    channel = LogChannel(sock, columns=False)
    channel.emit(good)
    # Half a frame, then the worker "dies" (its socket closes).
    sock.setblocking(True)
    sock.sendall(b"\x00\x00\x10\x00" + b"{" * 100)
    sock.close()
    assert logger.wait(10) == 0
    lines = (tmp_path / "flows.jsonl").read_bytes().split(b"\n")
    assert len(lines) == 2 and json.loads(lines[0])["id"] == good.id and lines[1] == b""
