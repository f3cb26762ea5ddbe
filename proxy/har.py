"""HAR 1.2 (HTTP Archive) export of flow records, for browsers' devtools, HAR viewers and other tools.

Spec: http://www.softwareishard.com/blog/har-12-spec/ . Input is the flow record of the JSON Lines
log and the flow store (`Flow.to_dict(decode_body=render_body)`), so a HAR can be made from either.

How a flow maps to an entry:

- `startedDateTime`: the flow's start, ISO 8601 in UTC with milliseconds ("…T12:34:56.640+00:00").
- request/response headers in wire order and case; `cookies` parsed from Cookie / Set-Cookie;
  `queryString` from the URL (percent-decoded); `headersSize` is -1 (the exact bytes of the head,
  whitespace included, are not kept); `bodySize` is the body's size on the wire (after chunked
  framing is removed, before content codings are undone).
- `content`: `size` is the decoded size where it is known, else the size on the wire; `text` is the
  decoded text for text bodies, or the captured bytes in base64 with `encoding: "base64"`; it is
  left out when nothing was captured. `_truncated: true` marks a capture cut by the capture limit,
  `_decodeError` a content coding that could not be undone (then `text` holds the coded bytes).
  Request bodies go to `postData` (`text`; binary ones base64 with `_encoding: "base64"`).
- `timings` (ms): `blocked` and `dns` are -1 (not measured; DNS is part of `connect`); `connect` is
  TCP connect + TLS to the origin, `ssl` the TLS part (included in `connect`, as the spec says), both
  -1 on a reused connection; `send` runs from the request's start (or the end of the connect, for
  plain-HTTP flows whose connection was opened for them) until the request was sent; `wait` until
  the first response byte; `receive` until the end. Time a failed flow spent before any of these
  milestones is reported as `blocked`. `time` is the sum of the non-negative timings except `ssl`
  (which is inside `connect`). For HTTPS flows the connection is opened during the CONNECT
  handshake, before the request starts, so for the first request on a connection `time` exceeds the
  flow's own duration by the connect time.
- Failed flows are entries too: `response.status` 0 (as browsers write failed requests) when there
  was no response, and `_error` with the flow's error record. A flow that failed before a request
  was read (e.g. the client's TLS handshake) gets method "CONNECT", the URL `https://<SNI>/` (or
  `https://unknown.invalid/` without one) and `_noRequest: true`.
- Custom fields (they start with "_", as the spec requires): `_id`, `_client`, `_mode`, `_tls`,
  `_insecure`, `_upgraded`, `_error`, `_timings` (the flow's own timings).

`HarFileSink` writes a HAR file continuously: the file is a complete, valid HAR after every flow
(each flow is written in place of the closing brackets, which are written again after it), so it can
be opened at any time, memory use does not grow with the number of flows, and a crash loses nothing
already written. An existing HAR file that this sink wrote is continued; any other existing file is
refused rather than overwritten.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import json
import logging
import os
import stat
import tempfile
import threading
from typing import IO, Any, Iterable, Iterator
from urllib.parse import parse_qsl, urlsplit

from .decode import render_body
from .errors import ConfigError
from .files import open_private
from .flow import Flow

__all__ = ["flows_to_har", "har_entry", "write_har", "iter_har_chunks", "atomic_write", "HarFileSink", "CREATOR"]

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("httpsdump")
    except Exception:
        return "0.1.0"


CREATOR = {"name": "httpsdump", "version": _version()}

_HEAD = ('{"log":{"version":"1.2","creator":' + json.dumps(CREATOR, separators=(",", ":"))
         + ',"pages":[],"entries":[').encode()
_TAIL = b"\n]}}\n"


# --- one entry ------------------------------------------------------------------------------------


def _iso(ts: Any) -> str:
    try:
        t = float(ts or 0.0)
        return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).isoformat(timespec="milliseconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "1970-01-01T00:00:00.000+00:00"


def _headers(msg: dict | None, key: str = "headers") -> list[dict]:
    out = []
    for pair in (msg or {}).get(key) or ():
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            out.append({"name": str(pair[0]), "value": str(pair[1])})
    return out


def _header(msg: dict | None, name: str) -> str | None:
    for h in _headers(msg):
        if h["name"].lower() == name:
            return h["value"]
    return None


def _http_version(msg: dict | None) -> str:
    v = (msg or {}).get("http_version")
    return f"HTTP/{v}" if v else ""


def _request_cookies(req: dict | None) -> list[dict]:
    out = []
    for h in _headers(req):
        if h["name"].lower() != "cookie":
            continue
        for part in h["value"].split(";"):
            name, eq, value = part.strip().partition("=")
            if name or eq:
                out.append({"name": name.strip(), "value": value.strip()})
    return out


def _response_cookies(resp: dict | None) -> list[dict]:
    out = []
    for h in _headers(resp):
        if h["name"].lower() != "set-cookie":
            continue
        first, *attrs = h["value"].split(";")
        name, _, value = first.strip().partition("=")
        c: dict[str, Any] = {"name": name.strip(), "value": value.strip()}
        for attr in attrs:
            k, _, v = attr.strip().partition("=")
            k, v = k.strip().lower(), v.strip()
            if k == "path" and v:
                c["path"] = v
            elif k == "domain" and v:
                c["domain"] = v
            elif k == "expires" and v:
                try:
                    when = email.utils.parsedate_to_datetime(v)
                    if when.tzinfo is None:
                        when = when.replace(tzinfo=_dt.timezone.utc)
                    c["expires"] = when.isoformat()
                except (TypeError, ValueError, IndexError, OverflowError):
                    pass
            elif k == "httponly":
                c["httpOnly"] = True
            elif k == "secure":
                c["secure"] = True
            elif k == "samesite" and v:
                c["_sameSite"] = v
            elif k == "max-age" and v:
                c["_maxAge"] = v
        out.append(c)
    return out


def _query(url: str) -> list[dict]:
    try:
        q = urlsplit(url).query
    except ValueError:
        return []
    return [{"name": k, "value": v} for k, v in parse_qsl(q, keep_blank_values=True, errors="replace")]


def _body(body: dict | None) -> tuple[str | None, str | None, dict]:
    """(text, encoding, custom fields) of a rendered body."""
    body = body or {}
    extra: dict[str, Any] = {}
    if body.get("truncated"):
        extra["_truncated"] = True
    if body.get("decode_error"):
        extra["_decodeError"] = str(body["decode_error"])
    if isinstance(body.get("text"), str):
        return body["text"], None, extra
    if isinstance(body.get("base64"), str):
        return body["base64"], "base64", extra
    return None, None, extra


def _int(x: Any, default: int = 0) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) else default


def _content(resp: dict) -> dict:
    body = resp.get("body") or {}
    wire = _int(body.get("size"))
    decoded = body.get("decoded_size")
    content: dict[str, Any] = {"size": _int(decoded, wire), "mimeType": _header(resp, "content-type") or ""}
    if isinstance(decoded, int) and decoded >= wire:
        content["compression"] = decoded - wire
    text, encoding, extra = _body(body)
    if text is not None:
        content["text"] = text
    if encoding:
        content["encoding"] = encoding
    content.update(extra)
    return content


def _post_data(req: dict) -> dict | None:
    body = req.get("body") or {}
    if not body.get("size") and not body.get("captured"):
        return None
    text, encoding, extra = _body(body)
    post: dict[str, Any] = {"mimeType": _header(req, "content-type") or "", "text": text or ""}
    if encoding:
        post["_encoding"] = encoding
    post.update(extra)
    return post


def _ms(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 else None


def _timings(record: dict) -> tuple[dict, float]:
    t = record.get("timings") or {}
    connect, tls = _ms(t.get("connect_ms")), _ms(t.get("upstream_tls_ms"))
    sent, first, total = _ms(t.get("request_sent_ms")), _ms(t.get("first_byte_ms")), _ms(t.get("total_ms"))
    out = {"blocked": -1.0, "dns": -1.0, "connect": -1.0, "ssl": -1.0, "send": 0.0, "wait": 0.0, "receive": 0.0}
    if connect is not None:
        out["connect"] = connect + (tls or 0.0)
        out["ssl"] = tls if tls is not None else -1.0
    # Plain-HTTP flows open their connection after the request started; HTTPS flows before.
    pos = out["connect"] if (record.get("mode") != "https" and connect is not None) else 0.0
    if sent is not None:
        out["send"] = max(sent - pos, 0.0)
        pos = max(pos, sent)
    if first is not None:
        out["wait"] = max(first - pos, 0.0)
        pos = max(pos, first)
        if total is not None:
            out["receive"] = max(total - pos, 0.0)
            pos = max(pos, total)
    if total is not None and total > pos:  # a flow that failed before its next milestone
        out["blocked"] = total - pos
    out = {k: round(v, 3) for k, v in out.items()}
    time = sum(v for k, v in out.items() if v > 0 and k != "ssl")
    return out, round(time, 3)


def har_entry(record: dict) -> dict:
    """One HAR 1.2 entry for a flow record (never raises for a record the proxy wrote)."""
    req = record.get("request") if isinstance(record.get("request"), dict) else None
    resp = record.get("response") if isinstance(record.get("response"), dict) else None
    err = record.get("error")
    tls = record.get("tls") or {}
    entry: dict[str, Any] = {"startedDateTime": _iso(record.get("start"))}
    timings, total = _timings(record)
    entry["time"] = total
    if req is not None:
        url = str(req.get("url") or "")
        request: dict[str, Any] = {
            "method": str(req.get("method") or ""),
            "url": url,
            "httpVersion": _http_version(req),
            "cookies": _request_cookies(req),
            "headers": _headers(req),
            "queryString": _query(url),
            "headersSize": -1,
            "bodySize": _int((req.get("body") or {}).get("size")),
        }
        post = _post_data(req)
        if post is not None:
            request["postData"] = post
        if req.get("trailers"):
            request["_trailers"] = _headers(req, "trailers")
    else:
        sni = ((tls.get("client") or {}).get("sni")) or "unknown.invalid"
        request = {"method": "CONNECT", "url": f"https://{sni}/", "httpVersion": "", "cookies": [],
                   "headers": [], "queryString": [], "headersSize": -1, "bodySize": -1}
        entry["_noRequest"] = True
    entry["request"] = request
    if resp is not None:
        response: dict[str, Any] = {
            "status": _int(resp.get("status")),
            "statusText": str(resp.get("reason") or ""),
            "httpVersion": _http_version(resp),
            "cookies": _response_cookies(resp),
            "headers": _headers(resp),
            "content": _content(resp),
            "redirectURL": _header(resp, "location") or "",
            "headersSize": -1,
            "bodySize": _int((resp.get("body") or {}).get("size")),
        }
        if resp.get("trailers"):
            response["_trailers"] = _headers(resp, "trailers")
    else:
        response = {"status": 0, "statusText": "", "httpVersion": "", "cookies": [], "headers": [],
                    "content": {"size": 0, "mimeType": ""}, "redirectURL": "", "headersSize": -1, "bodySize": -1}
    entry["response"] = response
    entry["cache"] = {}
    entry["timings"] = timings
    up = tls.get("upstream") or {}
    if record.get("client"):  # one origin connection per client connection: the client's address names both
        entry["connection"] = str(record["client"])
    if err:
        entry["_error"] = err
        if isinstance(err, dict) and err.get("message"):
            entry["comment"] = f"httpsdump: {err.get('kind', 'error')}: {err['message']}"
    entry["_id"] = str(record.get("id") or "")
    entry["_client"] = str(record.get("client") or "")
    entry["_mode"] = str(record.get("mode") or "")
    if tls:
        entry["_tls"] = tls
    entry["_insecure"] = bool(record.get("insecure") or up.get("insecure"))
    if record.get("upgraded"):
        entry["_upgraded"] = record["upgraded"]
    if record.get("timings"):
        entry["_timings"] = record["timings"]
    return entry


def flows_to_har(records: Iterable[dict]) -> dict:
    """A complete HAR 1.2 document, entries in the order given (export oldest first)."""
    return {"log": {"version": "1.2", "creator": dict(CREATOR), "pages": [],
                    "entries": [har_entry(r) for r in records]}}


def _entry_bytes(record: dict) -> bytes:
    text = json.dumps(har_entry(record), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace")


def iter_har_chunks(records: Iterable[dict]) -> Iterator[bytes]:
    """The bytes of the HAR document for `records`, piece by piece (constant memory)."""
    yield _HEAD
    for i, r in enumerate(records):
        yield (b"\n" if i == 0 else b",\n") + _entry_bytes(r)
    yield _TAIL


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write `chunks` to `path` through a private (0600) temporary file in the same directory, then
    rename it over `path`: readers see the old file or the whole new one, never a part. Raises OSError
    (and whatever `chunks` raises), leaving `path` untouched and no temporary file behind."""
    p = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".httpsdump-", dir=os.path.dirname(p))  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_har(records: Iterable[dict], path: str | os.PathLike | IO[bytes]) -> int:
    """Write a HAR file for `records`; returns the number of entries.

    A path is written atomically (`atomic_write`) and created 0600: it holds cookies and tokens. A
    binary file object is written to as it is. Raises OSError.
    """
    count = 0

    def counted() -> Iterator[dict]:
        nonlocal count
        for r in records:
            count += 1
            yield r

    if hasattr(path, "write"):
        for chunk in iter_har_chunks(counted()):
            path.write(chunk)  # type: ignore[union-attr]
    else:
        atomic_write(path, iter_har_chunks(counted()))
    return count


