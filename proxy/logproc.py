"""The logger process: one process owns the record outputs (JSON Lines log, flow store, HAR file).

Theory of operation. The workers (the proxy process itself, or the `--workers` processes) render each
finished flow once on their event loop (`Flow.rendered()`: the record and its JSON text) and hand the
text, with the store's index columns, to a `LogChannel` sink. The channel gathers records for a few
milliseconds (or up to `batch_bytes`) and sends them as one frame over a Unix stream socket, one
socket per worker, to the logger process forked at start-up. The logger reads whole frames from all
workers and writes each read cycle as one batch: one write() of whole lines to the JSONL log, one
SQLite transaction, the HAR entries. Why a process: the store used to be a writer thread in the proxy,
and its GIL hand-offs with the relay cost ~190 µs per request at 50 keep-alive connections (bench/);
in its own process the writing runs beside the relay, on another core when there is one.

Guarantees:
- Nothing is lost on a clean stop (also SIGTERM/SIGINT): each channel sends everything it holds
  when it closes, and the logger ends only when every channel is closed (end of file), after
  writing all it received. It ignores SIGINT and SIGTERM for that reason (a Ctrl-C reaches the whole
  process group); it also stops when the proxy is killed, as its channels then close.
- Whole lines: a frame carries whole records, the logger writes only complete frames, and the JSONL
  sink writes each batch with one write() (cut off again if the disk is full). A frame cut short by a
  worker that died mid-send is reported with its size, never written.
- The relay does not wait for the disk. A channel keeps at most `max_pending` bytes that the logger
  has not taken yet (on top of the socket buffer); past that, the worker's event loop blocks in
  send (back-pressure, as the in-process store did) and says so once per episode; only after
  `block_timeout` seconds without any progress are the waiting frames dropped, counted and logged as
  errors. Records are never dropped silently.
- A logger that dies is reported by every channel (error log, flows counted as lost from then on) and
  by the proxy's exit status (1); the relay keeps running.

Frame: 4-byte big-endian payload length, then UTF-8 lines, two per record: the store columns as a
JSON array (`[id, start, host, …]`, an empty line when there is no store) and the record's JSON text.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import select
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass

from .errors import ConfigError
from .flow import Flow, dumps_line, loads

__all__ = ["LogSpec", "LoggerProcess", "LogChannel", "start_logger"]

log = logging.getLogger("httpsdump")

_HEADER = struct.Struct("!I")
_WRITE_CHUNK = 2000  # records per store transaction in the logger


@dataclass(frozen=True)
class LogSpec:
    """What the logger opens: any of the JSONL log, the flow store, the HAR file."""

    log_file: str | None = None
    store_path: str | None = None
    store_max_flows: int = 0
    store_max_bytes: int = 0
    har_file: str | None = None

    @classmethod
    def from_config(cls, config) -> "LogSpec":
        store_path = None
        if config.store:
            from .store import default_store_path

            store_path = str(config.store_path or default_store_path(config.confdir_path))
        return cls(config.log_file, store_path, config.store_max_flows, config.store_max_bytes, config.har_file)

    @property
    def empty(self) -> bool:
        return not (self.log_file or self.store_path or self.har_file)


# --- the worker's side ------------------------------------------------------------------------------


class LogChannel:
    """A sink that sends rendered records to the logger process in batches (see the module docstring).

    Called on the event loop thread only. `close` sends what is left (blocking, bounded) and closes
    the socket, which tells the logger this worker is done.
    """

    writes_records = True

    def __init__(self, sock: socket.socket, *, columns: bool, flush_delay: float = 0.005,
                 batch_bytes: int = 256 << 10, max_pending: int = 64 << 20, block_timeout: float = 10.0) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._columns = columns
        self._delay, self._batch_bytes = flush_delay, batch_bytes
        self._max_pending, self._block_timeout = max_pending, block_timeout
        self._lines: list[bytes] = []  # whole lines, each ending in a newline
        self._size = 0
        self._out = bytearray()  # framed, not yet taken by the socket
        self._frames: list[list[int]] = []  # [bytes left, records, size] per frame in _out, oldest first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watching = False
        self._stalled = False
        self._dead: str | None = None
        self._closed = False
        self.sent = 0  # records the logger has been handed in full
        self.dropped = 0

    def __repr__(self) -> str:
        return f"<LogChannel fd={self._fd}{' closed' if self._closed else ''}>"

    def emit(self, flow: Flow) -> None:
        if self._closed:
            log.warning("log channel: flow %s emitted after close; dropped", flow.id)
            return
        record, line = flow.rendered_bytes()  # UTF-8 already: no text made for the channel
        if self._dead is not None:
            self._lost(1)
            return
        if self._columns:
            from .store import record_columns

            self._lines.append(dumps_line([record["id"], *record_columns(record)]))
        else:
            self._lines.append(b"\n")
        self._lines.append(line)
        self._size += len(line)
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:  # not on a loop (tests, shutdown): send now, waiting if need be
                self._flush()
                if self._out and self._dead is None:
                    self._wait_sent(0, time.monotonic() + self._block_timeout, progress_resets=True)
                return
        if self._size >= self._batch_bytes:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._delay, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        payload = b"".join(self._lines)
        count = len(self._lines) // 2
        self._lines, self._size = [], 0
        if self._dead is not None:
            self._lost(count)
            return
        self._out += _HEADER.pack(len(payload))
        self._out += payload
        self._frames.append([_HEADER.size + len(payload), count, _HEADER.size + len(payload)])
        self._send()
        if len(self._out) > self._max_pending:
            self._block()

    def _send(self) -> None:
        while self._out:
            try:
                n = os.write(self._fd, self._out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self._died(e)
                return
            del self._out[:n]
            self._account(n)
        if self._out and not self._watching and self._loop is not None and not self._closed:
            self._loop.add_writer(self._fd, self._send)
            self._watching = True
        elif not self._out and self._watching:
            self._unwatch()
        if self._stalled and len(self._out) <= self._max_pending // 2:
            self._stalled = False
            log.warning("log channel: the logger process caught up")

    def _unwatch(self) -> None:
        if self._watching and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        self._watching = False

    def _account(self, n: int) -> None:
        frames = self._frames
        while n and frames:
            take = min(n, frames[0][0])
            frames[0][0] -= take
            n -= take
            if frames[0][0] == 0:
                self.sent += frames.pop(0)[1]

    def _block(self) -> None:
        """Back-pressure: the logger is behind by more than max_pending bytes. Wait (the relay waits
        too) until half of it is taken; drop the unsent frames only when nothing moves for
        block_timeout seconds."""
        if not self._stalled:
            self._stalled = True
            log.warning("log channel: the logger process is falling behind (%d MiB waiting); "
                        "the relay waits for it", len(self._out) >> 20)
        deadline = time.monotonic() + self._block_timeout
        self._wait_sent(self._max_pending // 2, deadline, progress_resets=True)
        if len(self._out) > self._max_pending and self._dead is None:
            self._drop_unstarted(f"no progress for {self._block_timeout:g} s")

    def _wait_sent(self, target: int, deadline: float, progress_resets: bool) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while len(self._out) > target and self._dead is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            poller.poll(left * 1000)
            before = len(self._out)
            self._send()
            if progress_resets and len(self._out) < before:
                deadline = time.monotonic() + self._block_timeout

    def _drop_unstarted(self, why: str) -> None:
        """Drop the frames the logger has not started to read (a started one must be finished, or
        the stream would be cut mid-frame)."""
        keep = self._frames[:1] if self._frames and self._frames[0][0] < self._frames[0][2] else []
        kept_bytes = keep[0][0] if keep else 0
        lost = sum(f[1] for f in self._frames[len(keep):])
        del self._out[kept_bytes:]
        self._frames = keep
        self._lost(lost, why)

    def _died(self, e: OSError) -> None:
        self._dead = e.strerror or str(e)
        self._unwatch()
        lost = sum(f[1] for f in self._frames) + len(self._lines) // 2
        self._out.clear()
        self._frames.clear()
        self._lines, self._size = [], 0
        log.error("the logger process has stopped (%s): flows are no longer written to the log, store or "
                  "HAR file", self._dead)
        self._lost(lost)

    def _lost(self, n: int, why: str | None = None) -> None:
        if not n:
            return
        before = self.dropped
        self.dropped += n
        if why is not None or before // 1000 != self.dropped // 1000 or before == 0:
            log.error("log channel: %d flows NOT logged (%s; %d lost so far)", n, why or self._dead, self.dropped)

    def close(self, timeout: float = 30.0) -> None:
        """Send everything (waiting up to `timeout` seconds for the logger), then close the socket."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._unwatch()
        if self._out and self._dead is None:
            self._wait_sent(0, time.monotonic() + timeout, progress_resets=False)
            if self._out:
                self._drop_unstarted(f"the logger took nothing for {timeout:g} s at shutdown")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        self._sock.close()
        if self.dropped:
            log.error("log channel: %d flows were not logged in all", self.dropped)


