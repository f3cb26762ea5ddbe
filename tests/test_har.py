"""HAR 1.2 export: validated against the HAR 1.2 JSON schema (tests/data/har/, written from the spec),
read back by an independent HAR reader (haralyzer, PyPI), and, where node and the npm package
har-validator are installed, checked by that validator too. Then the mapping itself (bodies, sizes,
timings, cookies, failed flows) and the continuously valid HarFileSink.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
from haralyzer import HarParser

from proxy.decode import render_body
from proxy.errors import ConfigError
from proxy.flow import Flow
from proxy.har import HarFileSink, flows_to_har, har_entry, write_har
from proxy.sinks import Sink

from test_store import (START, binary_flow, expected_record, failed_flow, handshake_failure, make_flow,
                        post_flow)

SCHEMA = json.loads((Path(__file__).parent / "data" / "har" / "har-1.2.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def validate(har: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(har), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def all_kinds() -> list[Flow]:
    big = make_flow(START + 5, body=b"x" * 5000, ctype=b"text/plain")
    big.response.body.captured = big.response.body.captured[:1000]  # a capture cut by the limit
    big.response.body.truncated = True
    corrupt = make_flow(START + 6, body=b"<p>hi</p>", ctype=b"text/html")
    corrupt.response.headers.append((b"Content-Encoding", b"gzip"))  # says gzip, is not
    ws = make_flow(START + 7, status=101, body=b"", upgraded="websocket")
    return [make_flow(START, gzipped=True, body=b"<p>Gr\xc3\xbc\xc3\x9fe</p>" * 40), failed_flow(START + 1),
            handshake_failure(START + 2), binary_flow(START + 3), post_flow(START + 4), big, corrupt, ws]


def records(flows: list[Flow]) -> list[dict]:
    return [expected_record(f) for f in flows]


# --- the schema and independent readers ------------------------------------------------------------


def test_the_schema_is_a_valid_json_schema_and_strict():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    har = flows_to_har(records([make_flow()]))
    validate(har)
    broken = json.loads(json.dumps(har))
    del broken["log"]["entries"][0]["timings"]["wait"]
    broken["log"]["entries"][0]["custom"] = 1  # custom fields must start with "_"
    broken["log"]["entries"][0]["startedDateTime"] = "2026-11-26 12:00:00"  # no T, no time zone
    broken["log"]["entries"][0]["timings"]["send"] = -1
    messages = [e.message for e in VALIDATOR.iter_errors(broken)]
    assert len(messages) >= 4, messages


def test_every_kind_of_flow_validates_against_the_har_schema():
    har = flows_to_har(records(all_kinds()))
    validate(har)
    validate(json.loads(json.dumps(har)))  # and after a trip through JSON text
    assert har["log"]["version"] == "1.2" and har["log"]["creator"]["name"] == "httpsdump"
    assert len(har["log"]["entries"]) == len(all_kinds())


def test_an_independent_reader_loads_the_export(tmp_path):
    path = tmp_path / "flows.har"
    flows = all_kinds()
    assert write_har(records(flows), path) == len(flows)
    parser = HarParser.from_file(str(path))
    assert parser.version == "1.2" and parser.creator["name"] == "httpsdump"
    page = parser.pages[0]  # entries without a page: haralyzer's "unknown" page
    entries = page.entries
    assert len(entries) == len(flows)
    assert [e.startTime for e in entries] == sorted(e.startTime for e in entries)
    first = entries[0]
    assert first.startTime == dt.datetime.fromtimestamp(START, tz=dt.timezone.utc).replace(
        microsecond=(round(START * 1000) % 1000) * 1000)
    assert first.request.url == "https://good.test/path" and first.request.method == "GET"
    assert first.response.status == 200
    assert first.response.mimeType.startswith("text/html")
    assert first.response.text.startswith("<p>Grüße</p>")
    assert first.request.get_header_value("user-agent") == "curl/8.5.0"
    assert [e.response.status for e in entries] == [200, 0, 0, 200, 201, 200, 200, 101]
    assert len(page.filter_entries(status_code="2.*")) == 5
    assert len(page.post_requests) == 1
    assert page.get_total_size(entries) > 0


def _node_har_validator() -> tuple[str, dict] | None:
    node = shutil.which("node")
    if node is None:
        return None
    env = dict(os.environ)
    paths = [p for p in env.get("NODE_PATH", "").split(os.pathsep) if p]
    npm = shutil.which("npm")
    if npm:
        try:
            paths.append(subprocess.run([npm, "root", "-g"], capture_output=True, text=True, timeout=30).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    env["NODE_PATH"] = os.pathsep.join(paths)
    probe = subprocess.run([node, "-e", "require('har-validator')"], env=env, capture_output=True, timeout=30)
    return (node, env) if probe.returncode == 0 else None


def test_the_npm_har_validator_accepts_the_export(tmp_path):
    found = _node_har_validator()
    assert found is not None, "node with the npm package har-validator is needed (./dev test installs it)"
    node, env = found
    path = tmp_path / "flows.har"
    write_har(records(all_kinds()), path)
    script = ("const v = require('har-validator'); const har = JSON.parse(require('fs').readFileSync(process.argv[1]));"
              "v.har(har).then(() => console.log('valid'), e => { console.log(JSON.stringify(e.errors || e.message));"
              " process.exit(1); });")
    out = subprocess.run([node, "-e", script, str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "valid", out.stdout + out.stderr


# --- the mapping -----------------------------------------------------------------------------------


def test_text_body_is_decoded_and_sizes_are_the_spec_s():
    f = make_flow(gzipped=True, body=b"<p>Gr\xc3\xbc\xc3\x9fe</p>" * 40)
    e = har_entry(expected_record(f))
    c = e["response"]["content"]
    decoded = len(b"<p>Gr\xc3\xbc\xc3\x9fe</p>" * 40)
    assert c["text"] == "<p>Grüße</p>" * 40 and "encoding" not in c
    assert c["size"] == decoded  # decoded size
    assert e["response"]["bodySize"] == f.response.body.size < decoded  # bytes on the wire
    assert c["compression"] == decoded - f.response.body.size
    assert c["mimeType"] == "text/html; charset=utf-8"  # the header's value, charset included
    assert e["response"]["headersSize"] == -1 and e["request"]["headersSize"] == -1


def test_binary_body_is_base64():
    f = binary_flow()
    c = har_entry(expected_record(f))["response"]["content"]
    assert c["encoding"] == "base64"
    assert base64.b64decode(c["text"]) == bytes(range(256)) * 4
    assert c["size"] == 1024 and "compression" not in c


def test_truncated_and_undecodable_bodies_are_marked():
    flows = all_kinds()
    big, corrupt = har_entry(expected_record(flows[5])), har_entry(expected_record(flows[6]))
    assert big["response"]["content"]["_truncated"] is True
    assert big["response"]["content"]["text"] == "x" * 1000 and big["response"]["bodySize"] == 5000
    assert "gzip" in corrupt["response"]["content"]["_decodeError"]


def test_request_body_query_and_cookies():
    e = har_entry(expected_record(post_flow()))
    req, resp = e["request"], e["response"]
    assert req["postData"] == {"mimeType": "application/json", "text": '{"name":"café"}'}
    assert req["bodySize"] == len(b'{"name":"caf\xc3\xa9"}')
    assert req["queryString"] == [{"name": "q", "value": "a b"}, {"name": "flag", "value": ""},
                                  {"name": "x", "value": "1"}]
    assert req["cookies"] == [{"name": "session", "value": "abc123"}, {"name": "theme", "value": "dark"}]
    assert resp["cookies"] == [{"name": "id", "value": "a3fWa", "expires": "2027-10-21T07:28:00+00:00", "path": "/",
                                "secure": True, "httpOnly": True}]
    assert "postData" not in har_entry(expected_record(make_flow()))["request"]
    binary_post = post_flow()
    binary_post.request.headers = [(b"Host", b"good.test"), (b"Content-Type", b"application/octet-stream")]
    binary_post.request.body.captured = bytearray(b"\x00\x01\xff")
    binary_post.request.body.size = 3
    pd = har_entry(expected_record(binary_post))["request"]["postData"]
    assert pd["_encoding"] == "base64" and base64.b64decode(pd["text"]) == b"\x00\x01\xff"


def test_redirect_url_and_http_version():
    f = make_flow(status=302)
    f.response.headers.append((b"Location", b"https://good.test/elsewhere"))
    e = har_entry(expected_record(f))
    assert e["response"]["redirectURL"] == "https://good.test/elsewhere"
    assert e["request"]["httpVersion"] == e["response"]["httpVersion"] == "HTTP/1.1"


def test_started_date_time_is_iso_8601_with_a_time_zone():
    e = har_entry(expected_record(make_flow(START)))
    when = dt.datetime.fromisoformat(e["startedDateTime"])
    assert when.tzinfo is not None
    assert abs(when.timestamp() - START) < 0.001


def test_timings_of_an_https_flow():
    e = har_entry(expected_record(make_flow()))  # connect 1.5 + TLS 4.5; sent 0.5, first byte 10, total 12.25
    t = e["timings"]
    assert t == {"blocked": -1, "dns": -1, "connect": 6.0, "ssl": 4.5, "send": 0.5, "wait": 9.5, "receive": 2.25}
    assert e["time"] == 6.0 + 0.5 + 9.5 + 2.25  # ssl is inside connect, not added twice
    assert e["_timings"]["total_ms"] == 12.25


def test_timings_of_a_plain_http_flow_start_with_its_connect():
    f = post_flow()  # mode http: the connection was opened after the request started
    f.timing.request_sent_ms = 8.0
    f.timing.upstream_tls_ms = None
    e = har_entry(expected_record(f))
    t = e["timings"]
    assert (t["connect"], t["ssl"], t["send"], t["wait"], t["receive"]) == (1.5, -1, 6.5, 2.0, 2.25)
    assert e["time"] == 12.25  # the flow's whole duration, nothing counted twice


def test_timings_on_a_reused_connection_and_of_failures():
    f = make_flow()
    f.timing.connect_ms = f.timing.upstream_tls_ms = None
    t = har_entry(expected_record(f))["timings"]
    assert (t["connect"], t["ssl"]) == (-1, -1)
    e = har_entry(expected_record(failed_flow()))  # failed after 35 ms, no milestone reached
    assert e["timings"] == {"blocked": 35.0, "dns": -1, "connect": -1, "ssl": -1, "send": 0, "wait": 0,
                            "receive": 0}
    assert e["time"] == 35.0
    e = har_entry(expected_record(handshake_failure()))
    assert e["time"] == 0 and e["timings"]["send"] == 0


def test_failed_flows_are_entries_with_status_0_and_the_error():
    e = har_entry(expected_record(failed_flow()))
    assert e["response"]["status"] == 0 and e["response"]["content"] == {"size": 0, "mimeType": ""}
    assert e["_error"]["kind"] == "upstream_certificate" and e["_error"]["verify_code"] == 10
    assert "certificate has expired" in e["comment"]
    assert e["request"]["url"] == "https://expired.test/"
    e = har_entry(expected_record(handshake_failure()))
    assert e["_noRequest"] is True and e["request"]["method"] == "CONNECT"
    assert e["request"]["url"] == "https://pinned.test/"
    assert e["_error"]["kind"] == "client_tls"


def test_custom_fields_carry_the_rest_of_the_flow():
    f = make_flow(insecure=True, upgraded="websocket")
    e = har_entry(expected_record(f))
    assert e["_id"] == f.id and e["_client"] == "127.0.0.1:50312" and e["_mode"] == "https"
    assert e["_insecure"] is True and e["_upgraded"] == "websocket"
    assert e["_tls"]["upstream"]["cert"]["subject"] == "CN=good.test"
    assert e["connection"] == "127.0.0.1:50312"
    assert all(k.startswith("_") or k in {"startedDateTime", "time", "request", "response", "cache", "timings",
                                          "connection", "comment"} for k in e)


def test_odd_records_never_raise():
    for rec in ({}, {"request": None, "response": None, "timings": None, "tls": None},
                {"start": "soon", "timings": {"total_ms": "x"}, "error": "boom"}):
        validate({"log": {"version": "1.2", "creator": {"name": "t", "version": "1"},
                          "entries": [har_entry(rec)]}})


def test_write_har_is_private_and_atomic(tmp_path):
    path = tmp_path / "out.har"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_har(records([make_flow()]), path)
    assert path.stat().st_mode & 0o777 == 0o600
    validate(json.loads(path.read_text()))
    assert [p.name for p in tmp_path.iterdir()] == ["out.har"]

    def exploding():
        yield expected_record(make_flow())
        raise RuntimeError("store went away")

    with pytest.raises(RuntimeError):
        write_har(exploding(), path)
    validate(json.loads(path.read_text()))  # the old file is untouched, no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ["out.har"]


# --- the sink --------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    har = json.loads(path.read_text(encoding="utf-8"))
    validate(har)
    return har


def test_har_sink_is_a_valid_har_after_every_flow(tmp_path):
    path = tmp_path / "live.har"
    sink = HarFileSink(path)
    assert isinstance(sink, Sink)
    assert load(path)["log"]["entries"] == []
    flows = all_kinds()
    for i, f in enumerate(flows, 1):
        sink.emit(f)
        entries = load(path)["log"]["entries"]
        assert len(entries) == i and entries[-1]["_id"] == f.id
    sink.close()
    har = load(path)
    assert har == flows_to_har(records(flows))
    assert path.stat().st_mode & 0o777 == 0o600


def test_har_sink_continues_its_own_file_and_refuses_others(tmp_path):
    path = tmp_path / "live.har"
    s = HarFileSink(path)
    s.emit(make_flow(START))
    s.close()
    os.chmod(path, 0o644)
    s = HarFileSink(path)
    s.emit(make_flow(START + 1))
    s.close()
    assert len(load(path)["log"]["entries"]) == 2
    assert path.stat().st_mode & 0o777 == 0o600
    empty = tmp_path / "empty.har"
    empty.write_bytes(b"")
    HarFileSink(empty).close()
    assert load(empty)["log"]["entries"] == []
    for name, content in (("notes.txt", b"my precious notes\n"), ("other.har", json.dumps(flows_to_har([])).encode()),
                          ("cut.har", path.read_bytes()[:-3])):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ConfigError, match="not a HAR file written by httpsdump"):
            HarFileSink(p)
        assert p.read_bytes() == content  # never overwritten
    with pytest.raises(ConfigError, match="cannot open the HAR file"):
        HarFileSink(tmp_path / "missing" / "x.har")
    with pytest.raises(ConfigError, match="not a regular file|cannot open"):
        HarFileSink(tmp_path)


def test_har_sink_write_error_keeps_the_file_valid(tmp_path, monkeypatch, caplog):
    path = tmp_path / "live.har"
    sink = HarFileSink(path)
    sink.emit(make_flow(START))
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 1:
            real(fd, bytes(data)[:10], offset)  # half a write, then the disk fills up
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with caplog.at_level(logging.ERROR):
        sink.emit(make_flow(START + 1))
    monkeypatch.undo()
    assert "No space left on device" in caplog.text
    assert len(load(path)["log"]["entries"]) == 1
    sink.emit(make_flow(START + 2))
    sink.close()
    assert [e["startedDateTime"][-12:-6] for e in load(path)["log"]["entries"]] == ["33.640", "35.640"]


def test_har_sink_never_raises_and_drops_after_close(tmp_path, caplog):
    sink = HarFileSink(tmp_path / "x.har")
    bad = make_flow()
    bad.request.headers = [(b"Host", None)]
    with caplog.at_level(logging.WARNING):
        sink.emit(bad)
        sink.close()
        sink.emit(make_flow())
        sink.close()
    assert "could not render" in caplog.text and "after close" in caplog.text
    assert load(tmp_path / "x.har")["log"]["entries"] == []


def test_concurrent_emits_keep_the_har_valid(tmp_path):
    import threading

    path = tmp_path / "live.har"
    sink = HarFileSink(path)
    threads = [threading.Thread(target=lambda: [sink.emit(make_flow(START + i)) for i in range(25)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    assert len(load(path)["log"]["entries"]) == 100
