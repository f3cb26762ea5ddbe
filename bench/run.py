#!/usr/bin/env python3
"""httpsdump benchmark harness (standard library only). Start it with bench/run, which installs the tools.

Targets: direct (no proxy), tunnel (a non-inspecting Go CONNECT relay), httpsdump, mitmdump.
Workloads: see WORKLOADS below and bench/README.md. Everything runs on 127.0.0.1 only, every load
run is bounded in requests and seconds, and every process started here is stopped here.

CPU placement (2 cores): the proxy under test alone on CPU 1; nginx and the load client on CPU 0.
httpsdump-w2 (--workers 2) is the exception: it is pinned to both CPUs, so it shares CPU 0 with nginx
and the client (two workers on one CPU would only measure time-slicing).
The proxy's CPU time is read from /proc (utime+stime, all threads) of the proxy's whole process tree
(httpsdump's logger process and workers included; children that exited and were reaped count through
cutime+cstime) right before and right after the timed phase (the client waits for the harness between
its warm-up and the timed phase). RSS figures are the sum over the same tree.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = Path(os.environ.get("BENCH_WORK", BENCH / ".work"))
CLIENT = BENCH / ".build" / "loadclient"
HTTPSDUMP_PY = Path(os.environ.get("HTTPSDUMP_PYTHON", ROOT / ".venv" / "bin" / "python"))
MITM_VENV = Path(os.environ.get("MITM_VENV", BENCH / ".venv-mitm"))
MITMDUMP = MITM_VENV / "bin" / "mitmdump"
PYSPY = MITM_VENV / "bin" / "py-spy"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
BIG_SIZE = 100_000_000
ORIGIN_CPU, PROXY_CPU, CLIENT_CPU = "0", "1", "0"
CLEAN_PCT = 25.0  # a run is "clean" when other processes took < 25 % of a CPU during its timed phase
if (os.cpu_count() or 1) < 2:
    ORIGIN_CPU = PROXY_CPU = CLIENT_CPU = "0"

# name: (client mode, path, concurrency, extra client args, unit, targets that run it)
# httpsdump = its defaults plus the issue's flags (JSONL log on; the SQLite flow store, on by default
# since it exists, goes to a fresh file per run); httpsdump-nostore = the same with --no-store.
# httpsdump-w2 = httpsdump with --workers 2 (pinned to both CPUs; see the docstring).
ALL_TARGETS = ["direct", "tunnel", "httpsdump", "httpsdump-nostore", "httpsdump-w2", "httpsdump-asyncio", "mitmdump"]
PROXIES = ["tunnel", "httpsdump", "httpsdump-nostore", "httpsdump-w2", "httpsdump-asyncio", "mitmdump"]
HTTPSDUMP_TARGETS = ["httpsdump", "httpsdump-nostore", "httpsdump-w2", "httpsdump-asyncio"]
WORKLOADS = {
    "ka_c1":       dict(mode="ka", path="/small", c=1, unit="req", args=["-expect-size", "100"]),
    "ka_c50":      dict(mode="ka", path="/small", c=50, unit="req", args=["-expect-size", "100"]),
    "ka_c50_16k":  dict(mode="ka", path="/16k", c=50, unit="req", args=["-expect-size", "16384"]),
    "ka_c50_gzip": dict(mode="ka", path="/gz.json", c=50, unit="req", args=["-gzip"]),
    "newconn_c10": dict(mode="newconn", path="/small", c=10, unit="req", args=["-expect-size", "100"]),
    "mint_c10":    dict(mode="mint", path="/small", c=10, unit="name", args=["-expect-size", "100"]),
    "big_100MB":   dict(mode="big", path="/100m", c=1, unit="MB", args=["-expect-size", str(BIG_SIZE)]),
    "idle_500":    dict(mode="idle", path="/small", c=500, unit="conn", args=["-expect-size", "100"],
                        targets=PROXIES),
    # HTTP/2: 50 concurrent streams on 2 connections, to nginx's h2 listener; a target that does not
    # negotiate h2 with the client is reported as such (not_h2), with no numbers. No tunnel: it is opaque.
    "h2-ka":       dict(mode="h2", path="/small", c=50, unit="req", args=["-expect-size", "100", "-conns", "2"],
                        h2=True, targets=[t for t in ALL_TARGETS if t != "tunnel"]),
}

# Goals from issue #3 (httpsdump with its JSONL log on). KB/MB are binary (KiB/MiB).
GOALS = [
    ("ka_c50", "rate_vs_mitm", ">=", 15.0, "keep-alive c=50 req/s >= 15x mitmdump"),
    ("ka_c50", "cpu_us", "<=", 100.0, "keep-alive c=50 proxy CPU <= 100 us/request"),
    ("newconn_c10", "rate_vs_mitm", ">=", 4.4, "new connection c=10 req/s >= 4.4x mitmdump"),
    ("newconn_c10", "cpu_us", "<=", 1500.0, "new connection c=10 proxy CPU <= 1500 us/request"),
    ("mint_c10", "rate_vs_mitm", ">=", 4.5, "first-contact minting names/s >= 4.5x mitmdump"),
    ("big_100MB", "rate_vs_mitm", ">=", 3.0, "100 MB download MB/s >= 3x mitmdump"),
    ("big_100MB", "hwm_mib", "<=", 48.0, "100 MB download proxy peak RSS (VmHWM) <= 48 MiB"),
    ("idle_500", "kib_per_conn", "<=", 64.0, "idle intercepted connection <= 64 KiB each"),
]


# The issue's own scale for mitmdump ("measured here"), to read CPU figures of runs on a slower or faster
# machine: see cpu_vs_mitm().
ISSUE_MITM_CPU_US = {"ka_c50": 1700.0, "newconn_c10": 9700.0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ---- /proc ----------------------------------------------------------------------------------------

def cpu_s(pid: int) -> float:
    """utime+stime of the whole process (all threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_pids(pid: int) -> list[int]:
    """pid and all its live descendants (httpsdump's logger process and --workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a whole process tree: utime+stime of each live process, plus cutime+cstime
    (children that ended and were reaped). Only differences between two readings are used."""
    total = 0.0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended between the listing and now
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / CLK_TCK
    return total


def tree_status_kib(pid: int, key: str) -> int:
    """Sum of a /proc/PID/status figure (VmRSS, VmHWM) over the process tree: an upper bound, since
    pages a forked child still shares with its parent count in both."""
    total = 0
    for p in tree_pids(pid):
        try:
            total += status_kib(p, key)
        except OSError:
            pass
    return total


def cpus_busy_s() -> dict[str, float]:
    """Seconds of each CPU spent in processes (user, nice, system) or stolen by the hypervisor, from
    /proc/stat; interrupt time is left out (our own loopback traffic is processed there)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *v = line.split()
                v = [int(x) for x in v[:8]]  # user nice system idle iowait irq softirq steal
                out[name[3:]] = (v[0] + v[1] + v[2] + v[7]) / CLK_TCK
    return out


# ---- fixtures: PKI, files, nginx -------------------------------------------------------------------

def make_pki(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if (d / "origin.pem").exists() and (d / "ca.pem").exists():
        return
    log("bench: making the bench CA and the origin certificate (openssl)")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca.pem"), "-days", "3650", "-subj", "/CN=httpsdump bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(d / "origin-key.pem"), "-out", str(d / "origin.csr"), "-subj", "/CN=bench.test"])
    # No IP address in the SAN on purpose: a proxy that verified the CONNECT address (127.0.0.1)
    # instead of the client's SNI would fail, so a passing run proves verification uses the name.
    (d / "origin.ext").write_text(
        "subjectAltName=DNS:bench.test,DNS:*.bench.test\nextendedKeyUsage=serverAuth\n"
        "keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n")
    run(["openssl", "x509", "-req", "-in", str(d / "origin.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca-key.pem"),
         "-CAcreateserial", "-days", "365", "-sha256", "-extfile", str(d / "origin.ext"), "-out", str(d / "origin.pem")])


def make_www(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "small").exists():
        (d / "small").write_bytes(b"x" * 99 + b"\n")
    if not (d / "16k").exists():
        (d / "16k").write_bytes(os.urandom(16384))
    big = d / "100m"
    if not big.exists() or big.stat().st_size != BIG_SIZE:
        log("bench: writing a 100 MB random file for the download")
        with open(big, "wb") as f:
            for _ in range(BIG_SIZE // 1_000_000):
                f.write(os.urandom(1_000_000))
    if not (d / "gz.json.gz").exists():
        import gzip
        rows = [{"id": i, "name": f"item-{i}", "tags": ["alpha", "beta", "gamma"][: i % 3 + 1],
                 "price": round(i * 1.37, 2), "in_stock": i % 2 == 0} for i in range(700)]
        body = json.dumps(rows, indent=1).encode()
        (d / "gz.json").write_bytes(body)
        (d / "gz.json.gz").write_bytes(gzip.compress(body, 6))


class Nginx:
    def __init__(self, work: Path, pki: Path, www: Path):
        self.port = free_port()
        self.h2_port = free_port()  # the same server with HTTP/2 (ALPN h2), for the h2 workload only
        self.h2_log_port = free_port()  # the same again with an access log of the protocol: preflight_h2 only
        self.dir = work / "nginx"
        for sub in ("", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.h2_log = self.dir / "h2-protocols.log"

        def server(listen: str, extra: str = "") -> str:
            return f"""    server {{
        listen 127.0.0.1:{listen};{extra}
        server_name bench.test *.bench.test;
        ssl_certificate {pki}/origin.pem;
        ssl_certificate_key {pki}/origin-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        root {www};
        location = /small {{ default_type text/plain; }}
    }}"""
        conf = f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    log_format protocol '$server_protocol';
    client_body_temp_path {self.dir}/tmp/body;
    proxy_temp_path {self.dir}/tmp/proxy;
    fastcgi_temp_path {self.dir}/tmp/fastcgi;
    uwsgi_temp_path {self.dir}/tmp/uwsgi;
    scgi_temp_path {self.dir}/tmp/scgi;
    types {{ application/json json; }}
    default_type application/octet-stream;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    sendfile off;
    gzip_static on;
{server(f"{self.port} ssl default_server")}
    # HTTP/2 on its own port, so that the HTTP/1.1 workloads keep a listener without h2 (their client
    # offers ALPN http/1.1 only and checks what was selected). nginx 1.22: `http2` on `listen`;
    # http2_max_concurrent_streams is left at its default, 128.
{server(f"{self.h2_port} ssl http2")}
{server(f"{self.h2_log_port} ssl http2", f" access_log {self.h2_log} protocol;")}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        self.proc = subprocess.Popen(["taskset", "-c", ORIGIN_CPU, "nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "stderr.log", "w"),
                                     preexec_fn=raise_nofile)
        wait_port(self.port, self.proc, 10)
        self.pid = self.proc.pid

    def stop(self):
        stop_proc(self.proc)


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop_proc(proc: subprocess.Popen, sig=signal.SIGTERM, grace=10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---- targets -------------------------------------------------------------------------------------

class Target:
    """A running proxy (or none, for direct). .addr is what the client's -proxy gets."""
    name = "direct"
    addr = ""
    pid = None
    workloads: frozenset[str] | None = None  # the workloads it runs (None: all that allow it)

    def __init__(self, ctx):
        self.ctx = ctx
        self.client_ca = ctx.pki / "ca.pem"

    def stop(self) -> dict:
        return {}


class Tunnel(Target):
    name = "tunnel"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, str(CLIENT), "tunnel", "-t", "900"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "GOMAXPROCS": "1"}, preexec_fn=raise_nofile)
        line = self.proc.stdout.readline()
        self.addr = json.loads(line)["listening"]
        self.pid = self.proc.pid

    def stop(self):
        self.proc.stdin.close()
        stop_proc(self.proc)
        return {}


