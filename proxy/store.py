"""The flow store: every flow kept in an embedded SQLite database, to list, search, show and export.

One row per flow, in `<confdir>/flows.sqlite3` by default. The columns the CLI filters and sorts on
are kept beside the full record (`Flow.to_dict(decode_body=render_body)`, the same JSON as a line of
the JSON Lines log, with headers and rendered bodies)::

    flows(id TEXT PRIMARY KEY, start REAL, host, method, status INTEGER (NULL: no response),
          url, mode, error_kind, size INTEGER (response body bytes on the wire), duration REAL (ms),
          record TEXT (JSON))
    indexes on start, host and status

Writing: the proxy writes through `StoreWriter` (pre-rendered rows, one transaction per batch) in its
logger process (proxy/logproc.py). `SqliteSink` is the same writer behind a thread, for a program that
writes flows in-process; it never touches the disk on the caller's thread: `emit` puts the Flow on a
bounded queue and returns; one writer thread renders the flows and inserts them in transactions of
up to `batch_size` rows, waiting at most `batch_interval` seconds for a batch to fill. The Flow is
rendered in the writer thread, not in `emit`: the relay never changes a Flow after emitting it, so
the record is the same, and the event loop is spared the body decoding and JSON encoding.

- Durability: WAL mode with synchronous=NORMAL. A crash of the proxy loses only the batch being
  gathered (at most `batch_interval` seconds of flows); a power cut may also lose the last
  committed transactions; the database is never left unreadable.
- Back-pressure, not loss: the queue holds at most `queue_flows` flows and `queue_bytes` captured
  body bytes. When it is full (the disk is slower than the traffic), `emit` waits, which slows the
  proxy down, and says so in the log once per episode. Only if the writer makes no room for
  `block_timeout` seconds (a hung disk) is the flow dropped, counted in `dropped` and logged as an
  error: a proxy that freezes for ever helps nobody. A batch the database refuses (disk full) is
  retried three times before it is dropped the same way.
- Retention: at most `max_flows` flows (default 100,000) and `max_bytes` of database pages in use
  (default 512 MiB); the oldest flows (by start time) are deleted first, down to 90 % of the
  limit. It is checked when the sink opens, then every `retention_every` inserted flows or
  `max_bytes / 16` inserted bytes, whichever comes first, so the cost is spread thin. Deleted pages
  are reused, so the file stops growing at about `max_bytes` (plus a bounded WAL).
- Privacy: the database, its -wal and -shm files are created 0600 (they hold cookies and tokens);
  `clear()` overwrites deleted content (secure_delete), then vacuums and truncates the WAL.

Reading (`open_store`, `FlowStore`) works while a proxy is writing: WAL readers see the last
committed transaction and never block the writer.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .decode import render_body
from .errors import ConfigError
from .flow import Flow

__all__ = [
    "STORE_FILENAME", "DEFAULT_MAX_FLOWS", "DEFAULT_MAX_BYTES", "default_store_path",
    "StoreError", "UnknownFlow", "AmbiguousFlow", "FlowFilter", "FlowStore", "open_store", "SqliteSink",
    "record_json", "record_columns", "StoreWriter",
]

log = logging.getLogger(__name__)

STORE_FILENAME = "flows.sqlite3"
DEFAULT_MAX_FLOWS = 100_000
DEFAULT_MAX_BYTES = 512 << 20
SCHEMA_VERSION = 1
_SIDE_FILES = ("-wal", "-shm", "-journal")
_BUSY_TIMEOUT_MS = 5000
_WAL_LIMIT = 64 << 20  # the WAL is truncated back to this after a checkpoint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS flows (
    id TEXT PRIMARY KEY,
    start REAL NOT NULL,
    host TEXT,
    method TEXT,
    status INTEGER,
    url TEXT,
    mode TEXT,
    error_kind TEXT,
    size INTEGER,
    duration REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flows_start ON flows(start);
CREATE INDEX IF NOT EXISTS flows_host ON flows(host);
CREATE INDEX IF NOT EXISTS flows_status ON flows(status);
"""
_INSERT = ("INSERT OR REPLACE INTO flows (id, start, host, method, status, url, mode, error_kind, size, duration,"
           " record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# The same insert for a whole batch in ONE statement: the rows arrive as a JSON array and json_each()
# unpacks them inside SQLite (3.38+ for ->>). executemany() steps once per row, and Python's sqlite3
# releases and retakes the GIL around every step: with the relay busy on the other side of the GIL,
# those hand-offs cost more CPU than the inserts (bench/ profile, keep-alive c=50). Only for a writer
# thread beside other Python threads: alone in a process (the logger), executemany() costs less than
# half as much per row (22 vs 49 us for a keep-alive record, measured on 20,000 bench records), since
# the batch's JSON is escaped once more by the writer and parsed again by SQLite.
_INSERT_BATCH = ("INSERT OR REPLACE INTO flows (id, start, host, method, status, url, mode, error_kind, size,"
                 " duration, record) SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5,"
                 " value->>6, value->>7, value->>8, value->>9, value->>10 FROM json_each(?)")
_BATCH_INSERT_OK = tuple(int(x) for x in sqlite3.sqlite_version.split(".")[:2]) >= (3, 38)
_BATCH_MAX_ROW_BYTES = 4096  # average record size up to which the one-statement batch is used
_SUMMARY_COLUMNS = ("id", "start", "host", "method", "status", "url", "mode", "error_kind", "size", "duration")


def default_store_path(confdir: str | os.PathLike) -> Path:
    """`<confdir>/flows.sqlite3`, with `~` expanded."""
    return Path(os.path.expanduser(os.fspath(confdir))) / STORE_FILENAME


class StoreError(Exception):
    """A query the store cannot answer (the message says why, for a person)."""


class UnknownFlow(StoreError):
    pass


class AmbiguousFlow(StoreError):
    def __init__(self, message: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


# --- records ---------------------------------------------------------------------------------------


def record_json(record: dict) -> str:
    """The record as compact JSON text, exactly as a JSON Lines log line (without the newline).

    A lone surrogate (from surrogateescape'd input) becomes the JSON escape "\\udcxx", as in the
    JSONL sink, so the text is always valid UTF-8.
    """
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def dumps_rows(rows: list[tuple]) -> str:
    """Rows as one JSON array of arrays, for _INSERT_BATCH."""
    from .flow import dumps

    return dumps(rows)


def record_columns(record: dict) -> tuple:
    """(start, host, method, status, url, mode, error_kind, size, duration) of a flow record."""
    req = record.get("request") or {}
    resp = record.get("response") or {}
    err = record.get("error")
    host = req.get("host")
    if not host:  # failed before a request was read: the name the client asked for, if any
        host = (((record.get("tls") or {}).get("client") or {}).get("sni")) or None
    status = resp.get("status") if resp else None
    size = ((resp.get("body") or {}).get("size")) if resp else None
    return (
        float(record.get("start") or 0.0),
        host,
        req.get("method"),
        status if isinstance(status, int) else None,
        req.get("url"),
        record.get("mode"),
        err.get("kind") if isinstance(err, dict) else (str(err) if err else None),
        size if isinstance(size, int) else None,
        (record.get("timings") or {}).get("total_ms"),
    )


# --- files -----------------------------------------------------------------------------------------


def _make_private_file(path: str) -> None:
    """Create `path` 0600 if it does not exist; tighten it to 0600 if it does. Raises OSError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _tighten_side_files(path: str) -> None:
    for suffix in _SIDE_FILES:
        try:
            st = os.lstat(path + suffix)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                os.chmod(path + suffix, 0o600)
        except FileNotFoundError:
            pass


def _uri(path: str, mode: str) -> str:
    from urllib.parse import quote

    return f"file:{quote(os.path.abspath(path))}?mode={mode}"


def _connect(path: str, readonly: bool) -> sqlite3.Connection:
    """Open (and for writing, create and set up) the database. Raises ConfigError naming the path."""
    what = "flow store"
    try:
        if readonly:
            if not os.path.exists(path):
                raise ConfigError(f"no flow store at {path} (the proxy creates it when it runs with the store "
                                  "enabled; see --store)")
            conn = sqlite3.connect(_uri(path, "ro"), uri=True, check_same_thread=False,
                                   isolation_level=None)
        else:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                os.makedirs(parent, mode=0o700, exist_ok=True)
            _make_private_file(path)
            conn = sqlite3.connect(_uri(path, "rw"), uri=True, check_same_thread=False, isolation_level=None)
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"cannot open the {what} {path}: {e.strerror or e}") from None
    except sqlite3.Error as e:
        raise ConfigError(f"cannot open the {what} {path}: {e}") from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(f"the {what} {path} was made by a newer httpsdump (schema {version}); "
                              "upgrade, or choose another --store")
        if readonly:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "flows" not in tables:
                raise ConfigError(f"{path} is not an httpsdump flow store (it has no flows table)")
        else:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("flow store %s: WAL mode unavailable (journal mode %s); readers may wait", path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
            conn.executescript(_SCHEMA)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            _tighten_side_files(path)
    except ConfigError:
        conn.close()
        raise
    except sqlite3.Error as e:
        conn.close()
        raise ConfigError(f"cannot use the {what} {path}: {e}") from None
    except OSError as e:
        conn.close()
        raise ConfigError(f"cannot make the {what} {path} private (0600): {e.strerror or e}") from None
    return conn


# --- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Which flows a query returns. Every field that is set must match (AND).

    host: a glob (`*`, `?`, `[...]`), matched case-insensitively against the request's host.
    method: an HTTP method, case-insensitively.
    status: inclusive (low, high) ranges, any of which matches; `failed` also matches flows with
        an error (no response, or a response cut short). With neither, status does not filter.
    since: flows that started at or after this time (seconds since the epoch).
    grep: text that must occur in the URL, a header name or value (request or response, trailers
        too), a decoded text body, or the error message; case-insensitive for ASCII letters.
    limit: at most this many flows (0 or None: all), the newest ones when the query runs newest first.
    """

    host: str | None = None
    method: str | None = None
    status: tuple[tuple[int, int], ...] = ()
    failed: bool = False
    since: float | None = None
    grep: str | None = None
    limit: int | None = None


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(s: str) -> str:
    return s.translate(_ASCII_LOWER)


def _grep_fields(record: dict) -> Iterator[str]:
    req, resp, err = record.get("request"), record.get("response"), record.get("error")
    if isinstance(req, dict) and isinstance(req.get("url"), str):
        yield req["url"]
    for msg in (req, resp):
        if not isinstance(msg, dict):
            continue
        for key in ("headers", "trailers"):
            for pair in msg.get(key) or ():
                yield from (x for x in pair if isinstance(x, str))
        body = msg.get("body")
        if isinstance(body, dict) and isinstance(body.get("text"), str):
            yield body["text"]
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        yield err["message"]


def record_matches_grep(record: dict, needle: str) -> bool:
    """True if `needle` occurs in one of the fields `FlowFilter.grep` searches."""
    n = _ascii_lower(needle)
    return any(n in _ascii_lower(field) for field in _grep_fields(record))


class FlowStore:
    """A connection to a flow store. Use `open_store` to get one; close it (or use `with`)."""

    def __init__(self, path: str, conn: sqlite3.Connection, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self._conn = conn
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FlowStore {self.path!r}{' ro' if self.readonly else ''}>"

    def __enter__(self) -> "FlowStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- queries -

    def _where(self, f: FlowFilter | None) -> tuple[str, list]:
        if f is None:
            return "", []
        clauses, args = [], []
        if f.host:
            clauses.append("lower(host) GLOB ?")
            args.append(_ascii_lower(f.host))
        if f.method:
            clauses.append("upper(method) = ?")
            args.append(f.method.upper())
        if f.status or f.failed:
            parts = ["status BETWEEN ? AND ?"] * len(f.status)
            for lo, hi in f.status:
                args += [lo, hi]
            if f.failed:
                parts.append("status IS NULL OR error_kind IS NOT NULL")
            clauses.append("(" + " OR ".join(parts) + ")")
        if f.since is not None:
            clauses.append("start >= ?")
            args.append(float(f.since))
        if f.grep:
            # A cheap pre-filter on the JSON text: a substring of a JSON string value appears in the
            # record escaped exactly as json.dumps escapes it alone. `record_matches_grep` decides.
            needle = json.dumps(_ascii_lower(f.grep), ensure_ascii=False)[1:-1]
            clauses.append("instr(lower(record), ?) > 0")
            args.append(needle)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def _rows(self, f: FlowFilter | None, columns: str, newest_first: bool) -> Iterator[sqlite3.Row]:
        where, args = self._where(f)
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {columns} FROM flows{where} ORDER BY start {order}, rowid {order}"
        limit = f.limit if f is not None and f.limit else None
        if limit and not (f and f.grep):
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            cur = self._conn.execute(sql, args)
        n = 0
        while True:
            with self._lock:
                rows = cur.fetchmany(256)
            if not rows:
                return
            for row in rows:
                yield row
                n += 1
                if limit and n >= limit:
                    cur.close()
                    return

    def query(self, filters: FlowFilter | None = None, *, newest_first: bool = False) -> Iterator[dict]:
        """Full records of the matching flows, oldest first (or newest first), lazily."""
        f = filters
        if f is not None and f.grep:
            yield from _limited(self._grep(f, newest_first, lambda row, rec: rec), f.limit)
            return
        for (text,) in self._rows(f, "record", newest_first):
            yield json.loads(text)

    def summaries(self, filters: FlowFilter | None = None, *, newest_first: bool = False) -> Iterator[dict]:
        """The indexed columns of the matching flows (no record parsing unless grep is set)."""
        f = filters
        cols = ", ".join(_SUMMARY_COLUMNS)
        if f is not None and f.grep:
            yield from _limited(self._grep(f, newest_first, lambda row, rec: dict(zip(_SUMMARY_COLUMNS, row))),
                                f.limit)
            return
        for row in self._rows(f, cols, newest_first):
            yield dict(zip(_SUMMARY_COLUMNS, row))

    def _grep(self, f: FlowFilter, newest_first: bool, make: Callable[[tuple, dict], dict]) -> Iterator[dict]:
        cols = ", ".join(_SUMMARY_COLUMNS) + ", record"
        for row in self._rows(f, cols, newest_first):
            rec = json.loads(row[-1])
            if record_matches_grep(rec, f.grep or ""):
                yield make(row[:-1], rec)

    def count(self, filters: FlowFilter | None = None) -> int:
        if filters is not None and filters.grep:
            return sum(1 for _ in self.summaries(filters))
        where, args = self._where(filters)
        with self._lock:
            n = self._conn.execute(f"SELECT count(*) FROM flows{where}", args).fetchone()[0]
        if filters is not None and filters.limit:
            n = min(n, filters.limit)
        return n

    def get(self, id_prefix: str) -> dict:
        """The record whose id is or starts with `id_prefix`. Raises UnknownFlow or AmbiguousFlow."""
        prefix = id_prefix.strip().lower()
        if not prefix or not all(c.isalnum() or c in "-_" for c in prefix) or not prefix.isascii():
            raise UnknownFlow(f"{id_prefix!r} is not a flow id (ids are hexadecimal, as 'flows list' shows them)")
        with self._lock:
            rows = self._conn.execute("SELECT id, record FROM flows WHERE id = ? OR id GLOB ? ORDER BY id LIMIT 6",
                                      (prefix, prefix + "*")).fetchall()
        exact = [r for r in rows if r[0] == prefix]
        if exact:
            return json.loads(exact[0][1])
        if not rows:
            raise UnknownFlow(f"no flow with an id starting with {prefix!r} in {self.path}")
        if len(rows) > 1:
            ids = [r[0] for r in rows]
            shown = ", ".join(i[: max(len(prefix) + 4, 12)] for i in ids[:5]) + (", …" if len(ids) > 5 else "")
            raise AmbiguousFlow(f"the id prefix {prefix!r} matches more than one flow ({shown}); give more of the id",
                                ids)
        return json.loads(rows[0][1])

    # -- changes -

    def add(self, records: Iterable[dict]) -> int:
        """Insert records (e.g. imported from a JSON Lines log) in one transaction. Returns how many."""
        self._writable()
        rows = [(r["id"], *record_columns(r), record_json(r)) for r in records]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(_INSERT, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return len(rows)

    def clear(self) -> int:
        """Delete every flow, overwriting its content on disk; returns how many were removed."""
        self._writable()
        with self._lock:
            c = self._conn
            c.execute("PRAGMA secure_delete = ON")
            c.execute("BEGIN IMMEDIATE")
            try:
                n = c.execute("SELECT count(*) FROM flows").fetchone()[0]
                c.execute("DELETE FROM flows")
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            # Give the space back and drop old page images from the WAL. Both need a moment without
            # a writer; if the proxy is busy, the content is already overwritten, so skip quietly.
            for sql in ("VACUUM", "PRAGMA wal_checkpoint(TRUNCATE)"):
                try:
                    c.execute(sql)
                except sqlite3.OperationalError as e:
                    log.debug("flow store %s: %s skipped: %s", self.path, sql, e)
        return n

    def _writable(self) -> None:
        if self.readonly:
            raise StoreError(f"the flow store {self.path} was opened read-only")


def _limited(it: Iterator[dict], limit: int | None) -> Iterator[dict]:
    for i, x in enumerate(it):
        if limit and i >= limit:
            return
        yield x


def open_store(path: str | os.PathLike, readonly: bool = True) -> FlowStore:
    """Open the flow store at `path`. Raises ConfigError (naming the path) if it cannot be used.

    Read-only stores can be read while a proxy writes to them. A writable store is created (0600,
    WAL mode) when it does not exist.
    """
    p = os.path.expanduser(os.fspath(path))
    return FlowStore(p, _connect(p, readonly), readonly)


# --- writing ---------------------------------------------------------------------------------------


class _Retention:
    """Deletes the oldest flows beyond `max_flows` or `max_bytes` of used pages, down to 90 %."""

    def __init__(self, max_flows: int, max_bytes: int, every: int) -> None:
        self.max_flows, self.max_bytes, self.every = max_flows, max_bytes, every
        self.every_bytes = max(max_bytes // 16, 1)
        self.rows_since = self.bytes_since = 0
        self.deleted = 0

    def note(self, rows: int, nbytes: int) -> bool:
        self.rows_since += rows
        self.bytes_since += nbytes
        return self.rows_since >= self.every or self.bytes_since >= self.every_bytes

    @staticmethod
    def used_bytes(conn: sqlite3.Connection) -> int:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page_size

    def enforce(self, conn: sqlite3.Connection) -> int:
        self.rows_since = self.bytes_since = 0
        removed = 0
        count = conn.execute("SELECT count(*) FROM flows").fetchone()[0]
        if count > self.max_flows:
            n = count - (self.max_flows * 9) // 10
            removed += self._delete_oldest(conn, n)
            count -= n
        for _ in range(8):  # each round deletes about what is needed; a few rounds at most
            used = self.used_bytes(conn)
            if used <= self.max_bytes or count <= 1:
                break
            target = (self.max_bytes * 9) // 10
            per_row = max(used // max(count, 1), 1)
            n = min(max((used - target + per_row - 1) // per_row, 1), count - 1)
            removed += self._delete_oldest(conn, n)
            count -= n
        self.deleted += removed
        return removed

    @staticmethod
    def _delete_oldest(conn: sqlite3.Connection, n: int) -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute("DELETE FROM flows WHERE rowid IN (SELECT rowid FROM flows ORDER BY start, rowid LIMIT ?)",
                               (n,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return cur.rowcount


def _body_cost(flow: Flow) -> int:
    n = 1024
    for m in (flow.request, flow.response):
        if m is not None:
            n += len(m.body.captured)
    return n


_open_sinks: "weakref.WeakSet[SqliteSink]" = weakref.WeakSet()


@atexit.register
def _close_open_sinks() -> None:  # flush what is queued if the program ends without close()
    for sink in list(_open_sinks):
        try:
            sink.close(timeout=10.0)
        except Exception:  # pragma: no cover - at exit, nothing more can be done
            pass


class StoreWriter:
    """The synchronous half of the store: pre-rendered rows in, one transaction per `write_rows` call
    (retried three times, then dropped, counted and logged), retention checked as rows go in.

    Used by `SqliteSink`'s writer thread and by the logger process (proxy/logproc.py), which receives
    rows already rendered by the workers. Not thread-safe: one writer at a time.
    """

    def __init__(self, path: str, *, max_flows: int = DEFAULT_MAX_FLOWS, max_bytes: int = DEFAULT_MAX_BYTES,
                 retention_every: int = 500, one_statement: bool = True) -> None:
        if max_flows < 1 or max_bytes < 1:
            raise ConfigError("flow store limits must be positive")
        # one_statement: a batch of small records in one INSERT (_INSERT_BATCH), for a writer thread
        # that shares the GIL; a writer alone in its process inserts row by row (see _INSERT_BATCH).
        self._one_statement = one_statement and _BATCH_INSERT_OK
        self.path = os.path.expanduser(os.fspath(path))
        self.conn = _connect(self.path, readonly=False)
        self._retention = _Retention(max_flows, max_bytes, retention_every)
        self.written = 0
        self.dropped = 0

    @property
    def deleted(self) -> int:
        return self._retention.deleted

    def write_rows(self, rows: list[tuple], nbytes: int) -> int:
        """Insert `rows` ((id, *record_columns, text) each) in one transaction; returns how many were
        dropped (0, or all of them after the retries failed)."""
        if not rows:
            return 0
        conn = self.conn
        delays = (0.1, 0.5, 2.0)
        for attempt in range(len(delays) + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    # One statement for a batch of small records; large ones (decoded bodies) go
                    # row by row: inside the batch's JSON array each record's text would be escaped
                    # again and parsed again by SQLite, which costs more than the per-row calls.
                    if self._one_statement and nbytes <= _BATCH_MAX_ROW_BYTES * len(rows):
                        conn.execute(_INSERT_BATCH, (dumps_rows(rows),))
                    else:
                        conn.executemany(_INSERT, rows)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                break
            except sqlite3.Error as e:
                if attempt == len(delays):
                    self.dropped += len(rows)
                    log.error("flow store %s: cannot store %d flows: %s (%d dropped so far)", self.path,
                              len(rows), e, self.dropped)
                    return len(rows)
                log.warning("flow store %s: write failed (%s); retrying", self.path, e)
                time.sleep(delays[attempt])
        self.written += len(rows)
        if self._retention.note(len(rows), nbytes):
            self.enforce_retention()
        return 0

    def enforce_retention(self) -> None:
        try:
            removed = self._retention.enforce(self.conn)
        except sqlite3.Error as e:
            log.warning("flow store %s: retention check failed: %s", self.path, e)
            return
        if removed:
            log.debug("flow store %s: retention removed %d old flows", self.path, removed)
        try:
            _tighten_side_files(self.path)
        except OSError:
            pass

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self.conn.close()


class SqliteSink:
    """A Sink that keeps every flow in the flow store at `path` (see the module docstring).

    Raises ConfigError naming the path if the store cannot be created or opened. `emit` never
    touches the disk and never raises; `close` writes everything still queued, then returns.
    Counters: `written` (rows committed), `dropped` (flows lost; logged as errors), `pending`.
    """

    def __init__(self, path: str | os.PathLike, *, max_flows: int = DEFAULT_MAX_FLOWS,
                 max_bytes: int = DEFAULT_MAX_BYTES, batch_size: int = 200, batch_interval: float = 0.05,
                 queue_flows: int = 10_000, queue_bytes: int = 128 << 20, block_timeout: float = 10.0,
                 retention_every: int = 500, render: Callable[..., dict] = render_body) -> None:
        if max_flows < 1 or max_bytes < 1 or batch_size < 1 or queue_flows < 1 or queue_bytes < 1:
            raise ConfigError("flow store limits must be positive")
        self._writer = StoreWriter(path, max_flows=max_flows, max_bytes=max_bytes, retention_every=retention_every)
        self.path = self._writer.path
        self._conn = self._writer.conn
        self._render = render
        self._batch_size, self._batch_interval = batch_size, batch_interval
        self._batch_bytes = max(queue_bytes // 8, 1 << 20)
        self._queue_flows, self._queue_bytes, self._block_timeout = queue_flows, queue_bytes, block_timeout
        self._cond = threading.Condition()
        self._pending: collections.deque[tuple[Flow, int]] = collections.deque()
        self._pending_bytes = 0
        self._closing = False
        self._closed = False
        self._writer_dead = False
        self._stalled = False
        self.dropped = 0
        self._taken_count = 0  # flows taken off the queue by the writer
        self._done_count = 0  # of those, the ones finished (committed, or dropped and logged)
        self._thread = threading.Thread(target=self._run, name=f"flow-store {os.path.basename(self.path)}",
                                        daemon=True)
        self._thread.start()
        _open_sinks.add(self)

    def __repr__(self) -> str:
        return f"<SqliteSink {self.path!r}{' closed' if self._closed else ''}>"

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def deleted(self) -> int:
        """Flows removed by retention since the sink opened."""
        return self._writer.deleted

    @property
    def written(self) -> int:
        """Rows committed."""
        return self._writer.written

    # -- the caller's side -

    def _full(self, cost: int) -> bool:
        return len(self._pending) >= self._queue_flows or (
            bool(self._pending) and self._pending_bytes + cost > self._queue_bytes)

    def emit(self, flow: Flow) -> None:
        try:
            cost = _body_cost(flow)
        except Exception:
            cost = 1024
        with self._cond:
            if self._closing:
                log.warning("flow store %s: flow %s emitted after close; dropped", self.path,
                            getattr(flow, "id", "?"))
                return
            if self._full(cost) and not self._writer_dead:
                if not self._stalled:
                    self._stalled = True
                    log.warning("flow store %s: the writer is falling behind (%d flows queued); "
                                "slowing the proxy down until it catches up", self.path, len(self._pending))
                self._cond.wait_for(lambda: not self._full(cost) or self._closing or self._writer_dead,
                                    self._block_timeout)
            if self._writer_dead or self._closing or self._full(cost):
                self.dropped += 1
                why = "the writer thread has stopped" if self._writer_dead else (
                    "closed" if self._closing else f"no room after waiting {self._block_timeout:g} s")
                log.error("flow store %s: flow %s NOT stored (%s; %d dropped so far)", self.path,
                          getattr(flow, "id", "?"), why, self.dropped)
                return
            self._pending.append((flow, cost))
            self._pending_bytes += cost
            # Wake the writer only when it has something new to decide: the first flow of a batch, or
            # a full batch. Waking it for every flow cost more CPU than the inserts (py-spy).
            n = len(self._pending)
            if n == 1 or n >= self._batch_size or self._pending_bytes >= self._batch_bytes:
                self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Write every queued flow, stop the writer and close the database. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("flow store %s: the writer did not finish within %g s; %d flows not stored",
                      self.path, timeout or 0, len(self._pending))
            return
        with self._cond:
            self._closed = True
        _open_sinks.discard(self)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every flow emitted so far is committed (or dropped). True if it was in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._emitted_marker()
            while self._done_count < target and not self._writer_dead:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _emitted_marker(self) -> int:
        return self._taken_count + len(self._pending)

    # -- the writer thread -

    def _next_batch(self) -> list[tuple[Flow, int]] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None  # closing, and nothing left
            deadline = time.monotonic() + self._batch_interval
            while (len(self._pending) < self._batch_size and self._pending_bytes < self._batch_bytes
                   and not self._closing):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, nbytes = [], 0
            while self._pending and len(batch) < self._batch_size and (not batch or nbytes < self._batch_bytes):
                item = self._pending.popleft()
                batch.append(item)
                nbytes += item[1]
            self._pending_bytes -= nbytes
            self._taken_count += len(batch)
            if self._stalled and not self._full(0):
                self._stalled = False
                log.warning("flow store %s: the writer caught up", self.path)
            self._cond.notify_all()
            return batch

    def _run(self) -> None:
        try:
            self._writer.enforce_retention()
            while True:
                batch = self._next_batch()
                if batch is None:
                    break
                try:
                    rows, nbytes = self._render_rows([f for f, _ in batch])
                    self._count_dropped(self._writer.write_rows(rows, nbytes))
                finally:
                    with self._cond:
                        self._done_count += len(batch)
                        self._cond.notify_all()
        except BaseException:  # a bug: say so loudly, and make emit stop waiting for us
            log.exception("flow store %s: the writer thread failed; flows are no longer stored", self.path)
            with self._cond:
                self._writer_dead = True
                lost = len(self._pending)
                self._pending.clear()
                self._pending_bytes = 0
                self.dropped += lost
                self._done_count = self._taken_count = self._taken_count + lost
                self._cond.notify_all()
        finally:
            self._writer.close()

    def _count_dropped(self, n: int) -> int:
        with self._cond:
            self.dropped += n
            return self.dropped

    def _render_rows(self, flows: list[Flow]) -> tuple[list[tuple], int]:
        rows, nbytes = [], 0
        for flow in flows:
            try:
                if self._render is render_body:
                    record, text = flow.rendered()  # the same text as the JSON Lines log, rendered once
                else:
                    record = flow.to_dict(decode_body=self._render)
                    text = record_json(record)
                rows.append((record["id"], *record_columns(record), text))
                nbytes += len(text)
            except Exception:  # a rendering bug must not cost the other flows their place
                self._count_dropped(1)
                log.exception("flow store %s: cannot render flow %s; not stored", self.path,
                              getattr(flow, "id", "?"))
        return rows, nbytes
