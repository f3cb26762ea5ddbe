"""Sinks: the console at each verbosity, and the JSON Lines file (privacy, framing, concurrency)."""

from __future__ import annotations

import base64
import dataclasses
import errno
import gzip
import io
import json
import logging
import os
import stat
import threading
import time
import zlib

import brotli
import pytest
import zstandard

from proxy.errors import CertificateError, CertReason, ConfigError
from proxy.flow import CertInfo, Flow, Request, Response, Timing, TlsInfo, TlsSide
from proxy.sinks import ConsoleSink, JsonlSink, Sink

START = 1_795_723_953.64
HTML = ("<!doctype html><title>hi</title>" + "<p>Grüße</p>\n" * 80).encode()
ENCODERS = {
    "gzip": gzip.compress,
    "br": brotli.compress,
    "zstd": zstandard.ZstdCompressor().compress,
    "deflate": zlib.compress,
}


def hms(t: float = START) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def good_flow(encoding: str | None = "gzip", body: bytes = HTML, ctype: bytes = b"text/html; charset=utf-8",
              **kw) -> Flow:
    wire = ENCODERS[encoding](body) if encoding else body
    req = Request(method="GET", host="good.test", port=8443, target="/path",
                  headers=[(b"Host", b"good.test:8443"), (b"User-Agent", b"curl/7.88.1")])
    headers = [(b"Content-Type", ctype), (b"Content-Length", str(len(wire)).encode())]
    if encoding:
        headers.append((b"Content-Encoding", encoding.encode()))
    resp = Response(status=200, reason="OK", headers=headers)
    resp.body.feed(wire, 1 << 20)
    upstream = TlsSide(sni="good.test", version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", alpn="http/1.1",
                       verified=True, verify_code=0, verify_result="ok",
                       cert=CertInfo("CN=good.test", "CN=Test Root", ("DNS:good.test",), "ab" * 32, "a", "b"))
    client = TlsSide(sni="good.test", version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", alpn="http/1.1",
                     alpn_offer=("h2", "http/1.1"))
    return Flow(client_addr="127.0.0.1:50312", mode="https", request=req, response=resp,
                tls=TlsInfo(client=client, upstream=upstream),
                timing=Timing(start=START, connect_ms=1.5, first_byte_ms=10.0, total_ms=12.3), **kw)


def failed_flow() -> Flow:
    err = CertificateError(CertReason.EXPIRED, 10, "for expired.test")
    req = Request(method="GET", host="expired.test", port=443, target="/",
                  headers=[(b"Host", b"expired.test")])
    up = TlsSide(sni="expired.test", verified=False, verify_code=10, verify_result="certificate has expired")
    return Flow(client_addr="127.0.0.1:50313", mode="https", request=req, error=err.to_record(),
                tls=TlsInfo(upstream=up), timing=Timing(start=START, total_ms=35.0))


def odd_flow() -> Flow:
    f = good_flow(encoding=None, body=bytes(range(256)) * 8, ctype=b"application/octet-stream")
    f.response.headers.append((b"X-Bin\xff", b"\xff\xfe\x1b[31mred\x07 caf\xe9"))
    f.request.headers.append((b"X-Utf8", "naïve ✓".encode()))
    return f


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def console(verbosity: int, flow: Flow, stream: io.StringIO | None = None, **kw) -> str:
    stream = stream if stream is not None else io.StringIO()
    sink = ConsoleSink(stream, verbosity, **kw)
    sink.emit(flow)
    sink.close()
    return stream.getvalue()


# --- console ---------------------------------------------------------------------------------------


def test_sinks_satisfy_the_protocol(tmp_path):
    assert isinstance(ConsoleSink(io.StringIO(), 1), Sink)
    assert isinstance(JsonlSink(tmp_path / "f.jsonl"), Sink)


def test_verbosity_0_prints_nothing():
    assert console(0, good_flow()) == ""
    assert console(0, failed_flow()) == ""


def test_verbosity_1_one_line():
    f = good_flow(encoding=None)
    assert f.response.body.size == 1232
    line = f"{hms()} 127.0.0.1:50312 GET https://good.test:8443/path -> 200 OK text/html 1.2 kB 12 ms\n"
    assert console(1, f) == line
    assert console(1, good_flow("gzip")) == \
        f"{hms()} 127.0.0.1:50312 GET https://good.test:8443/path -> 200 OK text/html 73 B 12 ms\n"


