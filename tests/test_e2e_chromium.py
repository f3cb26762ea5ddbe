"""A real browser through the real proxy: headless Chromium loads an HTTPS page whose script and image
come over HTTPS too, trusting httpsdump's CA from a fresh NSS database made by `httpsdump ca trust --nss`.

How it stays on 127.0.0.0/8:
* Chromium never proxies loopback hosts by default (its "implicit bypass rules"); the documented
  bypass rule ``<-loopback>`` removes them, so https://localhost:PORT/ goes through the proxy
  (CONNECT localhost:PORT), and httpsdump resolves ``localhost`` itself.
* Chromium's proxy is a small guard in this file that hands CONNECT requests for the page's two
  host:port pairs to httpsdump byte for byte, and refuses (403) and records anything else. So nothing
  Chromium might fetch on its own can reach httpsdump and leave the machine, and the test asserts the
  guard refused nothing: Chromium tried to reach nothing else. (``--host-rules`` cannot do this:
  Chromium does not apply it to proxied requests.) The background fetches Chromium 156 still makes
  with --disable-background-networking (network time, on-demand components, the Google account cookie
  check) are switched off or pointed at 127.0.0.1:9 by the flags in run_chromium().
* ``--host-resolver-rules`` makes every name but localhost fail to resolve inside Chromium, for any
  connection that would not use the proxy.
* HOME, the NSS database and the profile are temporary directories; nothing of the machine is changed.

Needs the Debian packages ``chromium`` and ``libnss3-tools`` (.ci/run installs them).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ca import trust
from helpers import clean_env, poll
from h2origin import start_h2origin  # noqa: F401  (fixture)
from origin import server_context

CHROMIUM_TIMEOUT = 90  # seconds for one Chromium run (a cold start on a slow CI machine takes ~5 s)
IMAGE_SIZE = (3, 2)


def _png(width: int, height: int) -> bytes:
    """A valid RGB PNG of width x height red pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>httpsdump e2e</title><link rel="icon" href="data:,"></head>
<body>
<p id="out">the script did not run</p>
<img id="img" alt="pixel" src="https://127.0.0.1:{port}/pixel.png?t={token}">
<script src="/app.js?t={token}"></script>
</body></html>
"""

SCRIPT = """
(function () {
  var out = document.getElementById('out');
  var img = document.getElementById('img');
  out.textContent = 'script ran';
  function report() {
    var ok = img.complete && img.naturalWidth > 0;
    out.textContent = 'script ran; image ' + (ok ? 'loaded ' + img.naturalWidth + 'x' + img.naturalHeight : 'failed');
  }
  if (img.complete) { report(); } else { img.addEventListener('load', report); img.addEventListener('error', report); }
})();
"""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802
        site: "PageOrigin" = self.server.site  # type: ignore[attr-defined]
        parts = urlsplit(self.path)
        site.seen.append((self.headers.get("Host", ""), self.path))
        token = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p).get("t", "")
        if parts.path == "/":
            body, ctype = PAGE.format(port=site.port, token=token).encode(), "text/html; charset=utf-8"
        elif parts.path == "/app.js":
            body, ctype = SCRIPT.encode(), "application/javascript"
        elif parts.path == "/pixel.png":
            body, ctype = _png(*IMAGE_SIZE), "image/png"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep the test output clean
        pass


class PageOrigin:
    """An HTTPS origin on 127.0.0.1 with the test PKI's "good" certificate (localhost, 127.0.0.1)."""

    def __init__(self, leaf):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.site = self
        ctx = server_context(leaf.serve, leaf.key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.seen: list[tuple[str, str]] = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "PageOrigin":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class Guard:
    """Chromium's proxy: passes CONNECT requests for `allowed` (host, port) pairs on to httpsdump at
    127.0.0.1:`upstream_port` verbatim and then relays bytes both ways; answers everything else 403 and
    records its request line in `refused`."""

    def __init__(self, upstream_port: int, allowed: set[tuple[str, int]]):
        self.upstream_port = upstream_port
        self.allowed = allowed
        self.passed: list[str] = []
        self.refused: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def __enter__(self) -> "Guard":
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(10)
        self.sock.close()
        with self._lock:
            for c in self._conns:
                c.close()

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(CHROMIUM_TIMEOUT)
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data or len(head) > 65536:
                    return
                head += data
        except OSError:
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = line.partition(" ")
        target = rest.rsplit(" ", 1)[0]
        host, _, port = target.rpartition(":")
        ok = method == "CONNECT" and port.isdigit() and (host.strip("[]").lower(), int(port)) in self.allowed
        with self._lock:
            (self.passed if ok else self.refused).append(line)
        if not ok:
            with contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            return
        up.settimeout(CHROMIUM_TIMEOUT)
        with self._lock:
            self._conns.append(up)
        up.sendall(head)
        self._spawn(self._pipe, up, conn)
        self._pipe(conn, up)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "this test needs Chromium: apt-get install chromium libnss3-tools (.ci/run does it)"
    return exe


def run_chromium(url: str, proxy_port: int, home: Path, profile: Path) -> subprocess.CompletedProcess:
    args = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
        "--disable-extensions", "--disable-default-apps", "--disable-breakpad", "--disable-domain-reliability",
        "--disable-client-side-phishing-detection", "--metrics-recording-only", "--password-store=basic",
        "--use-mock-keychain",
        # Chromium's own background fetches, each seen in this test's guard before it was switched off:
        "--disable-features=NetworkTimeServiceQuerying,Translate,OptimizationHints,MediaRouter",  # clients2.google.com/time
        "--component-updater=url-source=http://127.0.0.1:9/update",  # on-demand components: update.googleapis.com
        "--gaia-url=http://127.0.0.1:9",  # the account cookie check: accounts.google.com/ListAccounts
        f"--user-data-dir={profile}",
        f"--proxy-server=http://127.0.0.1:{proxy_port}",
        "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=10000",
        "--dump-dom", url,
    ]
    # A certificate error makes Chromium probe for a captive portal (connectivitycheck.gstatic.com); the
    # probe follows this profile preference, which no command-line flag controls.
    (profile / "Default").mkdir(parents=True, exist_ok=True)
    (profile / "Default" / "Preferences").write_text(json.dumps({"alternate_error_pages": {"enabled": False}}))
    env = clean_env(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
                    XDG_RUNTIME_DIR=str(home / "run"))
    (home / "run").mkdir(mode=0o700, exist_ok=True)
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"Chromium did not finish within {CHROMIUM_TIMEOUT}s\n--- stderr ---\n"
                             f"{(e.stderr or b'')[-4000:]!r}") from None


