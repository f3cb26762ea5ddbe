"""Shared test helpers: running curl, starting the real proxy as a subprocess, raw sockets and tunnels.

Everything here talks only to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(rb"httpsdump: listening on 127\.0\.0\.1:(\d+)")
CA_NAME = "httpsdump-ca.pem"


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without proxy variables (curl and urllib honour them), with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def poll(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Call `predicate()` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def tcp_connections_to(pid: int, port: int) -> int:
    """How many TCP sockets process `pid` holds whose remote end is 127.0.0.1:`port` (any state but
    TIME_WAIT), from /proc: the inodes of its socket descriptors matched against /proc/net/tcp."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if inode in inodes and state != "06" and int(remote.split(":")[1], 16) == port:
                count += 1
    return count


# --- curl -------------------------------------------------------------------------------------


@dataclass
class CurlResult:
    rc: int
    out: bytes
    err: str
    args: list[str]

    def __iter__(self):  # allows: rc, out, err = curl(...)
        return iter((self.rc, self.out, self.err))

    def __str__(self) -> str:
        return f"curl rc={self.rc}\n  cmd: {' '.join(self.args)}\n  stderr: {self.err.strip()}\n  stdout: {self.out[:500]!r}"


def run_curl(*args: str, proxy_url: str | None = None, cacert: Path | str | None = None,
             timeout: float = 20, input: bytes | None = None) -> CurlResult:
    cmd = ["curl", "-sS", "--max-time", str(timeout)]
    cmd += ["-x", proxy_url] if proxy_url else ["--noproxy", "*"]
    if cacert is not None:
        cmd += ["--cacert", str(cacert)]
    cmd += [str(a) for a in args]
    p = subprocess.run(cmd, capture_output=True, input=input, timeout=timeout + 15, env=clean_env())
    return CurlResult(p.returncode, p.stdout, p.stderr.decode("utf-8", "replace"), cmd)


def connect_to(name: str, port: int, url_port: int = 443) -> list[str]:
    """curl args to reach 127.0.0.1:`port` while the URL, SNI and Host say `name`."""
    return ["--connect-to", f"{name}:{url_port}:127.0.0.1:{port}"]