def test_verbosity_1_small_body_and_default_port():
    f = good_flow(encoding=None, body=b"hello", ctype=b"text/plain")
    f.request.port = 443
    line = f"{hms()} 127.0.0.1:50312 GET https://good.test/path -> 200 OK text/plain 5 B 12 ms\n"
    assert console(1, f) == line


def test_verbosity_1_failed_flow():
    out = console(1, failed_flow())
    assert out == (f"{hms()} 127.0.0.1:50313 GET https://expired.test/ -> "
                   f"ERROR upstream_certificate: certificate has expired: for expired.test (35 ms)\n")


def test_markers_insecure_and_upgraded():
    f = good_flow(insecure=True, upgraded="websocket")
    f.response.status, f.response.reason = 101, "Switching Protocols"
    out = console(1, f)
    assert out.count("\n") == 1
    assert "-> 101 Switching Protocols" in out
    assert out.rstrip("\n").endswith("[insecure] [upgraded: websocket]")


def test_flow_without_request_or_response():
    f = Flow(client_addr="127.0.0.1:1", mode="https", tls=TlsInfo(client=TlsSide(sni="x.test")),
             error={"kind": "client_tls", "message": "the client does not trust our CA"})
    assert console(1, f).endswith(
        "127.0.0.1:1 (https x.test, no request) -> ERROR client_tls: the client does not trust our CA\n")
    assert "(no response)" in console(2, Flow(client_addr="c", mode="http", request=Request(method="GET")))


def test_verbosity_2_details():
    out = console(2, good_flow())
    lines = out.splitlines()
    assert lines[0].startswith(hms()) and out.endswith("\n")
    for expected in [
        "  TLS client: TLSv1.3, TLS_AES_128_GCM_SHA256, SNI good.test, ALPN http/1.1 (offered h2, http/1.1)",
        "  TLS upstream: TLSv1.3, TLS_AES_256_GCM_SHA384, SNI good.test, ALPN http/1.1",
        "  certificate: CN=good.test (issuer CN=Test Root; SAN DNS:good.test); verified",
        "  > GET /path HTTP/1.1",
        "  > Host: good.test:8443",
        "  < HTTP/1.1 200 OK",
        "  < Content-Encoding: gzip",
        "  <   <!doctype html><title>hi</title><p>Grüße</p>",
    ]:
        assert expected in lines, (expected, out)
    assert "timing: connect 2 ms, first byte 10 ms, total 12 ms" in out
    assert len(lines) < 40  # the body preview is bounded
    assert all(len(line) < 120 for line in lines)


def test_verbosity_2_failed_flow_shows_why():
    out = console(2, failed_flow())
    assert "verification FAILED: certificate has expired (code 10)" in out
    assert "reason=expired" in out and "verify_code=10" in out
    assert "  > GET / HTTP/1.1" in out and "  <" not in out


@pytest.mark.parametrize("verbosity", [1, 2])
def test_odd_bytes_never_reach_the_terminal(verbosity):
    out = console(verbosity, odd_flow())
    assert "\x1b" not in out and "\x07" not in out
    if verbosity == 2:
        assert "  < X-Bin\\xff: \\xff\\xfe\\x1b[31mred\\x07 caf\\xe9" in out
        assert "  > X-Utf8: naïve ✓" in out
        assert "(binary, 2048 bytes, application/octet-stream)" in out