def snapshot_code(ctx, source: str) -> str:
    """Copy httpsdump's code to bench/.work/code once, so that every run of this invocation runs the
    same code even while people edit the work tree: `head` = the committed HEAD (git archive),
    `worktree` = the files as they are now. Returns a description (commit, dirty or not)."""
    dest = ctx.work / "code"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip()
    if source == "head":
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "proxy", "ca"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
        desc = f"{commit} (HEAD, committed code)"
    else:
        for pkg in ("proxy", "ca"):
            shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        dirty = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "proxy", "ca"]).stdout.strip()
        desc = f"{commit} (work tree{', with uncommitted changes in proxy/ or ca/' if dirty else ', clean'})"
    where = subprocess.run([str(HTTPSDUMP_PY), "-c", "import proxy, ca; print(proxy.__file__, ca.__file__)"],
                           cwd=dest, env=ctx.hd_env, capture_output=True, text=True).stdout
    if str(dest) not in where or where.count(str(dest)) != 2:
        raise RuntimeError(f"the snapshot in {dest} is not what python imports: {where!r}")
    # The compiled build of the snapshot's hot modules (proxy/accel.py), kept in bench/.work/compiled
    # (only what changed since the last bench is compiled again); HTTPSDUMP_COMPILED=0 benches the source.
    if ctx.hd_env.get("HTTPSDUMP_COMPILED") != "0":
        subprocess.run([str(HTTPSDUMP_PY), "-m", "proxy.accel_build", "--quiet"], cwd=dest, env=ctx.hd_env)
    ctx.compiled = subprocess.run([str(HTTPSDUMP_PY), "-m", "proxy.accel_build", "--status"], cwd=dest,
                                  env=ctx.hd_env, capture_output=True, text=True).stdout.strip()
    return desc


def httpsdump_has_store(ctx) -> bool:
    r = subprocess.run([str(HTTPSDUMP_PY), "-m", "proxy", "--help"], cwd=ctx.code, env=ctx.hd_env,
                       capture_output=True, text=True, timeout=60)
    return "--no-store" in r.stdout