# --- raw HTTP over sockets ----------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def read_response(rfile, method: str = "GET") -> RawResponse:
    """Read one HTTP/1.1 response from a buffered binary file (skips 1xx interim responses)."""
    while True:
        head = b""
        while True:
            line = rfile.readline(65537)
            if not line:
                raise ConnectionError(f"connection closed while reading a response head (got {head!r})")
            head += line
            if line in (b"\r\n", b"\n"):
                break
        lines = head.decode("latin-1").split("\r\n")
        first = lines[0].split(" ", 2)
        status = int(first[1])
        reason = first[2] if len(first) > 2 else ""
        headers = []
        for h in lines[1:]:
            if h:
                k, _, v = h.partition(":")
                headers.append((k, v.strip()))
        if not 100 <= status < 200 or status == 101:
            break
    resp = RawResponse(status, reason, headers, b"", head)
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return resp
    if method == "CONNECT" and 200 <= status < 300:
        return resp
    te = (resp.header("Transfer-Encoding") or "").lower()
    cl = resp.header("Content-Length")
    if "chunked" in te:
        body = bytearray()
        while True:
            size = int(rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += rfile.read(size)
            rfile.readline()
        resp.body = bytes(body)
    elif cl is not None:
        resp.body = rfile.read(int(cl))
    else:
        resp.body = rfile.read()
    return resp


def raw_exchange(port: int, data: bytes, method: str = "GET", timeout: float = 10) -> RawResponse:
    """Send raw bytes to 127.0.0.1:port and read one response (tolerates the peer closing early)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything we send
        with s.makefile("rb") as f:
            return read_response(f, method)


@dataclass
class Tunnel:
    connect: RawResponse       # the proxy's answer to CONNECT
    sock: ssl.SSLSocket | None  # TLS to the proxy through the tunnel (None when CONNECT was refused)
    rfile: object = None

    def request(self, data: bytes, method: str = "GET") -> RawResponse:
        assert self.sock is not None
        self.sock.sendall(data)
        return read_response(self.rfile, method)

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.rfile.close()
                self.sock.close()
            except OSError:
                pass

    def __enter__(self) -> "Tunnel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def client_context(cafile: Path | str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def open_tunnel(proxy_port: int, target: str, sni: str | None, cafile: Path | str, timeout: float = 15) -> Tunnel:
    """CONNECT `target` ("host:port") through the proxy, then TLS with `sni` (None: no SNI, verify the IP
    127.0.0.1 instead) trusting `cafile`. When CONNECT is answered with an error, `sock` is None."""
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=timeout)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    # Read the CONNECT answer byte by byte: no read-ahead into the TLS stream that follows.
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        c = s.recv(1)
        if not c:
            s.close()
            raise ConnectionError(f"proxy closed the connection after {head!r}")
        head += c
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [tuple(x.strip() for x in h.split(":", 1)) for h in lines[1:] if h]
    connect = RawResponse(status, lines[0].split(" ", 2)[-1], headers, b"", head)
    if not 200 <= status < 300:
        body = b""
        cl = connect.header("Content-Length")
        try:
            while cl is None or len(body) < int(cl):
                c = s.recv(65536)
                if not c:
                    break
                body += c
        except OSError:
            pass
        connect.body = body
        s.close()
        return Tunnel(connect, None)
    ctx = client_context(cafile)
    tls = ctx.wrap_socket(s, server_hostname=sni or "127.0.0.1")
    return Tunnel(connect, tls, tls.makefile("rb"))


# --- the proxy as a subprocess ------------------------------------------------------------------


class ProxyStartError(AssertionError):
    pass


class ProxyProc:
    """The real proxy (`python -m proxy`) running as a subprocess with its own confdir and log."""

    def __init__(self, workdir: Path, upstream_ca: Path | str | None, extra_args=(), *, confdir: Path | None = None,
                 verbose: bool = True, log_file: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.confdir = Path(confdir) if confdir is not None else self.workdir / "conf"
        self.log_path = self.workdir / "flows.jsonl"
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        args = [sys.executable, "-m", "proxy", "--listen-host", "127.0.0.1", "--listen-port", "0",
                "--confdir", str(self.confdir)]
        if upstream_ca is not None:
            args += ["--upstream-ca", str(upstream_ca)]
        if log_file:
            args += ["--log-file", str(self.log_path)]
        if verbose:
            args.append("-v")
        self.args = args + [str(a) for a in extra_args]
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._finished = False

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 20) -> "ProxyProc":
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=REPO_ROOT, env=clean_env())
        deadline = time.monotonic() + timeout
        while True:
            m = LISTEN_RE.search(self.stderr_bytes()) or LISTEN_RE.search(self.stdout_bytes())
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise ProxyStartError(
                    f"the proxy exited with code {self.proc.returncode} before listening\n"
                    f"cmd: {' '.join(self.args)}\n--- stderr ---\n{self.stderr_text()[-6000:]}\n"
                    f"--- stdout ---\n{self.stdout_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise ProxyStartError(
                    f"the proxy did not print 'httpsdump: listening on 127.0.0.1:PORT' within {timeout}s\n"
                    f"cmd: {' '.join(self.args)}\n--- stderr ---\n{self.stderr_text()[-6000:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, term_timeout: float = 10) -> None:
        """Stop the proxy now (a test that needs it gone, e.g. to change its confdir); fails the test
        when it had died or printed a traceback."""
        problems = self.finish(term_timeout)
        assert not problems, "\n".join(problems)

    def finish(self, term_timeout: float = 10) -> list[str]:
        """Stop the proxy (SIGTERM, then SIGKILL after `term_timeout`); return the problems seen:
        it had died during the test, or a traceback was printed. Only the first call does anything."""
        problems: list[str] = []
        if self.proc is None or self._finished:
            return problems
        self._finished = True
        rc = self.proc.poll()
        if rc is not None:
            problems.append(f"the proxy process died during the test (exit code {rc})")
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(term_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        text = self.stderr_text() + self.stdout_text()
        if "Traceback (most recent call last)" in text:
            problems.append("the proxy printed a traceback")
        if problems:
            problems.append(f"cmd: {' '.join(self.args)}\n--- proxy stderr (tail) ---\n{self.stderr_text()[-8000:]}")
        return problems

    # --- what it gives ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> Path:
        return self.confdir / CA_NAME

    def stderr_bytes(self) -> bytes:
        try:
            return self.stderr_path.read_bytes()
        except FileNotFoundError:
            return b""

    def stdout_bytes(self) -> bytes:
        try:
            return self.stdout_path.read_bytes()
        except FileNotFoundError:
            return b""

    def stderr_text(self) -> str:
        return self.stderr_bytes().decode("utf-8", "replace")

    def stdout_text(self) -> str:
        return self.stdout_bytes().decode("utf-8", "replace")

    def read_flows(self) -> list[dict]:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in data.split(b"\n")[:-1]:  # only complete lines
            if line.strip():
                out.append(json.loads(line))
        return out

    def flows(self, count: int | None = None, timeout: float = 10) -> list[dict]:
        """The JSONL flow records; with `count`, wait (up to `timeout`) until at least that many exist."""
        if count is None:
            return self.read_flows()
        deadline = time.monotonic() + timeout
        while True:
            recs = self.read_flows()
            if len(recs) >= count:
                return recs
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} flow record(s) in {self.log_path}, found {len(recs)} after {timeout}s: "
                    f"{json.dumps(recs)[:2000]}\n--- proxy stderr (tail) ---\n{self.stderr_text()[-3000:]}")
            time.sleep(0.02)

    def flow(self, timeout: float = 10) -> dict:
        """The one flow record of a test that made exactly one exchange."""
        recs = self.flows(1, timeout)
        assert len(recs) == 1, f"expected exactly one flow, got {len(recs)}: {json.dumps(recs)[:2000]}"
        return recs[0]

    def vm_hwm_kib(self) -> int:
        """Peak resident set size of the proxy process (VmHWM), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/PID/status")

    def curl(self, *args: str, timeout: float = 20, cacert: Path | str | None = None,
             input: bytes | None = None) -> CurlResult:
        return run_curl(*args, proxy_url=self.url, cacert=cacert or self.ca_pem, timeout=timeout, input=input)

    def tunnel(self, target: str, sni: str | None, timeout: float = 15) -> Tunnel:
        return open_tunnel(self.port, target, sni, self.ca_pem, timeout)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`python -m proxy ARGS...` to completion (for the commands that exit: ca show, bad config ...).
    A command that does not exit within `timeout` is killed and fails the test."""
    cmd = [sys.executable, "-m", "proxy", *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout, cwd=REPO_ROOT, env=clean_env(),
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode("utf-8", "replace")
        raise AssertionError(f"{' '.join(cmd)} did not exit within {timeout}s\n--- stderr ---\n{err[-4000:]}") from None


# --- small things the end-to-end tests share ------------------------------------------------------


def https(name: str, origin, path: str) -> list[str]:
    """curl args for https://NAME/PATH served by `origin` (via --connect-to, so SNI and Host are NAME)."""
    return [*connect_to(name, origin.port), f"https://{name}{path}"]


def norm_fp(fp: str) -> str:
    """A fingerprint as lower-case hex without separators ("AB:CD" -> "abcd")."""
    return re.sub(r"[^0-9a-f]", "", fp.lower())


PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def pem_certs(data: bytes) -> list:
    from cryptography import x509

    return [x509.load_pem_x509_certificate(m.group(0)) for m in PEM_CERT_RE.finditer(data)]
