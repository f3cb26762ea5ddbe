"""--workers N: N processes, each with its own event loop, accepting on one port with SO_REUSEPORT.

Theory of operation. The parent loads the CA, makes the one leaf key and the ProxyServer (trust
store, contexts: loaded once), forks the logger (proxy/logproc.py, one channel per worker), and binds
the listen address with SO_REUSEPORT without listening on it: that fixes the port (also for
--listen-port 0) and holds it, while taking no connections (Linux gives connections only to
listening sockets of a reuseport group). It then forks the workers; each one listens on that port
with SO_REUSEPORT (its own accept queue; the kernel spreads new connections over the queues by a
hash of the addresses) and reports ready through a pipe. Only when all are ready does the parent print
"listening on HOST:PORT", once.

The parent serves no traffic: it waits for signals. SIGINT/SIGTERM: each worker gets one SIGTERM and
stops as a single proxy does (stops accepting, lets exchanges finish for up to 5 s, sends its last
records to the logger); the logger ends when every worker's channel has closed. A second signal
kills the workers at once. Workers ignore SIGINT (a Ctrl-C reaches the whole process group; the
parent forwards it once) and get SIGTERM if the parent dies (PR_SET_PDEATHSIG).

A worker that dies is reported (exit code or signal) and not restarted: its log channel died with it
and the others keep serving the port. When none is left, the proxy exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import sys
import time

__all__ = ["run_workers"]

log = logging.getLogger("httpsdump")

_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGCHLD}
_STOP_TIMEOUT = 30.0  # grace (5 s) + cancel (2 s) + the last records to the logger, with room to spare


def run_workers(config, ca, logger, *, columns: bool, keylog=None) -> int:
    from .errors import ConfigError
    from .server import ProxyServer
    from .sinks.console import ConsoleSink

    n = config.workers
    console = ConsoleSink(sys.stdout, config.verbosity)
    console.live = False  # one status line per worker would overwrite each other
    try:
        server = ProxyServer(config, ca, [console], keylog=keylog)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cannot load an --upstream-ca file: {e}") from None
    try:
        holder, port = _reserve(config.listen_host, config.listen_port)
    except OSError as e:
        return _cannot_listen(config, e)
    channels = logger.channels if logger is not None else [None] * n
    ready_r, ready_w = os.pipe()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    old_chld = signal.signal(signal.SIGCHLD, lambda *_: None)  # so that SIGCHLD is queued, not ignored
    workers: dict[int, int] = {}  # pid -> worker number (1-based)
    try:
        for i in range(n):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(ready_r)
                    holder.close()
                    for j, ch in enumerate(channels):
                        if j != i and ch is not None:
                            ch.close()
                    code = _worker(i + 1, server, channels[i], columns, port, ready_w, config.event_loop)
                except BaseException:
                    with contextlib.suppress(Exception):
                        log.exception("worker %d failed", i + 1)
                finally:
                    os._exit(code)
            workers[pid] = i + 1
            if channels[i] is not None:
                channels[i].close()  # the worker has it; the logger must see it close when the worker ends
        os.close(ready_w)
        problem = _wait_ready(ready_r, n, workers, logger)
        if problem is not None:
            _stop(workers, signal.SIGTERM)
            _reap_all(workers, logger, time.monotonic() + _STOP_TIMEOUT)
            return _cannot_listen(config, OSError(0, problem))
        log.info("listening on %s:%d (%d workers: %s)", config.listen_host, port, n,
                 " ".join(str(p) for p in sorted(workers)))
        log.info("CA certificate: %s (trust it in your client; see the README)",
                 config.confdir_path / "httpsdump-ca.pem")
        return _supervise(workers, logger)
    finally:
        holder.close()
        signal.signal(signal.SIGCHLD, old_chld)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _reserve(host: str, port: int) -> tuple[socket.socket, int]:
    """Bind (not listen) with SO_REUSEPORT: the port is ours and the workers can bind it too."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(addr)
    except OSError:
        s.close()
        raise
    return s, s.getsockname()[1]


def _cannot_listen(config, e: OSError) -> int:
    print(f"httpsdump: error: cannot listen on {config.listen_host}:{config.listen_port}: {e.strerror or e} "
          "(is another proxy running there? choose another --listen-port)", file=sys.stderr)
    return 3


