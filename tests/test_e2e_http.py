"""End to end, HTTP/1.1 relaying: keep-alive, framing (chunked, close-delimited, HEAD/204/304), encoded
bodies passed through unchanged but logged decoded, big bodies streamed in bounded memory, uploads,
100-continue, and plain-HTTP forward proxying."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess

import pytest

from helpers import clean_env, client_context, https
from origin import CHUNKED_BODY, CLOSE_BODY, ENCODED, HELLO_BODY, JSON_BODY, TEXT, pattern_chunks, pattern_sha256

MiB = 1024 * 1024


def test_keep_alive_several_requests_one_tunnel(proxy, origin, token):
    urls = [f"https://good.test/hello?t={token}", f"https://good.test/json?t={token}",
            f"https://good.test/chunked?t={token}", f"https://good.test/status/204?t={token}",
            f"https://good.test/hello?t={token}&again"]
    r = proxy.curl("--connect-to", f"good.test:443:127.0.0.1:{origin.port}", "-w", "[%{http_code} %{num_connects}]",
                   *urls)
    assert r.rc == 0, str(r)
    assert r.out == (HELLO_BODY + b"[200 1]" + JSON_BODY + b"[200 0]" + CHUNKED_BODY + b"[200 0]" + b"[204 0]"
                     + HELLO_BODY + b"[200 0]")
    flows = proxy.flows(len(urls))
    assert [f["request"]["url"] for f in flows] == urls
    assert [f["response"]["status"] for f in flows] == [200, 200, 200, 204, 200]
    assert len({f["client"] for f in flows}) == 1  # one client connection: one tunnel
    assert len(origin.requests_with(token)) == len(urls)


def test_chunked_response_relayed(proxy, origin, token):
    r = proxy.curl(*https("good.test", origin, f"/chunked?t={token}"))
    assert r.rc == 0 and r.out == CHUNKED_BODY, str(r)
    body = proxy.flow()["response"]["body"]
    assert body["size"] == len(CHUNKED_BODY)
    assert body["text"] == CHUNKED_BODY.decode()


def test_close_delimited_response_relayed(proxy, origin, token):
    r = proxy.curl(*https("good.test", origin, f"/close?t={token}"))
    assert r.rc == 0 and r.out == CLOSE_BODY, str(r)
    f = proxy.flow()
    assert f["response"]["status"] == 200 and f["response"]["body"]["size"] == len(CLOSE_BODY)


@pytest.mark.parametrize("enc", sorted(ENCODED))
def test_encoded_body_passes_unchanged_and_is_logged_decoded(proxy, origin, token, enc):
    r = proxy.curl("-D", "/dev/stderr", *https("good.test", origin, f"/{enc}?t={token}"))  # no --compressed
    assert r.rc == 0, str(r)
    assert r.out == ENCODED[enc], "the client must receive the origin's encoded bytes unchanged"
    assert f"content-encoding: {enc}" in r.err.lower()
    body = proxy.flow()["response"]["body"]
    assert body["content_encoding"] == enc
    assert body["size"] == len(ENCODED[enc])
    assert body["decoded_size"] == len(TEXT)
    assert body["text"] == TEXT.decode("utf-8")


@pytest.mark.parametrize("status", [404, 500])
def test_error_statuses_relayed(proxy, origin, token, status):
    r = proxy.curl("-w", "%{http_code}", *https("good.test", origin, f"/status/{status}?t={token}"))
    assert r.rc == 0 and r.out == f"status {status}\n{status}".encode(), str(r)
    f = proxy.flow()
    assert f["response"]["status"] == status and f["error"] is None


def test_request_headers_reach_origin_in_order_and_case(proxy, origin, token):
    r = proxy.curl("-H", "X-First: 1", "-H", "x-SeCoNd: two", "-H", "X-Third: 3",
                   *https("good.test", origin, f"/headers?t={token}"))
    assert r.rc == 0, str(r)
    lines = r.out.decode().splitlines()
    wanted = ("host", "user-agent", "accept", "x-first", "x-second", "x-third")
    seen = [ln for ln in lines if ln.split(":", 1)[0].lower() in wanted]
    assert seen[0] == "Host: good.test"
    assert seen[3:] == ["X-First: 1", "x-SeCoNd: two", "X-Third: 3"]
    assert [ln.split(":")[0] for ln in seen] == ["Host", "User-Agent", "Accept", "X-First", "x-SeCoNd", "X-Third"]


def test_head_204_304_keep_alive(proxy, origin, token):
    """Bodiless responses (HEAD with a Content-Length, 204, 304) must not desynchronise the tunnel."""
    conn = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=client_context(proxy.ca_pem), timeout=15)
    conn.set_tunnel("localhost", origin.port)
    plan = [("HEAD", "/bytes?n=5000", 200, b""), ("GET", "/status/204", 204, b""), ("GET", "/status/304", 304, b""),
            ("HEAD", "/hello", 200, b""), ("GET", "/hello", 200, HELLO_BODY), ("GET", "/json", 200, JSON_BODY)]
    sock = None
    try:
        for method, path, status, body in plan:
            conn.request(method, f"{path}{'&' if '?' in path else '?'}t={token}")
            r = conn.getresponse()
            assert (r.status, r.read()) == (status, body), (method, path)
            if method == "HEAD" and path.startswith("/bytes"):
                assert r.getheader("Content-Length") == "5000"
            sock = sock or conn.sock
            assert conn.sock is sock, f"the tunnel was re-opened before {method} {path}"
    finally:
        conn.close()
    flows = proxy.flows(len(plan))
    assert [f["response"]["status"] for f in flows] == [s for _, _, s, _ in plan]
    assert [f["request"]["method"] for f in flows] == [m for m, _, _, _ in plan]
    assert len({f["client"] for f in flows}) == 1
    assert len(origin.requests_with(token)) == len(plan)


def test_expect_100_continue(proxy, origin, token, tmp_path):
    data = bytes(range(256)) * 40
    f = tmp_path / "small.bin"
    f.write_bytes(data)
    r = proxy.curl("-v", "--data-binary", f"@{f}", "-H", "Expect: 100-continue", "--expect100-timeout", "10",
                   *https("good.test", origin, f"/upload?t={token}"))
    assert r.rc == 0, str(r)
    got = json.loads(r.out)
    assert got["size"] == len(data) and got["sha256"] == hashlib.sha256(data).hexdigest()
    assert "HTTP/1.1 100 Continue" in r.err, "the interim 100 response must reach the client"
    assert "Done waiting for 100-continue" not in r.err


def _write_pattern(path, n: int) -> None:
    with open(path, "wb") as fh:
        for piece in pattern_chunks(n):
            fh.write(piece)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_upload_streams(proxy, origin, token, tmp_path, framing):
    n = 50 * MiB + 123
    f = tmp_path / "big.bin"
    _write_pattern(f, n)
    args = ["-X", "POST", "-T", str(f), "-H", "Content-Type: application/octet-stream", "--expect100-timeout", "30"]
    if framing == "chunked":
        args += ["-H", "Transfer-Encoding: chunked"]
    r = proxy.curl(*args, *https("good.test", origin, f"/upload?t={token}"), timeout=120)
    assert r.rc == 0, str(r)
    got = json.loads(r.out)
    assert got["size"] == n
    assert got["sha256"] == pattern_sha256(n)
    body = proxy.flow()["request"]["body"]
    assert body["size"] == n and body["truncated"] is True
    hwm = proxy.vm_hwm_kib()
    print(f"proxy VmHWM after a {n >> 20} MiB {framing} upload: {hwm / 1024:.1f} MiB")
    assert hwm < 150 * 1024, f"proxy peak RSS {hwm} KiB"


def test_large_download_bounded_memory(proxy, origin, token, record_property):
    n = 200 * MiB
    cmd = ["curl", "-sS", "--max-time", "180", "-x", proxy.url, "--cacert", str(proxy.ca_pem),
           *https("good.test", origin, f"/bytes?n={n}&t={token}"), "-o", "-",
           "-w", "%{stderr}\nsize=%{size_download} code=%{http_code}"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    h = hashlib.sha256()
    total = 0
    while chunk := p.stdout.read(MiB):
        h.update(chunk)
        total += len(chunk)
    err = p.stderr.read().decode()
    assert p.wait(60) == 0, err
    assert f"size={n} code=200" in err
    assert total == n
    assert h.hexdigest() == pattern_sha256(n)
    hwm = proxy.vm_hwm_kib()
    record_property("proxy_vm_hwm_kib", hwm)
    print(f"proxy VmHWM after a 200 MiB download: {hwm / 1024:.1f} MiB")
    assert hwm < 150 * 1024, f"proxy peak RSS {hwm} KiB after relaying {n} bytes"
    body = proxy.flow()["response"]["body"]
    assert body["size"] == n
    assert body["captured"] == MiB
    assert body["truncated"] is True


def test_plain_http_forward_proxy(proxy, origins, token):
    o = origins["plain"]
    url = f"http://127.0.0.1:{o.port}/hello?t={token}"
    r = proxy.curl("-w", "\n%{http_code}", url)
    assert r.rc == 0 and r.out == HELLO_BODY + b"\n200", str(r)
    [seen] = o.requests_with(token)
    assert seen.target == f"/hello?t={token}", "the origin must get the origin-form request-target"
    f = proxy.flow()
    assert f["mode"] == "http"
    assert f["request"]["scheme"] == "http"
    assert f["request"]["url"] == url
    assert f["response"]["status"] == 200
    assert f["error"] is None


def test_plain_http_forward_keep_alive(proxy, origins, token):
    o = origins["plain"]
    urls = [f"http://127.0.0.1:{o.port}/hello?t={token}", f"http://127.0.0.1:{o.port}/json?t={token}"]
    r = proxy.curl("-w", "[%{num_connects}]", *urls)
    assert r.rc == 0 and r.out == HELLO_BODY + b"[1]" + JSON_BODY + b"[0]", str(r)
    flows = proxy.flows(2)
    assert [f["request"]["url"] for f in flows] == urls
