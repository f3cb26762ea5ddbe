"""`httpsdump flows list|show|export|clear`: output of each command, and every error as one line on
stderr with exit code 2 (never a traceback)."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from pathlib import Path

import jsonschema
import pytest

from proxy.flowscli import UsageError, main, parse_since, parse_status
from proxy.store import SqliteSink

from test_store import (START, binary_flow, expected_record, failed_flow, fill, handshake_failure, make_flow,
                        post_flow)

SCHEMA = json.loads((Path(__file__).parent / "data" / "har" / "har-1.2.schema.json").read_text())


@pytest.fixture
def store(tmp_path):
    """A store with six flows; returns (path, {name: flow})."""
    path = tmp_path / "flows.sqlite3"
    flows = {
        "home": make_flow(START, host="www.example.com", target="/"),
        "api404": make_flow(START + 10, host="api.example.com", target="/v1/missing", status=404,
                            body=b'{"error":"not found","items":[1,2]}', ctype=b"application/json"),
        "post": post_flow(START + 20),
        "expired": failed_flow(START + 30),
        "hs": handshake_failure(START + 40),
        "bin": binary_flow(START + 50),
    }
    fill(path, list(flows.values()))
    return path, flows


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and not line.startswith(("TIME", "-- "))]


# --- list -------------------------------------------------------------------------------------------


def test_list_is_a_table_with_the_newest_last(store, capsys):
    path, fl = store
    code, out, err = run(capsys, "list", "--store", str(path))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "ID", "METHOD", "STATUS", "HOST", "URL", "SIZE", "DURATION"]
    day = dt.datetime.fromtimestamp(START).date()
    if day != dt.date.today():
        assert lines[1] == f"-- {day.isoformat()} --"  # a date line when the day is not today
    body = rows(out)
    assert [r.split()[1] for r in body] == [f.id[:8] for f in fl.values()]  # oldest at the top
    home = body[0].split()
    assert home[0] == dt.datetime.fromtimestamp(START).strftime("%H:%M:%S")
    assert home[2:6] == ["GET", "200", "www.example.com", "https://www.example.com/"]
    assert body[0].endswith("12 B     12 ms")
    assert body[1].split()[3] == "404"
    assert body[2].split()[2:4] == ["POST", "201"]
    expired = body[3]
    assert expired.split()[3] == "ERR" and expired.endswith("35 ms  ! upstream_certificate")
    assert "(no request)" in body[4] and body[4].endswith("! client_tls") and "pinned.test" in body[4]
    assert "1.0 kB" in body[5]


def test_list_limit_keeps_the_newest_and_says_what_was_left_out(store, capsys):
    path, fl = store
    code, out, err = run(capsys, "list", "--store", str(path), "--limit", "2")
    assert code == 0
    assert [r.split()[1] for r in rows(out)] == [fl["hs"].id[:8], fl["bin"].id[:8]]
    assert "2 shown; 4 older matching flows not shown" in err
    code, out, _ = run(capsys, "list", "--store", str(path), "--limit", "0")
    assert len(rows(out)) == 6


@pytest.mark.parametrize("args, names", [
    (["--host", "*.example.com"], ["home", "api404"]),
    (["--host", "API.EXAMPLE.COM"], ["api404"]),
    (["--method", "post"], ["post"]),
    (["--status", "4xx"], ["api404"]),
    (["--status", "404"], ["api404"]),
    (["--status", "200-299"], ["home", "post", "bin"]),
    (["--status", "2xx,4xx"], ["home", "api404", "post", "bin"]),
    (["--status", "failed"], ["expired", "hs"]),
    (["--since", dt.datetime.fromtimestamp(START + 25).astimezone().isoformat()], ["expired", "hs", "bin"]),
    (["--grep", "NOT FOUND"], ["api404"]),
    (["--grep", "café"], ["post"]),
    (["--grep", "trust our CA"], ["hs"]),
    (["--host", "*.example.com", "--status", "2xx"], ["home"]),
])
def test_list_filters(store, capsys, args, names):
    path, fl = store
    code, out, err = run(capsys, "list", "--store", str(path), *args)
    assert code == 0, err
    assert [r.split()[1] for r in rows(out)] == [fl[n].id[:8] for n in names]


def test_list_since_a_relative_time(tmp_path, capsys):
    path = tmp_path / "flows.sqlite3"
    now = time.time()
    old, new = make_flow(now - 7200), make_flow(now - 60)
    fill(path, [old, new])
    for since, expected in (("10m", [new]), ("3h", [old, new]), ("1d", [old, new]), ("30s", [])):
        code, out, err = run(capsys, "list", "--store", str(path), "--since", since)
        assert code == 0
        assert [r.split()[1] for r in rows(out)] == [f.id[:8] for f in expected], since
    assert "no flows match" in err


def test_list_empty_store_and_no_match(tmp_path, store, capsys):
    empty = tmp_path / "empty.sqlite3"
    SqliteSink(empty).close()
    code, out, err = run(capsys, "list", "--store", str(empty))
    assert (code, out) == (0, "") and f"no flows stored in {empty}" in err
    code, out, err = run(capsys, "list", "--store", str(store[0]), "--host", "nowhere.test")
    assert (code, out) == (0, "") and "no flows match" in err


def test_list_truncates_long_urls_and_escapes_what_the_network_sent(tmp_path, capsys):
    path = tmp_path / "flows.sqlite3"
    long = make_flow(START, target="/" + "a" * 300)
    evil = make_flow(START + 1, host="evil.test", target="/\x1b[2Jx")
    fill(path, [long, evil])
    code, out, _ = run(capsys, "list", "--store", str(path))
    assert code == 0
    assert "…" in out and "a" * 300 not in out
    assert max(len(line) for line in out.splitlines()) <= 170
    assert "\x1b" not in out and "\\x1b[2Jx" in out


# --- show -------------------------------------------------------------------------------------------


def test_show_prints_the_exchange_as_on_the_wire(store, capsys):
    path, fl = store
    f = fl["api404"]
    code, out, err = run(capsys, "show", "--store", str(path), f.id[:6])
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"flow {f.id}"
    for expected in [
        "client:  127.0.0.1:50312  mode: https",
        "TLS client: TLSv1.3, TLS_AES_128_GCM_SHA256, SNI api.example.com, ALPN http/1.1 (offered h2, http/1.1)",
        "TLS upstream: TLSv1.3, TLS_AES_256_GCM_SHA384, SNI api.example.com, ALPN http/1.1",
        "certificate: CN=api.example.com (issuer CN=Test Root; SAN DNS:api.example.com); verified",
        "timings: client TLS 3 ms, connect 2 ms, upstream TLS 4 ms, request sent 0 ms, first byte 10 ms, total 12 ms",
        "> GET /v1/missing HTTP/1.1",
        "> Host: api.example.com",
        "> Cookie: session=abc123; theme=dark",
        "< HTTP/1.1 404 Whatever",
        "< Content-Type: application/json",
        "<",
    ]:
        assert expected in lines, expected
    assert lines.index("> GET /v1/missing HTTP/1.1") < lines.index("< HTTP/1.1 404 Whatever")
    assert lines[1].startswith("time:    " + dt.datetime.fromtimestamp(START + 10).strftime("%Y-%m-%d %H:%M:%S"))
    # the JSON body, pretty-printed
    i = lines.index("  {")
    assert lines[i:i + 7] == ["  {", '    "error": "not found",', '    "items": [', "      1,", "      2", "    ]",
                              "  }"]


def test_show_decoded_text_binary_and_request_bodies(tmp_path, capsys):
    path = tmp_path / "flows.sqlite3"
    gz = make_flow(START, gzipped=True, body=b"<p>Gr\xc3\xbc\xc3\x9fe</p>\n" * 3)
    flows = [gz, binary_flow(START + 1), post_flow(START + 2)]
    fill(path, flows)
    _, out, _ = run(capsys, "show", "--store", str(path), gz.id)
    assert "<\n  <p>Grüße</p>\n  <p>Grüße</p>\n  <p>Grüße</p>\n  (gzip, " in out
    assert f"(gzip, {gz.response.body.size} bytes on the wire, 45 decoded)" in out
    _, out, _ = run(capsys, "show", "--store", str(path), flows[1].id)
    assert "(binary, 1024 bytes, application/octet-stream)" in out
    assert "  00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  ................" in out
    assert "  00000040  40 41 42 43 44 45 46 47 48 49 4a 4b 4c 4d 4e 4f  @ABCDEFGHIJKLMNO" in out
    assert "… 768 more bytes shown by 'flows export'" in out
    _, out, _ = run(capsys, "show", "--store", str(path), flows[2].id)
    assert '> POST /api/items?q=a%20b&flag&x=1 HTTP/1.1' in out
    assert '>\n  {\n    "name": "café"\n  }\n' in out


def test_show_failed_flows(store, capsys):
    path, fl = store
    _, out, _ = run(capsys, "show", "--store", str(path), fl["expired"].id)
    assert ("error:   upstream_certificate: certificate has expired: for expired.test "
            "(side=upstream, status=502, reason=expired, verify_code=10)") in out
    assert "certificate: none seen; verification FAILED: certificate has expired (code 10)" in out
    assert out.rstrip().endswith("> Host: expired.test\n\n(no response)")
    _, out, _ = run(capsys, "show", "--store", str(path), fl["hs"].id)
    assert "TLS client: SNI pinned.test" in out and "error:   client_tls: the client does not trust our CA" in out
    assert "(no request: the flow failed before one was read)" in out


def test_show_escapes_terminal_sequences(tmp_path, capsys):
    path = tmp_path / "flows.sqlite3"
    f = make_flow(START, body=b"\x1b]0;pwned\x07 text", ctype=b"text/plain",
                  extra_headers=[(b"X-Evil", b"\x1b[31mred\xe2\x80\xae")])
    fill(path, [f])
    _, out, _ = run(capsys, "show", "--store", str(path), f.id)
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07 text" in out


@pytest.mark.parametrize("ident, message", [
    ("ffffffff", "no flow with an id starting with 'ffffffff'"),
    ("not-an-id!", "'not-an-id!' is not a flow id"),
])
def test_show_unknown_ids(store, capsys, ident, message):
    code, out, err = run(capsys, "show", "--store", str(store[0]), ident)
    assert code == 2 and out == ""
    assert err.startswith("httpsdump flows: error: ") and message in err and err.count("\n") == 1


def test_show_ambiguous_prefix(tmp_path, capsys):
    path = tmp_path / "flows.sqlite3"
    fill(path, [make_flow(id="beef1" + "0" * 27), make_flow(id="beef2" + "0" * 27)])
    code, out, err = run(capsys, "show", "--store", str(path), "beef")
    assert code == 2 and out == ""
    assert "the id prefix 'beef' matches more than one flow (beef10000000, beef20000000); give more of the id" in err
    code, out, _ = run(capsys, "show", "--store", str(path), "beef2")
    assert code == 0 and out.startswith("flow beef2")


# --- export -----------------------------------------------------------------------------------------


def test_export_har(store, capsys, tmp_path):
    path, fl = store
    target = tmp_path / "out.har"
    code, out, err = run(capsys, "export", "--store", str(path), "--har", str(target))
    assert code == 0 and out == f"exported 6 flows to {target} (HAR)\n"
    har = json.loads(target.read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(har)
    assert [e["_id"] for e in har["log"]["entries"]] == [f.id for f in fl.values()]  # oldest first
    assert target.stat().st_mode & 0o777 == 0o600
    code, out, _ = run(capsys, "export", "--store", str(path), "--har", str(target), "--status", "failed")
    assert out == f"exported 2 flows to {target} (HAR)\n"
    assert [e["response"]["status"] for e in json.loads(target.read_text())["log"]["entries"]] == [0, 0]


def test_export_jsonl_is_the_log_format(store, capsys, tmp_path):
    path, fl = store
    target = tmp_path / "out.jsonl"
    code, out, _ = run(capsys, "export", "--store", str(path), "--jsonl", str(target), "--host", "*.example.com")
    assert code == 0 and out == f"exported 2 flows to {target} (JSON Lines)\n"
    lines = target.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [expected_record(fl["home"]), expected_record(fl["api404"])]
    assert target.stat().st_mode & 0o777 == 0o600
    code, out, _ = run(capsys, "export", "--store", str(path), "--jsonl", str(target), "--limit", "1")
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == [fl["bin"].id]


def test_export_to_standard_output(store, capsys):
    path, fl = store
    code, out, err = run(capsys, "export", "--store", str(path), "--har", "-", "--method", "POST")
    assert code == 0 and err == "exported 1 flow to standard output (HAR)\n"
    assert [e["_id"] for e in json.loads(out)["log"]["entries"]] == [fl["post"].id]
    code, out, err = run(capsys, "export", "--store", str(path), "--jsonl", "-", "--status", "404")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [fl["api404"].id]


def test_export_errors(store, capsys, tmp_path):
    path, _ = store
    code, out, err = run(capsys, "export", "--store", str(path))
    assert code == 2 and "one of the arguments --har --jsonl is required" in err
    code, _, err = run(capsys, "export", "--store", str(path), "--har", str(tmp_path))
    assert code == 2 and f"export: {tmp_path} is a directory" in err
    code, _, err = run(capsys, "export", "--store", str(path), "--jsonl", str(tmp_path / "no" / "x.jsonl"))
    assert code == 2 and "cannot write" in err and "No such file or directory" in err
    code, _, err = run(capsys, "export", "--store", str(path), "--har", "a.har", "--jsonl", "b.jsonl")
    assert code == 2 and "not allowed with argument" in err


# --- clear ------------------------------------------------------------------------------------------


def test_clear(store, capsys):
    path, _ = store
    code, out, err = run(capsys, "clear", "--store", str(path))
    assert (code, out, err) == (0, f"removed 6 flows from {path}\n", "")
    code, out, err = run(capsys, "list", "--store", str(path))
    assert code == 0 and out == "" and "no flows stored" in err
    code, out, _ = run(capsys, "clear", "--store", str(path))
    assert out == f"removed 0 flows from {path}\n"


# --- the store's location and errors -----------------------------------------------------------------


def test_store_path_from_confdir_config_and_home(store, capsys, tmp_path, monkeypatch):
    path, _ = store  # tmp_path/flows.sqlite3
    code, out, _ = run(capsys, "list", "--confdir", str(tmp_path), "--limit", "1")
    assert code == 0 and len(rows(out)) == 1
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'store_path = "{path}"\nlisten_port = 9000\n')
    code, out, _ = run(capsys, "list", "--config", str(cfg), "--limit", "1")
    assert code == 0 and len(rows(out)) == 1
    cfg.write_text(f'confdir = "{tmp_path}"\n')
    code, out, _ = run(capsys, "list", "--config", str(cfg), "--limit", "1")
    assert code == 0 and len(rows(out)) == 1
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, _, err = run(capsys, "list")
    assert code == 2 and f"no flow store at {tmp_path / 'home' / '.httpsdump' / 'flows.sqlite3'}" in err


@pytest.mark.parametrize("command", [["list"], ["show", "abc"], ["export", "--har", "x.har"], ["clear"]])
def test_a_missing_store_is_exit_2(tmp_path, capsys, command):
    missing = tmp_path / "nope.sqlite3"
    code, out, err = run(capsys, *command, "--store", str(missing))
    assert code == 2 and out == ""
    assert err.startswith("httpsdump flows: error: no flow store at " + str(missing))
    assert not missing.exists()  # not even clear creates it


@pytest.mark.parametrize("args, message", [
    (["--status", "9xx"], "--status 9xx: expected a status code (404), a class (1xx to 5xx)"),
    (["--status", "600"], "--status 600: expected"),
    (["--status", "299-200"], "--status 299-200: a range must go from a lower to a higher code"),
    (["--status", ""], "--status : expected"),
    (["--since", "yesterday-ish"], "--since yesterday-ish: expected a duration (30s, 10m, 2h, 1d, 1w) or an ISO date"),
    (["--since", "10 parsecs"], "--since 10 parsecs: expected"),
    (["--method", "GE T"], "--method GE T: not an HTTP method"),
    (["--grep", ""], "--grep: the text to search for is empty"),
    (["--limit", "-1"], "--limit -1: must be 0 (all) or more"),
])
def test_bad_filters_are_exit_2_with_a_precise_message(store, capsys, args, message):
    code, out, err = run(capsys, "list", "--store", str(store[0]), *args)
    assert code == 2 and out == ""
    assert err.startswith(f"httpsdump flows: error: {message}")
    assert err.count("\n") == 1


def test_usage_errors_and_help(capsys):
    code, out, err = run(capsys)
    assert code == 2 and "usage: httpsdump flows" in err
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err
    code, _, err = run(capsys, "list", "--limit", "many")
    assert code == 2 and "invalid int value: 'many'" in err
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "list|show|export|clear" in out
    code, out, _ = run(capsys, "list", "--help")
    assert code == 0 and "--grep TEXT" in out and "--since WHEN" in out


def test_bad_config_and_broken_stores_are_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("store_path = [")
    code, _, err = run(capsys, "list", "--config", str(cfg))
    assert code == 2 and "is not valid TOML" in err
    cfg.write_text("store_path = 3")
    code, _, err = run(capsys, "list", "--config", str(cfg))
    assert code == 2 and "key 'store_path' must be a non-empty string" in err
    code, _, err = run(capsys, "list", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "config file not found" in err
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database at all" * 200)
    code, _, err = run(capsys, "list", "--store", str(junk))
    assert code == 2 and str(junk) in err
    odd = tmp_path / "odd.sqlite3"
    conn = sqlite3.connect(odd)
    conn.execute("CREATE TABLE flows (x)")
    conn.close()
    code, _, err = run(capsys, "list", "--store", str(odd))
    assert code == 2 and f"cannot read the flow store {odd}" in err


def test_reading_while_the_proxy_writes(tmp_path, capsys):
    path = tmp_path / "flows.sqlite3"
    sink = SqliteSink(path, batch_interval=0.01)
    for i in range(50):
        sink.emit(make_flow(START + i))
    assert sink.flush(10)
    code, out, _ = run(capsys, "list", "--store", str(path), "--limit", "0")
    assert code == 0 and len(rows(out)) == 50
    sink.emit(make_flow(START + 100))
    sink.close()
    code, out, _ = run(capsys, "list", "--store", str(path), "--limit", "0")
    assert len(rows(out)) == 51


# --- parsers ----------------------------------------------------------------------------------------


def test_parse_status():
    assert parse_status("404") == (((404, 404),), False)
    assert parse_status("4XX, 500..503,failed") == (((400, 499), (500, 503)), True)
    with pytest.raises(UsageError):
        parse_status("4x")


def test_parse_since():
    now = 1_800_000_000.0
    assert parse_since("90s", now) == now - 90
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since("2W", now) == now - 14 * 86400
    assert parse_since("2026-01-31T10:00:00Z") == dt.datetime(2026, 1, 31, 10, tzinfo=dt.timezone.utc).timestamp()
    assert parse_since("2026-01-31T10:00:00+01:00") == dt.datetime(2026, 1, 31, 9, tzinfo=dt.timezone.utc).timestamp()
    assert parse_since("2026-01-31") == dt.datetime(2026, 1, 31).timestamp()  # local midnight
    with pytest.raises(UsageError):
        parse_since("last tuesday")