def test_chromium_loads_https_page_script_and_image_through_the_proxy(start_proxy, pki, tmp_path, token,
                                                                          monkeypatch):
    _chromium()
    proxy = start_proxy()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    out = io.StringIO()
    assert trust.cmd_trust(proxy.confdir, "", False, out) == 0  # `httpsdump ca trust --nss`: the default DB
    assert f"to NSS database sql:{home}/.pki/nssdb" in out.getvalue()

    with PageOrigin(pki["good"]) as site:
        allowed = {("localhost", site.port), ("127.0.0.1", site.port)}
        with Guard(proxy.port, allowed) as guard:
            url = f"https://localhost:{site.port}/?t={token}"
            t0 = time.monotonic()
            p = run_chromium(url, guard.port, home, tmp_path / "profile")
            took = time.monotonic() - t0
        diag = (f"Chromium exit {p.returncode} after {took:.1f}s; guard passed {guard.passed}, refused {guard.refused}"
                f"\n--- dom ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}")
        assert p.returncode == 0, diag
        # the script ran and saw the image decoded (naturalWidth > 0), both fetched over HTTPS
        w, h = IMAGE_SIZE
        assert f'<p id="out">script ran; image loaded {w}x{h}</p>' in p.stdout, diag

        # Chromium tried to reach nothing but the page's two loopback origins.
        assert guard.refused == [], diag
        assert {line.split(" ")[1] for line in guard.passed} == {f"localhost:{site.port}", f"127.0.0.1:{site.port}"}, diag

        # The origin got exactly the three requests, each by the name the page used.
        assert sorted((host, urlsplit(path).path) for host, path in site.seen) == [
            (f"127.0.0.1:{site.port}", "/pixel.png"), (f"localhost:{site.port}", "/"),
            (f"localhost:{site.port}", "/app.js")], site.seen

    # ... all three went through httpsdump, decrypted, with the origin's certificate verified.
    flows = proxy.flows(3, timeout=15)
    got = {(f["request"]["host"], f["request"]["port"], urlsplit(f["request"]["target"]).path): f for f in flows}
    assert len(flows) == 3 and set(got) == {("localhost", site.port, "/"), ("localhost", site.port, "/app.js"),
                                            ("127.0.0.1", site.port, "/pixel.png")}, sorted(got)
    for f in flows:
        assert f["mode"] == "https" and f["error"] is None, f
        assert f["response"]["status"] == 200
        assert f["tls"]["upstream"]["verified"] is True and f["insecure"] is False
        assert token in f["request"]["target"]
        assert "Chrome/" in dict((k.lower(), v) for k, v in f["request"]["headers"])["user-agent"]
    assert got[("localhost", site.port, "/")]["tls"]["client"]["sni"] == "localhost"
    assert got[("127.0.0.1", site.port, "/pixel.png")]["tls"]["client"]["sni"] is None  # no SNI for IP literals
    assert got[("127.0.0.1", site.port, "/pixel.png")]["response"]["body"]["content_type"] == "image/png"
    assert "script ran" in got[("localhost", site.port, "/app.js")]["response"]["body"]["text"]