def _wait_ready(ready_r: int, n: int, workers: dict[int, int], logger, timeout: float = 60.0) -> str | None:
    """None when all n workers listen; otherwise what went wrong."""
    deadline = time.monotonic() + timeout
    buf, ok = b"", 0
    with os.fdopen(ready_r, "rb") as f:
        while ok < n:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"the workers did not start within {timeout:g} s"
            r, _, _ = select.select([f], [], [], min(left, 0.2))
            if not r:
                if _reap(workers, logger, stopping=False):
                    return "a worker exited while starting (see the messages above)"
                continue
            chunk = os.read(f.fileno(), 4096)
            if not chunk:
                return "the workers exited while starting (see the messages above)"
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"error "):
                    return line[len(b"error "):].decode("utf-8", "replace")
                ok += line.startswith(b"ok ")
    return None


def _supervise(workers: dict[int, int], logger) -> int:
    code, deadline, stopping = 0, None, False
    while workers:
        wait = 3600.0 if deadline is None else max(0.0, deadline - time.monotonic())
        info = signal.sigtimedwait(_SIGNALS, wait)
        if info is None:
            if deadline is not None and time.monotonic() >= deadline:
                log.error("%d workers did not stop within %g s; killing them", len(workers), _STOP_TIMEOUT)
                _stop(workers, signal.SIGKILL)
                deadline = None
            continue
        if info.si_signo in (signal.SIGINT, signal.SIGTERM):
            if stopping:  # a second signal: leave at once
                _stop(workers, signal.SIGKILL)
                os._exit(0)
            stopping = True
            log.info("shutting down (%d workers)", len(workers))
            _stop(workers, signal.SIGTERM)
            deadline = time.monotonic() + _STOP_TIMEOUT
        if _reap(workers, logger, stopping) and not stopping:
            code = 1
            if not workers:
                log.error("no worker left; stopping")
    return code


def _reap(workers: dict[int, int], logger, stopping: bool) -> bool:
    """Collect exited children; report workers that died unexpectedly. True if any did."""
    died = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return died
        if pid == 0:
            return died
        rc = os.waitstatus_to_exitcode(status)
        if pid in workers:
            number = workers.pop(pid)
            if not stopping or rc != 0:
                died = died or not stopping
                how = f"exit code {rc}" if rc >= 0 else f"signal {-rc}"
                log.error("worker %d (pid %d) ended (%s); %d workers left", number, pid, how, len(workers))
        elif logger is not None and pid == logger.pid:
            logger.status = status  # reported by logger.wait()
            if rc != 0:
                log.error("the logger process (pid %d) ended (%s): flows are no longer logged", pid,
                          f"exit code {rc}" if rc >= 0 else f"signal {-rc}")


def _reap_all(workers: dict[int, int], logger, deadline: float) -> None:
    while workers and time.monotonic() < deadline:
        _reap(workers, logger, stopping=True)
        time.sleep(0.02)
    if workers:
        _stop(workers, signal.SIGKILL)
        for pid in list(workers):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            workers.pop(pid)


def _stop(workers: dict[int, int], sig: int) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


# --- a worker ---------------------------------------------------------------------------------------


def _worker(number: int, server, channel, columns: bool, port: int, ready_w: int, event_loop: str) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards Ctrl-C once, as SIGTERM
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    _die_with_parent()
    if channel is not None:
        from .logproc import LogChannel

        server.add_sink(LogChannel(channel, columns=columns))
    from .cli import _run_loop

    return _run_loop(_serve(number, server, port, ready_w), event_loop)


async def _serve(number: int, server, port: int, ready_w: int) -> int:
    try:
        await server.start(port=port, reuse_port=True)
    except OSError as e:
        os.write(ready_w, f"error worker {number}: {e.strerror or e}\n".encode())
        await server.close()
        return 3
    os.write(ready_w, f"ok {number} {os.getpid()}\n".encode())
    os.close(ready_w)
    log.debug("worker %d (pid %d) listening", number, os.getpid())
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.close()
    return 0


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the parent dies, so no worker outlives a killed proxy."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