# --- the sink -------------------------------------------------------------------------------------


class HarFileSink:
    """Writes every flow to the HAR file at `path`, which is a valid HAR after each flow.

    The file is created 0600 (and tightened to 0600 if it exists with looser permissions). An empty
    file or one this sink wrote earlier is continued; any other existing file raises ConfigError, as
    does a path that cannot be opened. `emit` renders and writes in the caller's thread, like the
    JSON Lines sink: one positioned write of the entry plus the closing brackets.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.path.expanduser(os.fspath(path))
        fd, st = open_private(self.path, os.O_RDWR, "HAR file")
        try:
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"the HAR file {self.path} is not a regular file (a HAR file is rewritten in place)")
            self._end, self._has_entries = self._prepare(fd, st.st_size)
            self.written = 0  # entries written by this sink
        except ConfigError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"cannot use the HAR file {self.path}: {e.strerror or e}") from None
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def _prepare(self, fd: int, size: int) -> tuple[int, bool]:
        """Offset where the next entry goes (just before the tail), and whether entries are there."""
        if size == 0:
            os.pwrite(fd, _HEAD + _TAIL, 0)
            return len(_HEAD), False
        marker = b'{"log":{"version":"1.2"'
        ok = size >= len(_HEAD) + len(_TAIL) and os.pread(fd, len(marker), 0) == marker
        before = os.pread(fd, len(_TAIL) + 1, size - len(_TAIL) - 1) if ok else b""
        if not (ok and before[1:] == _TAIL and before[:1] in (b"[", b"}")):
            raise ConfigError(f"{self.path} exists and is not a HAR file written by httpsdump; "
                              "choose another path or remove it")
        return size - len(_TAIL), before[:1] == b"}"

    def __repr__(self) -> str:
        return f"<HarFileSink {self.path!r}{' closed' if self._fd is None else ''}>"

    def emit(self, flow: Flow) -> None:
        try:
            record = flow.to_dict(decode_body=render_body)
        except Exception:  # a rendering bug must not cost the relay a flow; say so loudly
            log.exception("HAR sink could not render flow %s", getattr(flow, "id", "?"))
            return
        self.write_record(record)

    def write_record(self, record: dict) -> None:
        """Append the entry of one flow record (as the logger process receives it)."""
        flow_id = record.get("id", "?")
        try:
            entry = _entry_bytes(record)
        except Exception:  # a rendering bug must not cost the relay a flow; say so loudly
            log.exception("HAR sink could not render flow %s", flow_id)
            return
        with self._lock:
            if self._fd is None:
                log.warning("HAR sink %s: flow %s emitted after close; dropped", self.path, flow_id)
                return
            data = (b",\n" if self._has_entries else b"\n") + entry + _TAIL
            try:
                self._pwrite_all(data, self._end)
            except OSError as e:
                log.error("HAR sink %s: cannot write flow %s: %s", self.path, flow_id, e.strerror or e)
                try:  # put the closing brackets back where they were: the file stays valid
                    self._pwrite_all(_TAIL, self._end)
                    os.ftruncate(self._fd, self._end + len(_TAIL))
                except OSError:
                    pass
                return
            self._end += len(data) - len(_TAIL)
            self._has_entries = True
            self.written += 1

    def _pwrite_all(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            except OSError as e:
                log.warning("HAR sink %s: fsync failed: %s", self.path, e.strerror or e)
            finally:
                os.close(fd)