def test_chromium_loads_the_page_over_http2_end_to_end(start_proxy, start_h2origin, pki, tmp_path, token, monkeypatch):
    """Issue #7: Chromium offers h2; the origin speaks h2; so both sides of the proxy speak h2 (ALPN
    mirrored) and every stream is a flow."""
    _chromium()
    proxy = start_proxy()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert trust.cmd_trust(proxy.confdir, "", False, io.StringIO()) == 0

    def page(req) -> bytes:
        return PAGE.format(port=site.port, token=req.query.get("t", [""])[0]).encode()

    site = start_h2origin(pages={"/": ("text/html; charset=utf-8", page),
                                 "/app.js": ("application/javascript", SCRIPT.encode()),
                                 "/pixel.png": ("image/png", _png(*IMAGE_SIZE))})
    allowed = {("localhost", site.port), ("127.0.0.1", site.port)}
    with Guard(proxy.port, allowed) as guard:
        p = run_chromium(f"https://localhost:{site.port}/?t={token}", guard.port, home, tmp_path / "profile")
    diag = (f"Chromium exit {p.returncode}; guard passed {guard.passed}, refused {guard.refused}"
            f"\n--- dom ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}")
    w, h = IMAGE_SIZE
    assert f'<p id="out">script ran; image loaded {w}x{h}</p>' in p.stdout, diag
    assert guard.refused == [], diag
    reqs = site.wait_requests(3)
    assert sorted(r.path for r in reqs) == ["/", "/app.js", "/pixel.png"]
    assert all(r.alpn == "h2" for r in reqs)  # the origin was spoken to in h2 ...
    flows = proxy.flows(3, timeout=15)
    for f in flows:  # ... and so was Chromium, one flow per stream
        assert f["error"] is None and f["response"]["status"] == 200, f
        assert f["request"]["http_version"] == "2" and isinstance(f.get("stream_id"), int), f
        assert f["tls"]["client"]["alpn"] == "h2" and f["tls"]["upstream"]["alpn"] == "h2"
        assert "h2" in f["tls"]["client"]["alpn_offer"]
        assert f["tls"]["upstream"]["verified"] is True
        assert token in f["request"]["target"]
    by_path = {urlsplit(f["request"]["target"]).path: f for f in flows}
    assert by_path["/pixel.png"]["response"]["body"]["content_type"] == "image/png"
    assert "script ran" in by_path["/app.js"]["response"]["body"]["text"]


def test_chromium_without_the_ca_in_its_nss_database_refuses_the_proxy(start_proxy, pki, tmp_path, token):
    """The control: the same run with an empty NSS database fails, so the trust above is what made
    Chromium accept httpsdump's certificates (no flag makes it ignore certificate errors)."""
    _chromium()
    proxy = start_proxy()
    home = tmp_path / "home"
    home.mkdir()
    with PageOrigin(pki["good"]) as site:
        with Guard(proxy.port, {("localhost", site.port), ("127.0.0.1", site.port)}) as guard:
            p = run_chromium(f"https://localhost:{site.port}/?t={token}", guard.port, home, tmp_path / "profile")
        diag = f"Chromium exit {p.returncode}; guard {guard.passed} {guard.refused}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        assert "script ran" not in p.stdout, diag
        assert "ERR_CERT_AUTHORITY_INVALID" in p.stdout + p.stderr, diag
        assert guard.refused == [], diag
        assert site.seen == [], "no request may reach the origin when the client refused the proxy's certificate"
    flows = proxy.flows(1, timeout=15)
    assert all(f["error"] and f["error"]["kind"] == "client_tls" for f in flows), flows
    assert all(f["request"] is None for f in flows), flows
