"""The JSON Lines sink: one complete JSON object per line, appended to a private file.

The log holds cookies, tokens and bodies, so the file is created 0600 and tightened to 0600 if it
already exists with looser permissions. Whole lines are written with a single os.write() on an
O_APPEND descriptor: a reader (`tail -f`, `jq`) sees whole lines at once, and a crash of the proxy
cannot leave half a line behind. The flows that end in the same event-loop iteration share that
write (they wait for no timer: the write is the loop's next callback). If the disk fills up
mid-write, the partial batch is cut off again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading

from ..files import open_private
from ..flow import Flow

__all__ = ["JsonlSink"]

log = logging.getLogger(__name__)


class JsonlSink:
    """Appends `flow.to_dict(decode_body=render_body)` as one line per flow to `path`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        fd, st = open_private(self.path, os.O_WRONLY | os.O_APPEND, "traffic log")
        self._regular = stat.S_ISREG(st.st_mode)  # not a FIFO or /dev/stdout: those are not ours
        self._fd: int | None = fd
        self._lock = threading.Lock()
        self._loop = None
        self._batch: list[bytes] = []
        self._flush_scheduled = False

    def __repr__(self) -> str:
        return f"<JsonlSink {self.path!r}{' closed' if self._fd is None else ''}>"

    def emit(self, flow: Flow) -> None:
        try:
            data = flow.rendered_line()  # rendered once for all sinks
        except Exception:  # a rendering bug must not cost the relay a flow; say so loudly
            log.exception("JSONL sink could not render flow %s", getattr(flow, "id", "?"))
            return
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop (a tool, a test): write at once
                with self._lock:
                    self._write_or_drop(data, 1)
                return
        # On the event loop: the flows that end in one loop iteration go out in one write() (under
        # load, several per iteration; the system call per flow showed in the profile).
        self._batch.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the batched lines now (also called by close())."""
        self._flush_scheduled = False
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        with self._lock:
            self._write_or_drop(b"".join(batch) if len(batch) > 1 else batch[0], len(batch))

    def _write_or_drop(self, data: bytes, count: int) -> None:
        if self._fd is None:
            log.warning("JSONL sink %s: %d flows emitted after close; dropped", self.path, count)
            return
        self._write(data, f"batch of {count}" if count > 1 else "1 flow")

    def write_lines(self, data: bytes, count: int) -> None:
        """Append `count` whole lines at once (the logger process's batches): one write, and a batch
        that cannot be written completely is cut off again, so no line is ever left half-written."""
        with self._lock:
            if self._fd is None:
                log.warning("JSONL sink %s: %d flows written after close; dropped", self.path, count)
                return
            self._write(data, f"batch of {count}")

    def _write(self, data: bytes, flow_id: str) -> None:
        start, view = -1, memoryview(data)
        try:
            if self._regular:
                start = os.lseek(self._fd, 0, os.SEEK_END)
            while view:  # one call in practice; loop for the rare short write
                view = view[os.write(self._fd, view):]
        except OSError as e:
            log.error("JSONL sink %s: cannot write %s: %s", self.path, flow_id, e.strerror or e)
            if start >= 0 and len(view) < len(data):
                try:
                    os.ftruncate(self._fd, start)  # never leave half a line
                except OSError:
                    pass

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                if self._regular:
                    os.fsync(fd)
            except OSError as e:
                log.warning("JSONL sink %s: fsync failed: %s", self.path, e.strerror or e)
            finally:
                os.close(fd)