# --- the parent's handle ---------------------------------------------------------------------------


class LoggerProcess:
    """The forked logger: `channels[i]` is the write end for worker i; `wait` reaps it."""

    def __init__(self, pid: int, channels: list[socket.socket]) -> None:
        self.pid = pid
        self.channels = channels
        self.status: int | None = None

    def wait(self, timeout: float = 120.0) -> int:
        """Wait for the logger to finish (it does once every channel is closed); its exit code, or 1
        (logged) when it failed or did not finish in time."""
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                break
            if time.monotonic() > deadline:
                log.error("the logger process (pid %d) did not finish within %g s; stopping it", self.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                return 1
            time.sleep(0.02)
        code = os.waitstatus_to_exitcode(self.status)
        if code != 0:
            log.error("the logger process (pid %d) failed (%s): some flows may be missing from the log",
                      self.pid, f"exit code {code}" if code > 0 else f"signal {-code}")
            return 1
        return 0


def start_logger(spec: LogSpec, workers: int = 1, *, ready_timeout: float = 60.0) -> LoggerProcess:
    """Fork the logger with one channel per worker. The outputs are opened in the logger; if one cannot
    be (bad path, foreign HAR file, newer store), this raises the same ConfigError the in-process sink
    would have, before any worker starts. Call it while the process has no other threads."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(workers)]
    ready_r, ready_w = os.pipe()
    gc.freeze()  # the collector leaves pre-fork objects alone: fewer shared pages copied on write
    pid = os.fork()
    gc.unfreeze()
    if pid == 0:  # the logger
        code = 1
        try:
            os.close(ready_r)
            for w, _ in pairs:
                w.close()
            code = _logger_main(spec, [r for _, r in pairs], ready_w)
        except BaseException:  # pragma: no cover - reported, never propagated into the parent's code
            with contextlib.suppress(Exception):
                log.exception("the logger process failed")
        finally:
            os._exit(code)
    os.close(ready_w)
    for _, r in pairs:
        r.close()
    handle = LoggerProcess(pid, [w for w, _ in pairs])
    answer = b""
    deadline = time.monotonic() + ready_timeout
    with os.fdopen(ready_r, "rb") as f:
        while not answer.endswith(b"\n") and time.monotonic() < deadline:
            r, _, _ = select.select([f], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            chunk = os.read(f.fileno(), 4096)
            if not chunk:
                break
            answer += chunk
    if answer.startswith(b"ok"):
        return handle
    for w in handle.channels:
        w.close()
    handle.wait(10.0)
    message = answer.decode("utf-8", "replace").strip()
    if message.startswith("error "):
        raise ConfigError(message[len("error "):])
    raise ConfigError("the logger process did not start (see the messages above)")


# --- the logger process -----------------------------------------------------------------------------


def _logger_main(spec: LogSpec, socks: list[socket.socket], ready_fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # stop at end of file, after writing everything
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        outputs = _Outputs(spec)
    except ConfigError as e:
        os.write(ready_fd, b"error " + e.message.encode("utf-8", "replace") + b"\n")
        return 2
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    try:
        per_worker = _pump(socks, outputs)
    finally:
        outputs.close()
    if len(per_worker) > 1:
        log.info("logger: %d flows written (%s)", sum(per_worker),
                 ", ".join(f"worker {i + 1}: {n}" for i, n in enumerate(per_worker)))
    else:
        log.debug("logger: %d flows written", sum(per_worker))
    return 1 if outputs.failed else 0


def _pump(socks: list[socket.socket], outputs: "_Outputs") -> list[int]:
    """Read frames from every channel until all are closed; write each read cycle as one batch."""
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    counts = [0] * len(socks)
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        bufs[i] = bytearray()
    open_ = len(socks)
    while open_:
        payloads: list[bytes] = []
        for key, _ in sel.select():
            i, sock = key.data, key.fileobj
            buf = bufs[i]
            eof = False
            while True:  # take everything there is: the further behind, the bigger the batch
                try:
                    data = sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    log.error("logger: worker %d's channel failed: %s", i + 1, e.strerror or e)
                    data = b""
                if not data:
                    eof = True
                    break
                buf += data
                if len(buf) >= 8 << 20:
                    break
            counts[i] += _frames(buf, payloads)
            if eof:
                sel.unregister(sock)
                sock.close()
                open_ -= 1
                if buf:
                    log.error("logger: worker %d stopped in the middle of sending %d bytes; that part of "
                              "its last batch is lost", i + 1, len(buf))
        if payloads:
            outputs.write(payloads)
    return counts


def _frames(buf: bytearray, out: list[bytes]) -> int:
    """Move the complete frames at the start of `buf` to `out`; the number of records in them."""
    pos, n, records = 0, len(buf), 0
    while n - pos >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buf, pos)
        if n - pos - _HEADER.size < size:
            break
        payload = bytes(buf[pos + _HEADER.size:pos + _HEADER.size + size])
        out.append(payload)
        records += payload.count(b"\n") // 2
        pos += _HEADER.size + size
    del buf[:pos]
    return records


class _Outputs:
    """The JSONL log, flow store and HAR file, opened in the logger process."""

    def __init__(self, spec: LogSpec) -> None:
        self.jsonl = self.store = self.har = None
        self.failed = False
        try:
            if spec.log_file:
                from .sinks.jsonl import JsonlSink

                self.jsonl = JsonlSink(spec.log_file)
            if spec.store_path:
                from .store import StoreWriter

                self.store = StoreWriter(spec.store_path, max_flows=spec.store_max_flows,
                                         max_bytes=spec.store_max_bytes, one_statement=False)
                self.store.enforce_retention()
            if spec.har_file:
                from .har import HarFileSink

                self.har = HarFileSink(spec.har_file)
        except BaseException:
            self.close()
            raise

    def write(self, payloads: list[bytes]) -> None:
        lines = b"".join(payloads).split(b"\n")
        lines.pop()  # after the last newline
        cols, texts = lines[0::2], lines[1::2]
        self._guard("JSONL log", lambda: self.jsonl.write_lines(b"\n".join(texts) + b"\n", len(texts)),
                    self.jsonl)
        self._guard("flow store", lambda: self._store(cols, texts), self.store)
        self._guard("HAR file", lambda: self._har(texts), self.har)

    def _guard(self, what: str, fn, target) -> None:
        if target is None:
            return
        try:
            fn()
        except Exception:  # one broken output must not cost the others their records; say so loudly
            self.failed = True
            log.exception("logger: writing to the %s failed", what)

    def _store(self, cols: list[bytes], texts: list[bytes]) -> None:
        for start in range(0, len(texts), _WRITE_CHUNK):
            rows, nbytes = [], 0
            for c, t in zip(cols[start:start + _WRITE_CHUNK], texts[start:start + _WRITE_CHUNK]):
                rows.append((*loads(c), t.decode("utf-8")))
                nbytes += len(t)
            if self.store.write_rows(rows, nbytes):
                self.failed = True

    def _har(self, texts: list[bytes]) -> None:
        for t in texts:
            self.har.write_record(loads(t))

    def close(self) -> None:
        for out in (self.jsonl, self.store, self.har):
            if out is not None:
                try:
                    out.close()
                except Exception:
                    self.failed = True
                    log.exception("logger: closing %r failed", out)