def httpsdump_has_workers(ctx) -> bool:
    r = subprocess.run([str(HTTPSDUMP_PY), "-m", "proxy", "--help"], cwd=ctx.code, env=ctx.hd_env,
                       capture_output=True, text=True, timeout=60)
    return "--workers" in r.stdout


class Httpsdump(Target):
    name = "httpsdump"
    store = True
    cpus = PROXY_CPU

    def __init__(self, ctx):
        super().__init__(ctx)
        conf = ctx.work / "httpsdump-conf"
        self.tmp = ctx.work / "run-httpsdump"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.flows = self.tmp / "flows.jsonl"
        self.stderr_path = self.tmp / "stderr.log"
        cmd = ["taskset", "-c", self.cpus, str(HTTPSDUMP_PY), "-m", "proxy", "--listen-host", "127.0.0.1",
               "--listen-port", "0", "--confdir", str(conf), "--upstream-ca", str(ctx.pki / "ca.pem"),
               "--log-file", str(self.flows), "-q", *self.extra_args()]
        if ctx.has_store:  # never let the store accumulate in the confdir from run to run
            cmd += ["--store", str(self.tmp / "flows.sqlite3")] if self.store else ["--no-store"]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=ctx.code, env=ctx.hd_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.stderr_path, "w"), preexec_fn=raise_nofile)
        t_end = time.monotonic() + 30
        while True:
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.stderr_path.read_text(errors="replace"))
            if m:
                self.addr = f"127.0.0.1:{m.group(1)}"
                break
            if self.proc.poll() is not None or time.monotonic() > t_end:
                raise RuntimeError("httpsdump did not start:\n" + self.stderr_path.read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        self.pid = self.proc.pid
        self.client_ca = conf / "httpsdump-ca.pem"

    def extra_args(self) -> list[str]:
        """Options of this variant, after the common ones."""
        return []

    def event_loop(self) -> str | None:
        """The event loop it ran on, from what its processes have mapped (uvloop is imported only when
        used; with --workers the workers run it, not the supervisor). Read after the run."""
        maps = []
        for p in tree_pids(self.pid):
            with contextlib.suppress(OSError):
                maps.append(Path(f"/proc/{p}/maps").read_text())
        if not maps:
            return None
        return "uvloop" if any("/uvloop/" in m for m in maps) else "asyncio"

    def stop(self):
        loop = self.event_loop()
        stop_proc(self.proc)
        out = {"exit": self.proc.returncode, "event_loop": loop}
        try:
            with open(self.flows, "rb") as f:
                lines = f.read().splitlines()
            out["flows_logged"] = len(lines)
            out["flows_with_error"] = sum(1 for ln in lines if b'"error": null' not in ln and b'"error":null' not in ln)
            if out["flows_with_error"]:
                out["first_flow_error"] = next(json.loads(ln).get("error") for ln in lines
                                               if b'"error": null' not in ln and b'"error":null' not in ln)
        except FileNotFoundError:
            out["flows_logged"] = 0
        err = self.stderr_path.read_text(errors="replace")
        out["stderr_tail"] = "\n".join(ln for ln in err.splitlines() if "listening on" not in ln)[-2000:]
        return out


class Mitmdump(Target):
    name = "mitmdump"

    def __init__(self, ctx):
        super().__init__(ctx)
        conf = ctx.work / "mitm-conf"
        conf.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.tmp = ctx.work / "run-mitmdump"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.stderr_path = self.tmp / "stderr.log"
        cmd = ["taskset", "-c", PROXY_CPU, str(MITMDUMP), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
               "--set", f"confdir={conf}", "--set", f"ssl_verify_upstream_trusted_ca={ctx.pki / 'ca.pem'}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self.tmp / "stdout.log", "w"),
                                     stderr=open(self.stderr_path, "w"), preexec_fn=raise_nofile)
        wait_port(port, self.proc, 60)
        self.addr = f"127.0.0.1:{port}"
        self.pid = self.proc.pid
        self.client_ca = conf / "mitmproxy-ca-cert.pem"

    def stop(self):
        stop_proc(self.proc)
        err = (self.stderr_path.read_text(errors="replace") + (self.tmp / "stdout.log").read_text(errors="replace"))
        return {"exit": self.proc.returncode, "stderr_tail": err[-2000:]}


class HttpsdumpNoStore(Httpsdump):
    name = "httpsdump-nostore"
    store = False


class HttpsdumpAsyncio(HttpsdumpNoStore):
    """httpsdump-nostore on the standard asyncio event loop instead of uvloop (`event_loop = "asyncio"`):
    uvloop is optional (auto-detected), so what it brings is measured on the workloads that matter."""
    name = "httpsdump-asyncio"
    workloads = frozenset({"ka_c1", "ka_c50", "newconn_c10", "big_100MB", "idle_500"})

    def extra_args(self) -> list[str]:
        conf = self.tmp / "asyncio.toml"
        conf.write_text('event_loop = "asyncio"\n')
        return ["--config", str(conf)]


class HttpsdumpW2(Httpsdump):
    name = "httpsdump-w2"
    cpus = ",".join(sorted({PROXY_CPU, ORIGIN_CPU}))  # both CPUs: see the module docstring

    def extra_args(self) -> list[str]:
        return ["--workers", "2"]


TARGET_CLASSES = {"direct": Target, "tunnel": Tunnel, "httpsdump": Httpsdump, "httpsdump-nostore": HttpsdumpNoStore,
                  "httpsdump-w2": HttpsdumpW2, "httpsdump-asyncio": HttpsdumpAsyncio, "mitmdump": Mitmdump}


def runs_on(target: str, wl: str) -> bool:
    only = TARGET_CLASSES[target].workloads
    return only is None or wl in only


# ---- one measured run ----------------------------------------------------------------------------

class Client:
    def __init__(self, args: list[str], budget: float):
        self.proc = subprocess.Popen(["taskset", "-c", CLIENT_CPU, str(CLIENT), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "GOMAXPROCS": "1"}, preexec_fn=raise_nofile)
        self.deadline = time.monotonic() + budget

    def line(self) -> dict:
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                raise RuntimeError("load client exceeded its time budget")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                ln = self.proc.stdout.readline()
                if not ln:
                    self.proc.wait(5)
                    raise RuntimeError(f"load client exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
                return json.loads(ln)

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def wait_quiet(ctx) -> float:
    """Between runs (nothing of ours busy), wait until the other processes of the machine leave CPUs 0
    and 1 mostly idle: < 20 % busy in total over 0.5 s. Bounded per run and in total. Returns the wait."""
    t0 = time.monotonic()
    limit = min(ctx.params["quiet_wait_per_run"], ctx.quiet_budget)
    while time.monotonic() - t0 < limit:
        a = cpus_busy_s()
        time.sleep(0.5)
        b = cpus_busy_s()
        busy = sum(100 * (b[c] - a[c]) / 0.5 for c in {ORIGIN_CPU, PROXY_CPU} if c in a)
        if busy < 20:
            break
    waited = time.monotonic() - t0
    ctx.quiet_budget = max(0.0, ctx.quiet_budget - waited)
    return waited


def measure(ctx, target_name: str, wl_name: str, rnd: int) -> dict:
    wl = WORKLOADS[wl_name]
    p = ctx.params
    waited = wait_quiet(ctx) if ctx.params["quiet_wait_per_run"] > 0 else 0.0
    target = TARGET_CLASSES[target_name](ctx)
    rec = {"target": target_name, "workload": wl_name, "round": rnd, "quiet_wait_s": round(waited, 1)}
    try:
        port = ctx.nginx.h2_port if wl.get("h2") else ctx.nginx.port
        args = [wl["mode"], "-sync", "-connect", f"127.0.0.1:{port}", "-host", "bench.test",
                "-path", wl["path"], "-ca", str(target.client_ca), "-c", str(wl["c"]), *wl["args"]]
        if target.addr:
            args += ["-proxy", target.addr]
        if wl["mode"] in ("ka", "newconn", "h2"):
            args += ["-t", str(p["seconds"]), "-n", str(p["max_requests"])]
        elif wl["mode"] == "mint":
            args += ["-t", str(p["seconds"]), "-names", str(p["mint_names"]),
                     "-name-fmt", f"r{rnd}-{target_name}-%s.bench.test"]
        elif wl["mode"] == "big":
            args += ["-t", "60"]
        cl = Client(args, budget=p["seconds"] + 180)
        pid = target.pid
        try:
            ready = cl.line()
            rec["warm"] = ready
            if pid:
                rec["rss_before_kib"] = tree_status_kib(pid, "VmRSS")
            if wl["mode"] == "idle":
                cl.go()
                opened = cl.line()
                rec["opened"] = opened
                time.sleep(1.0)
                rec["rss_open_kib"] = tree_status_kib(pid, "VmRSS")
                rec["kib_per_conn"] = (rec["rss_open_kib"] - rec["rss_before_kib"]) / max(1, wl["c"])
            n_cpu0 = cpu_s(ctx.nginx.pid)
            p_cpu0 = tree_cpu_s(pid) if pid else 0.0
            sys0 = cpus_busy_s()
            t0 = time.monotonic()
            cl.go()
            res = cl.line()
            wall = time.monotonic() - t0
            sys1 = cpus_busy_s()
            p_cpu1 = tree_cpu_s(pid) if pid else 0.0
            n_cpu1 = cpu_s(ctx.nginx.pid)
        finally:
            cl.close()
        rec["client"] = res
        if res.get("proto"):
            rec["proto"] = res["proto"]
        if res.get("not_h2"):  # the target did not negotiate HTTP/2 with the client: nothing was measured
            rec["not_h2"] = rec["first_error"] = res["not_h2"]
            rec["ok"], rec["errors"], rec["reconnects"] = 0, res["errors"], 0
            return rec
        rec["ok"], rec["errors"], rec["reconnects"] = res["ok"], res["errors"], res.get("reconnects", 0)
        if res.get("first_error"):
            rec["first_error"] = res["first_error"]
        if wl["mode"] == "idle":
            rec["alive_after"] = res.get("alive_after", 0)
        else:
            units = res["bytes"] / 1e6 if wl["unit"] == "MB" else res["ok"]
            rec["rate"] = res["mb_per_s"] if wl["unit"] == "MB" else res["rate"]
            rec["p50_ms"], rec["p99_ms"] = res["p50_ms"], res["p99_ms"]
            rec["client_cpu_pct"] = 100 * res["client_cpu_s"] / max(res["elapsed_s"], 1e-9)
            rec["origin_cpu_pct"] = 100 * (n_cpu1 - n_cpu0) / max(wall, 1e-9)
            rec["cpu0_busy_pct"] = rec["client_cpu_pct"] + rec["origin_cpu_pct"]
            # Other processes of the machine on our CPUs during the timed phase (interference).
            busy = {c: 100 * (sys1[c] - sys0.get(c, 0)) / max(wall, 1e-9) for c in sys1}
            rec["cpu_busy_pct"] = busy
            proxy_pct = 100 * (p_cpu1 - p_cpu0) / max(wall, 1e-9) if pid else 0.0
            if PROXY_CPU != ORIGIN_CPU and getattr(target, "cpus", PROXY_CPU) != PROXY_CPU:
                # the proxy runs on both CPUs: what the two CPUs did beyond client, origin and proxy
                rec["other_pct"] = max(0.0, busy.get(ORIGIN_CPU, 0) + busy.get(PROXY_CPU, 0)
                                       - rec["cpu0_busy_pct"] - proxy_pct)
            elif PROXY_CPU != ORIGIN_CPU:
                rec["other_pct"] = max(0.0, busy.get(ORIGIN_CPU, 0) - rec["cpu0_busy_pct"]) + \
                    max(0.0, busy.get(PROXY_CPU, 0) - proxy_pct)
            if pid:
                rec["proxy_cpu_s"] = p_cpu1 - p_cpu0
                rec["proxy_cpu_pct"] = 100 * (p_cpu1 - p_cpu0) / max(wall, 1e-9)
                rec["cpu_us"] = (p_cpu1 - p_cpu0) * 1e6 / units if units else None
        if pid:
            rec["rss_after_kib"] = tree_status_kib(pid, "VmRSS")
            rec["hwm_kib"] = tree_status_kib(pid, "VmHWM")
            rec["hwm_mib"] = rec["hwm_kib"] / 1024
    finally:
        rec["proxy"] = target.stop()
    if "flows_logged" in rec["proxy"] and rec["proxy"]["flows_logged"] < rec.get("ok", 0):
        rec["log_short"] = f"{rec['proxy']['flows_logged']} flows logged for {rec['ok']} requests"
    return rec


def tls_floor(ctx, rnd: int) -> dict:
    """bench/floor.py on the proxy's CPU, with the snapshot's code: the CPU that OpenSSL's two handshakes
    of a new proxied connection take by themselves this round (the machine's speed moves)."""
    cmd = ["taskset", "-c", PROXY_CPU, str(HTTPSDUMP_PY), str(BENCH / "floor.py"), str(ctx.work / "httpsdump-conf"),
           str(ctx.pki), "--batches", "5", "--per-batch", "30" if ctx.params["seconds"] < 2 else "60"]
    r = subprocess.run(cmd, cwd=ctx.code, env=ctx.hd_env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return {"round": rnd, "error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1][:300]}
    return {"round": rnd, **json.loads(r.stdout)}


# ---- preflight: verification is really on ----------------------------------------------------------

def preflight(ctx) -> dict:
    """For each proxy: a request with SNI *.bench.test to the CONNECT address 127.0.0.1:PORT must work
    (the origin certificate has no IP SAN), and one with a name outside the certificate must fail."""
    out = {}
    for name in ["httpsdump", "mitmdump"]:
        if name not in ctx.targets:
            continue
        t = TARGET_CLASSES[name](ctx)
        try:
            res = {}
            for label, host in (("good", "pre.bench.test"), ("wrong_name", "wrong.example")):
                r = subprocess.run([str(CLIENT), "newconn", "-proxy", t.addr, "-connect", f"127.0.0.1:{ctx.nginx.port}",
                                    "-host", host, "-ca", str(t.client_ca), "-c", "1", "-n", "1", "-t", "20"],
                                   capture_output=True, text=True, timeout=60)
                j = json.loads(r.stdout.strip().splitlines()[-1])
                res[label] = {"ok": j["ok"], "errors": j["errors"], "first_error": j.get("first_error", "")}
            res["verifies_sni_name"] = res["good"]["ok"] == 1 and res["wrong_name"]["ok"] == 0
        finally:
            t.stop()
        out[name] = res
        log(f"bench: preflight {name}: good={res['good']['ok']} ok, wrong name -> "
            f"{res['wrong_name']['first_error'][:120]!r}; verification by SNI name: {res['verifies_sni_name']}")
    return out


def preflight_h2(ctx) -> dict:
    """For each target of h2-ka: which protocol it speaks to the client (the ALPN the client got) and
    to the origin (nginx logs $server_protocol on a third listener, h2 like the second, used only
    here): 20 requests per target, outside the measured runs, so that no timed run pays for a log."""
    out = {}
    for name in [t for t in ctx.targets if t in WORKLOADS["h2-ka"]["targets"]]:
        t = TARGET_CLASSES[name](ctx)
        seen = len(ctx.nginx.h2_log.read_text().splitlines()) if ctx.nginx.h2_log.exists() else 0
        try:
            r = subprocess.run([str(CLIENT), "h2", *(["-proxy", t.addr] if t.addr else []), "-connect",
                                f"127.0.0.1:{ctx.nginx.h2_log_port}", "-host", "pre.bench.test", "-ca", str(t.client_ca),
                                "-c", "4", "-conns", "2", "-n", "20", "-t", "20", "-expect-size", "100"],
                               capture_output=True, text=True, timeout=60)
        finally:
            t.stop()
        j = json.loads(r.stdout.strip().splitlines()[-1])
        at_origin: dict[str, int] = {}
        for ln in ctx.nginx.h2_log.read_text().splitlines()[seen:]:
            at_origin[ln] = at_origin.get(ln, 0) + 1
        out[name] = {"to_client": j.get("proto") or "no ALPN", "ok": j["ok"], "errors": j["errors"],
                     "first_error": j.get("first_error", ""), "at_origin": at_origin}
        log(f"bench: preflight h2 {name}: to the client {out[name]['to_client']}, {j['ok']} ok; "
            f"requests at the origin by protocol: {at_origin}")
    return out


# ---- summary -------------------------------------------------------------------------------------

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], targets: list[str]) -> dict:
    summary = {}
    for wl in WORKLOADS:
        rows = {}
        for t in targets:
            rs = [r for r in runs if r["workload"] == wl and r["target"] == t and "error" not in r]
            if not rs:
                continue
            n_all = len(rs)
            # A run in which more than 1 % of the requests failed measures a failure, not a speed: it is
            # left out of the medians (its errors still count in the errors column and in the JSON).
            bad = [r for r in rs if r.get("errors", 0) > 0.01 * (r.get("ok", 0) + r.get("errors", 0))]
            good = [r for r in rs if r not in bad]
            # Prefer the runs that other processes of the machine did not disturb (see other_pct).
            clean = [r for r in good if (r.get("other_pct") or 0) < CLEAN_PCT]
            rs = clean or good
            n_clean = len(clean)
            keys = ["rate", "p50_ms", "p99_ms", "cpu_us", "proxy_cpu_pct", "client_cpu_pct", "origin_cpu_pct",
                    "cpu0_busy_pct", "other_pct", "hwm_mib", "rss_before_kib", "rss_open_kib", "kib_per_conn", "alive_after"]
            rows[t] = {k: med([r.get(k) for r in rs]) for k in keys}
            rows[t]["n"] = len(rs)
            rows[t]["n_all"] = n_all
            rows[t]["n_clean"] = n_clean
            every = [r for r in runs if r["workload"] == wl and r["target"] == t and "error" not in r]
            rows[t]["errors"] = sum(r.get("errors", 0) for r in every)
            rows[t]["ok"] = sum(r.get("ok", 0) for r in every)
            rows[t]["reconnects"] = sum(r.get("reconnects", 0) for r in every)
            rows[t]["bad_runs"] = len(bad)
            rows[t]["failed_runs"] = sum(1 for r in runs if r["workload"] == wl and r["target"] == t and "error" in r)
            not_h2 = [r for r in every if r.get("not_h2")]
            if not_h2:  # h2 workload: runs in which the target did not negotiate HTTP/2 with the client
                rows[t]["not_h2"] = f"{len(not_h2)}/{n_all} runs negotiated {not_h2[0].get('proto') or 'no ALPN'}, not h2"
        if rows:
            summary[wl] = rows
    return summary


def fmt(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def ratio(a, b):
    if a is None or not b:
        return None
    return a / b


def goals_check(summary: dict, variant: str = "httpsdump") -> list[dict]:
    out = []
    for wl, metric, op, bound, text in GOALS:
        hd = summary.get(wl, {}).get(variant)
        mm = summary.get(wl, {}).get("mitmdump")
        val = None
        if hd:
            if metric == "rate_vs_mitm":
                val = ratio(hd.get("rate"), mm.get("rate") if mm else None)
            else:
                val = hd.get(metric)
        met = None if val is None else (val >= bound if op == ">=" else val <= bound)
        out.append({"target": variant, "goal": text, "workload": wl, "metric": metric, "value": val, "bound": bound, "op": op, "met": met})
    return out


def cpu_vs_mitm(runs: list[dict], targets: list[str]) -> dict:
    """{workload: {target: {"per_round": [...], "median": x}}}: the target's CPU per unit over mitmdump's
    in the same round (the two ran minutes apart on the same machine), for the workloads the issue
    gives a mitmdump scale for. The machine's speed moves between and within runs (up to 1.7x here);
    this ratio moves much less, and times the issue's figure it says what the CPU would have been on
    the machine the goals were written on. Informational: the goals are judged on measured CPU."""
    out: dict = {}
    for wl in ISSUE_MITM_CPU_US:
        mitm = {r["round"]: r["cpu_us"] for r in runs
                if r.get("workload") == wl and r.get("target") == "mitmdump" and r.get("cpu_us") and not r.get("error")}
        for t in targets:
            if t not in HTTPSDUMP_TARGETS:
                continue
            per = [r["cpu_us"] / mitm[r["round"]] for r in runs
                   if r.get("workload") == wl and r.get("target") == t and r.get("cpu_us") and not r.get("error")
                   and r["round"] in mitm]
            if per:
                out.setdefault(wl, {})[t] = {"per_round": per, "median": statistics.median(per)}
    return out


def render(meta: dict, summary: dict, goals: list[dict], targets: list[str], pre: dict,
           runs: list[dict] | None = None) -> str:
    L = []
    L.append(f"# httpsdump benchmark — {meta['date']}\n")
    L.append(f"Command: `{meta['command']}` ({meta['mode']}, {meta['rounds']} round(s), "
             f"{meta['params']['seconds']} s timed phase per run, targets interleaved each round)\n")
    L.append("## Machine\n")
    for k in ("nproc", "cpu_model", "kernel", "httpsdump_code", "httpsdump_compiled", "loadavg_at_start", "python_httpsdump", "python_mitmproxy", "openssl", "m2crypto_openssl",
              "mitmproxy", "nginx", "go", "pinning"):
        L.append(f"- {k}: {meta['machine'].get(k)}")
    L.append("")
    if pre:
        L.append("## Preflight: upstream verification is on\n")
        L.append("CONNECT 127.0.0.1:PORT with SNI/Host `pre.bench.test` (origin cert: `*.bench.test`, no IP SAN) must work; "
                 "SNI/Host `wrong.example` must fail.\n")
        for n, r in pre.items():
            if n == "h2":
                continue
            L.append(f"- {n}: good name ok={r['good']['ok']}; wrong name ok={r['wrong_name']['ok']} "
                     f"(`{r['wrong_name']['first_error'][:140]}`) → verifies against the SNI name: **{r['verifies_sni_name']}**")
        L.append("")
    if pre.get("h2"):
        L.append("## Preflight: HTTP/2 on both sides (h2-ka)\n")
        L.append("20 requests through each target offering ALPN `h2, http/1.1`: the protocol the client got, and "
                 "what nginx logged ($server_protocol) for the requests that reached it.\n")
        for n, r in pre["h2"].items():
            origin = ", ".join(f"{k} × {v}" for k, v in r["at_origin"].items()) or "no request"
            L.append(f"- {n}: to the client **{r['to_client']}** ({r['ok']} ok, {r['errors']} errors); at the origin: {origin}")
        L.append("")
    L.append("## Results (medians over rounds)\n")
    L.append("Rate = req/s (keep-alive, new connection), names/s (mint), MB/s (download, 10^6 B). "
             "CPU µs/unit = proxy utime+stime per request / name / MB during the timed phase. "
             "cpu0 = load client + nginx busy % of CPU 0 (the proxy has CPU 1 alone). "
             "Other load % = CPU time that other processes of the machine took on CPUs 0 and 1 during the "
             "timed phase (user+system+steal time not ours; the rates are only as clean as this column is low; "
             f"CPU µs/unit is less affected). Medians use only the runs with other load < {CLEAN_PCT:.0f} % when there "
             "is at least one (clean runs = clean/all; 0/N means all N were used). Failed runs (the harness could not run "
             "them, or more than 1 % of their requests failed) are left out of the medians; their errors are counted.\n")
    hdr = "| workload | target | rate | vs direct | httpsdump vs this | p50 ms | p99 ms | proxy CPU µs/unit | proxy CPU % | client CPU % | cpu0 busy % | other load % | peak RSS MiB | errors / ok / reconnects | clean runs | failed runs |"
    L.append(hdr)
    L.append("|" + "---|" * (hdr.count("|") - 1))
    for wl, rows in summary.items():
        if WORKLOADS[wl]["mode"] == "idle":
            continue
        d = rows.get("direct", {})
        hd = rows.get("httpsdump", {})
        for t in targets:
            r = rows.get(t)
            if not r:
                continue
            if r.get("not_h2") and r["rate"] is None:  # nothing measured: say why instead of numbers
                L.append(f"| {wl} | {t} | n/a: {r['not_h2']} |" + " – |" * 10 +
                         f" {r['errors']} / {r['ok']} / {r['reconnects']} | {r['n_clean']}/{r['n_all']} | {r['bad_runs'] + r['failed_runs']} |")
                continue
            L.append(f"| {wl} | {t} | {fmt(r['rate'])} | {fmt(ratio(r['rate'], d.get('rate')), 2)} | "
                     f"{fmt(ratio(hd.get('rate'), r['rate']), 2) if t != 'httpsdump' else ''} | {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} | "
                     f"{fmt(r['cpu_us'])} | {fmt(r['proxy_cpu_pct'])} | {fmt(r['client_cpu_pct'])} | {fmt(r['cpu0_busy_pct'])} | {fmt(r['other_pct'])} | "
                     f"{fmt(r['hwm_mib'])} | {r['errors']} / {r['ok']} / {r['reconnects']} | {r['n_clean']}/{r['n_all']} | {r['bad_runs'] + r['failed_runs']} |")
    loops = {}
    for r in runs or []:
        el = (r.get("proxy") or {}).get("event_loop")
        if el:
            loops.setdefault(r["target"], set()).add(el)
    if loops:
        L.append("\nEvent loop each httpsdump target ran on (what its processes had mapped after the run): " +
                 ", ".join(f"{t}: {'/'.join(sorted(v))}" for t, v in loops.items()) + ".")
    if "idle_500" in summary:
        L.append("\n### Idle intercepted connections (500 held open after one request each)\n")
        L.append("| target | RSS before MiB | RSS with 500 open MiB | KiB per connection | still alive after | errors |")
        L.append("|---|---|---|---|---|---|")
        for t, r in summary["idle_500"].items():
            L.append(f"| {t} | {fmt((r['rss_before_kib'] or 0) / 1024)} | {fmt((r['rss_open_kib'] or 0) / 1024)} | "
                     f"{fmt(r['kib_per_conn'])} | {fmt(r['alive_after'])} | {r['errors']} |")
    L.append("\n## Goals (issue #3; httpsdump with its JSONL log on)\n")
    variants = [t for t in HTTPSDUMP_TARGETS if t in targets]
    L.append("| goal | " + " | ".join(variants) + " |")
    L.append("|---|" + "---|" * len(variants))
    for text in dict.fromkeys(g["goal"] for g in goals):
        cells = []
        for v in variants:
            g = next(g for g in goals if g["goal"] == text and g["target"] == v)
            verdict = "MET" if g["met"] else ("NOT MET" if g["met"] is False else "n/a")
            cells.append(f"{fmt(g['value'], 2)} {verdict}")
        L.append(f"| {text} | " + " | ".join(cells) + " |")
    L.append("")
    rel = cpu_vs_mitm(runs or [], targets)
    if rel:
        L.append("### CPU per unit against mitmdump's, round by round (informational)\n")
        L.append("The machine's speed moves between runs and rounds, mitmdump's CPU with it. Each round's httpsdump "
                 "CPU over mitmdump's in the same round, the median of those, and that median times the issue's "
                 "mitmdump figure (" + ", ".join(f"{wl} {fmt(v)} µs" for wl, v in ISSUE_MITM_CPU_US.items()) +
                 "): the CPU on the machine the goals were written for. The goals above are judged on measured "
                 "CPU, not on this.\n")
        L.append("| workload | target | per round | median | × issue's mitmdump figure |")
        L.append("|---|---|---|---|---|")
        for wl, per_t in rel.items():
            for t, r in per_t.items():
                rounds_txt = ", ".join(f"{x:.3f}" for x in r["per_round"])
                L.append(f"| {wl} | {t} | {rounds_txt} | {r['median']:.3f} | "
                         f"{fmt(r['median'] * ISSUE_MITM_CPU_US[wl])} µs |")
        L.append("")
    L.extend(render_floor(meta.get("tls_floor") or [], runs or [], targets))
    return "\n".join(L)


def render_floor(floor: list[dict], runs: list[dict], targets: list[str]) -> list[str]:
    """The TLS floor section: what OpenSSL's two handshakes take alone, each round, next to the CPU
    per new connection of each httpsdump variant in the same round."""
    if not floor:
        return []
    goal = next(b for wl, m, _, b, _ in GOALS if wl == "newconn_c10" and m == "cpu_us")
    L = ["### The TLS floor of a new connection (bench/floor.py, informational)\n",
         "Each round, before its workloads: the CPU that the proxy's side of the two handshakes of a new "
         "proxied connection takes with httpsdump's own TLS code (proxy/tls) and nothing around it: a full "
         "handshake as the server (a certificate minted by httpsdump's CA, verified by the peer) and a "
         "resumed one as the client (the bench origin's certificate and key; the session of an earlier "
         "handshake, as httpsdump resumes origins), including the reads that take in the origin's tickets; "
         "in-process peers over memory BIOs, their CPU not counted, on the proxy's CPU. "
         "A full handshake as the client (no resumption) is shown for scale. "
         f"Around = the httpsdump variant's newconn_c10 CPU per connection that round minus the floor: "
         f"everything else (TCP, CONNECT, ClientHello, HTTP, the log, the event loop). Goal: ≤ {fmt(goal)} µs in all.\n"]
    cols = [t for t in HTTPSDUMP_TARGETS if t in targets]
    L.append("| round | OpenSSL | server full µs | client resumed µs | floor µs | floor / goal | client full µs | "
             + " | ".join(f"{t} µs (around)" for t in cols) + " |")
    L.append("|" + "---|" * (7 + len(cols)))
    floors = []
    for fl in floor:
        rnd = fl["round"]
        if fl.get("error"):
            L.append(f"| {rnd} | failed: {fl['error']} |" + " – |" * (5 + len(cols)))
            continue
        f = fl["new_connection_us"]
        floors.append(f)
        cells = []
        for t in cols:
            cpu = next((r["cpu_us"] for r in runs if r.get("workload") == "newconn_c10" and r.get("target") == t
                        and r.get("round") == rnd and r.get("cpu_us") and not r.get("error")), None)
            cells.append("–" if cpu is None else f"{fmt(cpu)} ({fmt(cpu - f)})")
        resumed = "" if fl.get("resumed_share", 1) >= 0.99 else f" (resumed {fl['resumed_share']:.0%})"
        L.append(f"| {rnd} | {fl['openssl'].split()[1]} | {fmt(fl['server_full_us'])} | {fmt(fl['client_resumed_us'])}{resumed} | "
                 f"{fmt(f)} | {f / goal:.0%} | {fmt(fl['client_full_us'])} | " + " | ".join(cells) + " |")
    if floors:
        m = statistics.median(floors)
        L.append(f"\nMedian floor: {fmt(m)} µs per new connection, {m / goal:.0%} of the {fmt(goal)} µs goal.\n")
    return L


def machine_facts(ctx) -> dict:
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (r.stdout + r.stderr).strip()
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    facts = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python_httpsdump": out([str(HTTPSDUMP_PY), "-c", "import sys; print(sys.version.split()[0])"]),
        "m2crypto_openssl": out([str(HTTPSDUMP_PY), "-c", "import M2Crypto, M2Crypto.m2 as m; print('M2Crypto', M2Crypto.__version__, '/', m.OPENSSL_VERSION_TEXT)"]),
        "openssl": out(["openssl", "version"]),
        "nginx": out(["nginx", "-v"]),
        "go": out(["go", "version"]),
        "httpsdump_code": ctx.code_desc,
        "httpsdump_compiled": ctx.compiled,
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "pinning": f"proxy on CPU {PROXY_CPU}; nginx (1 process) and load client (GOMAXPROCS=1) on CPU {ORIGIN_CPU}",
    }
    if MITMDUMP.exists():
        v = out([str(MITMDUMP), "--version"])
        facts["mitmproxy"] = " ".join(v.split())
        facts["python_mitmproxy"] = out([str(MITM_VENV / "bin" / "python"), "-c", "import sys; print(sys.version.split()[0])"])
    return facts


# ---- profiling (py-spy) ---------------------------------------------------------------------------

def profile(ctx, wl_name: str, seconds: float, outdir: Path, stamp: str) -> Path:
    """Run one workload against httpsdump with py-spy attached; write the top functions by self time."""
    wl = WORKLOADS[wl_name]
    target = Httpsdump(ctx)
    raw = outdir / f"profile-{stamp}-{wl_name}.raw"
    spy = None
    try:
        args = [wl["mode"], "-sync", "-connect", f"127.0.0.1:{ctx.nginx.port}", "-host", "bench.test", "-path", wl["path"],
                "-ca", str(target.client_ca), "-c", str(wl["c"]), "-proxy", target.addr, "-t", str(seconds),
                "-n", str(ctx.params["max_requests"]), *wl["args"]]
        cl = Client(args, budget=seconds + 120)
        try:
            cl.line()
            spy = subprocess.Popen(["taskset", "-c", CLIENT_CPU, str(PYSPY), "record", "--subprocesses", "--pid", str(target.pid),
                                    "--duration", str(int(seconds)), "--rate", "250", "--format", "raw",
                                    "--output", str(raw), "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(0.5)
            cl.go()
            res = cl.line()
        finally:
            cl.close()
        if spy:
            spy.wait(seconds + 30)
    finally:
        target.stop()
        if spy and spy.poll() is None:
            spy.kill()
    selfc, totalc, n = {}, {}, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        c = int(count)
        n += c
        frames = stack.split(";")
        # drop the thread/process header frames py-spy puts first
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in frames]  # function level: "name (file)"
        selfc[frames[-1]] = selfc.get(frames[-1], 0) + c
        for f in set(frames):
            totalc[f] = totalc.get(f, 0) + c
    top = sorted(selfc.items(), key=lambda kv: -kv[1])[:15]
    unit = "MB/s" if wl["unit"] == "MB" else "req/s"
    rate = res["mb_per_s"] if wl["unit"] == "MB" else res["rate"]
    txt = [f"# py-spy: httpsdump under {wl_name} ({rate:.0f} {unit} under the profiler, "
           f"{res['errors']} errors; {n} samples at 250 Hz of the threads that were running, all threads "
           "together: % = share of those samples)", "", f"Command: `{' '.join(target.cmd[3:])}`", "",
           "| self % | total % | function (file) |", "|---|---|---|"]
    for f, c in top:
        txt.append(f"| {100 * c / n:.1f} | {100 * totalc.get(f, 0) / n:.1f} | `{f}` |")
    txt.append("")
    txt.append("Top 15 by total (inclusive) time:")
    txt.append("")
    for f, c in sorted(totalc.items(), key=lambda kv: -kv[1])[:15]:
        txt.append(f"- {100 * c / n:.1f} % `{f}`")
    out = outdir / f"profile-{stamp}-{wl_name}.md"
    out.write_text("\n".join(txt) + "\n")
    return out


# ---- main ----------------------------------------------------------------------------------------

class Ctx:
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, short runs (< 3 minutes)")
    ap.add_argument("--rounds", type=int, help="rounds (default: 1 quick, 3 full)")
    ap.add_argument("--seconds", type=float, help="timed phase per run, seconds")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS), help="comma list of " + ",".join(ALL_TARGETS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ",".join(WORKLOADS))
    ap.add_argument("--profile", action="store_true", help="also py-spy profile httpsdump under ka_c50, newconn_c10 and big_100MB")
    ap.add_argument("--no-wait-quiet", action="store_true",
                    help="do not wait (up to 20 s per run, 120 s in all; 30 s quick) for other processes to leave CPUs 0-1 idle")
    ap.add_argument("--code", choices=("head", "worktree"), default="head",
                    help="which httpsdump code to run, copied once at the start: the committed HEAD (default) "
                         "or the work tree as it is")
    ap.add_argument("--no-save", action="store_true", help="print only; write nothing under bench/results")
    ap.add_argument("--render", metavar="RESULTS.json",
                    help="measure nothing: print the report of an earlier run from its JSON file with this renderer")
    a = ap.parse_args()
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        targets = list(dict.fromkeys(t for rows in saved["summary"].values() for t in rows))
        print(render(saved["meta"], saved["summary"], saved["goals"], targets, saved["preflight"], saved["runs"])
              + f"\nTotal time: {saved['meta']['elapsed_s']} s. Raw runs: the JSON file beside this one.\n")
        return 0

    ctx = Ctx()
    ctx.work = WORK
    ctx.pki = WORK / "pki"
    ctx.targets = [t for t in a.targets.split(",") if t]
    workloads = [w for w in a.workloads.split(",") if w]
    for t in ctx.targets:
        if t not in TARGET_CLASSES:
            ap.error(f"unknown target {t}")
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w}")
    rounds = a.rounds or (1 if a.quick else 4)
    ctx.params = {"seconds": a.seconds or (1.5 if a.quick else 3.5),
                  "max_requests": 2_000_000,
                  "mint_names": 600 if a.quick else 5000,
                  "quiet_wait_per_run": 0.0 if a.no_wait_quiet else 20.0}
    ctx.quiet_budget = 30.0 if a.quick else 120.0
    for p in (CLIENT, HTTPSDUMP_PY) + ((MITMDUMP,) if "mitmdump" in ctx.targets else ()):
        if not Path(p).exists():
            log(f"bench: missing {p}: start the benchmark with bench/run, which installs it")
            return 2
    raise_nofile()
    ctx.code = WORK / "code"
    ctx.hd_env = {**os.environ, "PYTHONPATH": str(ctx.code), "HTTPSDUMP_COMPILED_DIR": str(WORK / "compiled")}
    ctx.hd_env.pop("PYTHONSAFEPATH", None)
    WORK.mkdir(parents=True, exist_ok=True)
    ctx.code_desc = snapshot_code(ctx, a.code)
    log(f"bench: httpsdump code: {ctx.code_desc}")
    ctx.has_store = httpsdump_has_store(ctx)
    if not ctx.has_store:
        ctx.targets = [t for t in ctx.targets if t != "httpsdump-nostore"]
    if not httpsdump_has_workers(ctx):
        ctx.targets = [t for t in ctx.targets if t != "httpsdump-w2"]
    WORK.mkdir(parents=True, exist_ok=True)
    make_pki(ctx.pki)
    make_www(WORK / "www")
    ctx.nginx = Nginx(WORK, ctx.pki, WORK / "www")
    now = dt.datetime.now()
    stamp = now.strftime("%Y-%m-%d-%H%M")
    meta = {"date": now.strftime("%Y-%m-%d %H:%M"), "mode": "quick" if a.quick else "full", "rounds": rounds,
            "params": ctx.params, "command": "bench/run " + " ".join(sys.argv[1:]),
            "targets": ctx.targets, "workloads": workloads}
    runs: list[dict] = []
    pre: dict = {}
    profiles: list[str] = []
    t_start = time.monotonic()
    try:
        meta["machine"] = machine_facts(ctx)
        pre = preflight(ctx)
        if "h2-ka" in workloads:
            pre["h2"] = preflight_h2(ctx)
        meta["tls_floor"] = []
        for rnd in range(1, rounds + 1):
            if "newconn_c10" in workloads:
                try:
                    fl = tls_floor(ctx, rnd)
                except Exception as e:  # noqa: BLE001 - the probe must not cost the run
                    fl = {"round": rnd, "error": f"{type(e).__name__}: {e}"}
                meta["tls_floor"].append(fl)
                log(f"bench: round {rnd} tls_floor {json.dumps({k: v for k, v in fl.items() if k != 'batches'})}")
            for wl in workloads:
                allowed = WORKLOADS[wl].get("targets", ALL_TARGETS)
                order = [t for t in ctx.targets if t in allowed and runs_on(t, wl)]
                k = (rnd - 1) % max(1, len(order))
                order = order[k:] + order[:k]  # rotate: no target always runs first
                for t in order:
                    try:
                        rec = measure(ctx, t, wl, rnd)
                    except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                        rec = {"target": t, "workload": wl, "round": rnd, "error": f"{type(e).__name__}: {e}"}
                    runs.append(rec)
                    brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()
                             if k in ("rate", "cpu_us", "p50_ms", "p99_ms", "errors", "hwm_mib", "kib_per_conn",
                                      "cpu0_busy_pct", "other_pct", "quiet_wait_s", "error", "first_error", "log_short", "proto")}
                    log(f"bench: round {rnd} {wl:12s} {t:10s} {json.dumps(brief)}")
        if a.profile:
            outdir = BENCH / "results" if not a.no_save else WORK
            outdir.mkdir(parents=True, exist_ok=True)
            for wl in ("ka_c50", "newconn_c10", "big_100MB"):
                profiles.append(str(profile(ctx, wl, 8.0 if not a.quick else 3.0, outdir, stamp)))
    finally:
        ctx.nginx.stop()
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    summary = summarize(runs, ctx.targets)
    goals = [g for v in HTTPSDUMP_TARGETS if v in ctx.targets for g in goals_check(summary, v)]
    text = render(meta, summary, goals, ctx.targets, pre, runs)
    text += f"\nTotal time: {meta['elapsed_s']} s. Raw runs: the JSON file beside this one.\n"
    print(text)
    for p in profiles:
        print(Path(p).read_text())
    if not a.no_save:
        res = BENCH / "results"
        res.mkdir(exist_ok=True)
        suffix = "-quick" if a.quick else ""
        (res / f"{stamp}{suffix}.md").write_text(text)
        (res / f"{stamp}{suffix}.json").write_text(json.dumps(
            {"meta": meta, "preflight": pre, "summary": summary, "goals": goals, "runs": runs}, indent=1, default=str))
        log(f"bench: wrote {res / (stamp + suffix)}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