def test_colour_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = console(1, good_flow(), Tty())
    assert "\x1b[32m200 OK\x1b[0m" in coloured
    assert "\x1b" not in console(1, good_flow())
    assert "\x1b[1;31mERROR upstream_certificate" in console(1, failed_flow(), Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b" not in console(1, good_flow(), Tty())
    assert "\x1b[32m" in console(1, good_flow(), io.StringIO(), color=True)


def test_console_never_raises(caplog):
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    console(1, good_flow(), Broken())
    weird = good_flow()
    weird.error = "not a dict"  # type: ignore[assignment]
    weird.response.headers = [(b"Content-Type", b"\xff/\xfe")]
    assert "ERROR not a dict" in console(2, weird)
    sink = ConsoleSink(io.StringIO(), 1)
    sink.close()
    with caplog.at_level(logging.WARNING):
        sink.emit(good_flow())
    assert "after close" in caplog.text


# --- JSON Lines --------------------------------------------------------------------------------------


def read_lines(path) -> list[dict]:
    text = path.read_text("utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_file_is_created_private(tmp_path):
    old = os.umask(0)
    try:
        sink = JsonlSink(tmp_path / "flows.jsonl")
    finally:
        os.umask(old)
    sink.close()
    assert stat.S_IMODE((tmp_path / "flows.jsonl").stat().st_mode) == 0o600


def test_existing_loose_file_is_tightened_and_appended(tmp_path):
    p = tmp_path / "flows.jsonl"
    p.write_text('{"earlier":true}\n')
    p.chmod(0o644)
    sink = JsonlSink(str(p))
    sink.emit(good_flow())
    sink.close()
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    records = read_lines(p)
    assert records[0] == {"earlier": True} and len(records) == 2


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_round_trip_of_fields(tmp_path, encoding):
    p = tmp_path / "flows.jsonl"
    sink = JsonlSink(p)
    good, failed, odd = good_flow(encoding), failed_flow(), odd_flow()
    for f in (good, failed, odd):
        sink.emit(f)
        assert len(read_lines(p)) >= 1  # visible at once, before close (tail -f)
    sink.close()
    g, e, o = read_lines(p)
    assert g["id"] == good.id and g["start"] == START and g["mode"] == "https"
    assert g["request"]["url"] == "https://good.test:8443/path"
    assert g["request"]["headers"] == [["Host", "good.test:8443"], ["User-Agent", "curl/7.88.1"]]
    body = g["response"]["body"]
    assert body["text"] == HTML.decode() and body["decoded_size"] == len(HTML)
    assert body["content_encoding"] == encoding and body["content_type"] == "text/html"
    assert body["size"] == good.response.body.size and body["truncated"] is False
    assert g["tls"]["upstream"]["cert"]["subject"] == "CN=good.test"
    assert g["timings"]["total_ms"] == 12.3
    assert e["response"] is None and e["error"]["kind"] == "upstream_certificate"
    assert e["error"]["reason"] == "expired" and e["error"]["verify_code"] == 10
    assert o["response"]["headers"][-1] == ["X-Bin\xff", "\xff\xfe\x1b[31mred\x07 caf\xe9"]  # latin-1
    assert base64.b64decode(o["response"]["body"]["base64"]) == bytes(range(256)) * 8
    assert o["response"]["body"]["summary"] == "binary, 2048 bytes, application/octet-stream"


def test_lines_are_compact_utf8(tmp_path):
    p = tmp_path / "f.jsonl"
    sink = JsonlSink(p)
    sink.emit(good_flow(encoding=None))
    sink.close()
    raw = p.read_bytes()
    assert raw.count(b"\n") == 1 and "Grüße".encode() in raw and b'":' in raw and b'": ' not in raw


def test_concurrent_emits_do_not_interleave(tmp_path):
    p = tmp_path / "f.jsonl"
    sink = JsonlSink(p)
    flows = [good_flow(encoding="br", body=HTML * (1 + i % 5)) for i in range(8)]
    barrier = threading.Barrier(8)

    def worker(f: Flow) -> None:
        barrier.wait()
        for _ in range(50):
            sink.emit(f)

    threads = [threading.Thread(target=worker, args=(f,)) for f in flows]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    records = read_lines(p)  # every line parses: nothing interleaved
    assert len(records) == 400
    assert {r["id"] for r in records} == {f.id for f in flows}
    assert all(r["response"]["body"]["text"].startswith("<!doctype") for r in records)


def test_emit_after_close_only_warns(tmp_path, caplog):
    sink = JsonlSink(tmp_path / "f.jsonl")
    sink.close()
    sink.close()
    with caplog.at_level(logging.WARNING):
        sink.emit(good_flow())
    assert "after close" in caplog.text


def test_short_write_then_error_leaves_no_partial_line(tmp_path, monkeypatch, caplog):
    p = tmp_path / "f.jsonl"
    sink = JsonlSink(p)
    sink.emit(good_flow())
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 100:
            return real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    sink.emit(good_flow())
    monkeypatch.undo()
    sink.emit(failed_flow())
    sink.close()
    assert len(read_lines(p)) == 2
    assert "No space left" in caplog.text


def test_open_failures_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing/flows\.jsonl: No such file or directory"):
        JsonlSink(tmp_path / "missing" / "flows.jsonl")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="Not a directory"):
        JsonlSink(tmp_path / "file" / "flows.jsonl")
    with pytest.raises(ConfigError, match="Is a directory"):
        JsonlSink(tmp_path)


def test_permission_denied_is_a_config_error(tmp_path):
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir(mode=0o500)
        target = d / "flows.jsonl"
    elif os.path.exists("/sys/kernel/notes"):
        target = "/sys/kernel/notes"  # read-only even for root, which bypasses file modes
    else:
        pytest.skip("root bypasses file permissions and no read-only sysfs file is at hand")
    with pytest.raises(ConfigError, match="Permission denied"):
        JsonlSink(target)


def test_a_tls_side_renders_again_when_any_of_its_facts_changes():
    """TlsSide.to_dict is shared by a connection's records; a change of any field must show."""
    side = TlsSide(sni="a.test", version="TLSv1.3", cipher="X", alpn="http/1.1", alpn_offer=("http/1.1",),
                   verified=True, verify_code=0, verify_result="ok",
                   cert=CertInfo("CN=a", "CN=ca", ("DNS:a.test",), "00", "then", "later"))
    first = side.to_dict(client=False)
    assert side.to_dict(client=False) is first  # unchanged: the same dict
    assert "verified" not in side.to_dict(client=True)  # the client view of the same side
    changed = {"sni": "b.test", "version": "TLSv1.2", "cipher": "Y", "alpn": "h2", "alpn_offer": ("h2",),
               "verified": False, "insecure": True, "verify_code": 10, "verify_result": "expired",
               "cert": CertInfo("CN=b", "CN=ca", (), "11", "then", "later"), "resumed": True}
    assert set(changed) == {f.name for f in dataclasses.fields(TlsSide) if f.init}, "a new field: cover it here"
    for name, value in changed.items():
        before = side.to_dict(client=False)
        setattr(side, name, value)
        after = side.to_dict(client=False)
        assert after is not before and after != before, name


def _stdlib_line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def test_the_tls_facts_carry_their_text_and_the_line_is_what_the_stdlib_writes():
    """A connection's TLS facts are encoded once (flow.Facts) and copied into each record's line: the
    line must be byte for byte what an encoder writing the whole record would write."""
    from proxy.flow import Facts, dumps, dumps_line

    side = TlsSide(sni="a.test", version="TLSv1.3", cipher="X", alpn="h2", alpn_offer=("h2", "http/1.1"),
                   verified=True, verify_code=0, verify_result="ok",
                   cert=CertInfo("CN=a", "CN=ca", ("DNS:a.test",), "00", "then", "later"))
    flow = Flow(client_addr="127.0.0.1:1", mode="https", tls=TlsInfo(client=side, upstream=side),
                request=Request(method="GET", host="a.test", target="/é", headers=[(b"Host", b"a.test")]),
                response=Response(status=200, reason="OK", headers=[(b"X", b"\xe9")]))
    record = flow.to_dict()
    facts = record["tls"]["upstream"]
    assert type(facts) is Facts and isinstance(facts, dict) and facts["cert"]["subject"] == "CN=a"
    import orjson

    assert facts.json is not None and orjson.dumps(facts.json) == json.dumps(dict(facts), separators=(",", ":")).encode()
    assert dumps_line(record) == _stdlib_line(record)
    assert dumps(record) + "\n" == _stdlib_line(record).decode("utf-8")
    # Other subclasses of the JSON types are written as their base type, as the encoder does without the
    # hook the facts need (OPT_PASSTHROUGH_SUBCLASS), enums as their value.
    class Text(str):
        def __str__(self):
            return "not this"

    class Num(int):
        pass

    odd = {"t": Text("x"), "n": Num(3), "d": type("D", (dict,), {})(a=1), "l": type("L", (list,), {})([1]),
           "reason": CertReason.EXPIRED, "b": True}
    assert json.loads(dumps_line(odd)) == {"t": "x", "n": 3, "d": {"a": 1}, "l": [1], "reason": CertReason.EXPIRED.value,
                                           "b": True}
    with pytest.raises(TypeError):
        dumps_line({"x": object()})


def test_tls_facts_with_a_lone_surrogate_are_written_by_the_fallback():
    """orjson refuses lone surrogates (surrogateescape'd input): such facts carry no text, and the
    record goes to the stdlib encoder, which writes the escape."""
    from proxy.flow import dumps_line

    side = TlsSide(sni="bad\udcff.test")
    record = Flow(client_addr="c", mode="https", tls=TlsInfo(client=side)).to_dict()
    assert record["tls"]["client"].json is None
    line = dumps_line(record)
    assert b'"sni":"bad\\udcff.test"' in line and json.loads(line)["tls"]["client"]["sni"] == "bad\udcff.test"
