"""`httpsdump flows …`: list, show, export and clear the flows kept in the flow store.

    httpsdump flows list   [FILTERS] [--limit N]       a table, the newest flow last (like a log)
    httpsdump flows show   ID                          one flow: request and response as on the wire
    httpsdump flows export (--har FILE | --jsonl FILE) [FILTERS]
    httpsdump flows clear                              delete every stored flow
    FILTERS: [--host GLOB] [--method M] [--status 404|4xx|200-299|failed[,…]] [--since 10m|2h|1d|ISO]
             [--grep TEXT]
    every command: [--store PATH] [--confdir DIR] [--config FILE]

The store is `--store PATH`, else `store_path` from the config file, else `<confdir>/flows.sqlite3`
(confdir: `--confdir`, the config file's `confdir`, or ~/.httpsdump). The commands read the store
while a proxy is writing to it. Every problem (no store, a bad filter, an unknown or ambiguous id, an
unwritable file) is one line on stderr and exit code 2; nothing here prints a traceback.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import os
import re
import shutil
import sqlite3
import sys
import time
from typing import IO, Iterable, Iterator

from .decode import printable
from .errors import ConfigError
from .har import atomic_write, write_har
from .store import FlowFilter, StoreError, default_store_path, open_store, record_json

__all__ = ["main", "parse_status", "parse_since"]

DEFAULT_CONFDIR = "~/.httpsdump"
DEFAULT_LIMIT = 50
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """A bad option value; the message names the option and says what is expected."""


# --- filters --------------------------------------------------------------------------------------


def parse_status(text: str) -> tuple[tuple[tuple[int, int], ...], bool]:
    """`404`, `4xx`, `200-299` (or `200..299`), `failed` (flows with an error), comma-separated: any matches.

    Returns (ranges, failed). Raises UsageError for anything else.
    """
    ranges: list[tuple[int, int]] = []
    failed = False
    for part in (p.strip().lower() for p in text.split(",")):
        if part in ("failed", "error", "none"):
            failed = True
        elif re.fullmatch(r"[1-5]xx", part):
            c = int(part[0]) * 100
            ranges.append((c, c + 99))
        elif re.fullmatch(r"\d{3}", part) and 100 <= int(part) <= 599:
            ranges.append((int(part), int(part)))
        elif m := re.fullmatch(r"(\d{3})\s*(?:-|\.\.)\s*(\d{3})", part):
            lo, hi = int(m[1]), int(m[2])
            if not (100 <= lo <= hi <= 599):
                raise UsageError(f"--status {text}: a range must go from a lower to a higher code within 100-599")
            ranges.append((lo, hi))
        else:
            raise UsageError(f"--status {text}: expected a status code (404), a class (1xx to 5xx), a range "
                             "(200-299) or 'failed', comma-separated")
    return tuple(ranges), failed


def parse_since(text: str, now: float | None = None) -> float:
    """`30s`, `10m`, `2h`, `1d`, `1w` ago, or an ISO 8601 date or time (local time unless it says
    otherwise). Returns seconds since the epoch; raises UsageError for anything else."""
    now = time.time() if now is None else now
    t = text.strip()
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", t, re.IGNORECASE):
        return now - float(m[1]) * _UNITS[m[2].lower()]
    try:
        when = _dt.datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith(("Z", "z")) else t)
    except ValueError:
        raise UsageError(f"--since {text}: expected a duration (30s, 10m, 2h, 1d, 1w) or an ISO date or time "
                         "(2026-01-31, 2026-01-31T14:30, 2026-01-31T14:30:00+01:00)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # a naive time is local time
    return when.timestamp()


def _filters(args: argparse.Namespace, limit: int | None) -> FlowFilter:
    status, failed = parse_status(args.status) if args.status is not None else ((), False)
    since = parse_since(args.since) if args.since is not None else None
    method = args.method.strip() if args.method else None
    if method is not None and not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", method):
        raise UsageError(f"--method {args.method}: not an HTTP method")
    if args.grep is not None and not args.grep:
        raise UsageError("--grep: the text to search for is empty")
    if limit is not None and limit < 0:
        raise UsageError(f"--limit {limit}: must be 0 (all) or more")
    return FlowFilter(host=args.host or None, method=method, status=status, failed=failed, since=since,
                      grep=args.grep or None, limit=limit or None)


# --- the command line ------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="PATH", help="the flow store (default <confdir>/flows.sqlite3)")
    p.add_argument("--confdir", metavar="DIR", help="httpsdump's directory (default ~/.httpsdump)")
    p.add_argument("--config", metavar="FILE", help="TOML config file; its store_path and confdir are used")


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", metavar="GLOB", help="host name glob, e.g. '*.example.com' (case-insensitive)")
    p.add_argument("--method", metavar="M", help="request method, e.g. POST")
    p.add_argument("--status", metavar="S",
                   help="404, 4xx, 200-299 or failed (an error: no response, or one cut short); comma-separated")
    p.add_argument("--since", metavar="WHEN", help="10m, 2h, 1d, 1w ago, or an ISO date/time (local time)")
    p.add_argument("--grep", metavar="TEXT",
                   help="text in the URL, a header, a text body or the error (case-insensitive for ASCII)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="httpsdump flows", description="List, show, export or clear stored flows.")
    sub = p.add_subparsers(dest="command", required=True, metavar="list|show|export|clear")
    sp = sub.add_parser("list", help="a table of flows, the newest last")
    _filter_args(sp)
    sp.add_argument("--limit", metavar="N", type=int, default=DEFAULT_LIMIT,
                    help=f"show the N newest matching flows (default {DEFAULT_LIMIT}; 0 = all)")
    _common(sp)
    sp = sub.add_parser("show", help="one flow in full: headers as on the wire, decoded bodies, TLS, timings")
    sp.add_argument("id", metavar="ID", help="a flow id or a unique prefix of one (as 'flows list' shows)")
    _common(sp)
    sp = sub.add_parser("export", help="write matching flows to a HAR 1.2 or JSON Lines file")
    to = sp.add_mutually_exclusive_group(required=True)
    to.add_argument("--har", metavar="FILE", help="write a HAR 1.2 file ('-' for standard output)")
    to.add_argument("--jsonl", metavar="FILE", help="write JSON Lines, as --log-file does ('-' for standard output)")
    _filter_args(sp)
    sp.add_argument("--limit", metavar="N", type=int, default=0, help="only the N newest matching flows (default: all)")
    _common(sp)
    sp = sub.add_parser("clear", help="delete every stored flow (asks nothing)")
    _common(sp)
    return p


def _store_path(args: argparse.Namespace) -> str:
    if args.store:
        return os.path.expanduser(args.store)
    confdir = args.confdir
    if args.config:
        from .config import read_toml

        data = read_toml(args.config)
        for key in ("store_path", "confdir"):
            if key in data and not (isinstance(data[key], str) and data[key]):
                raise ConfigError(f"config file {args.config}: key '{key}' must be a non-empty string")
        if data.get("store_path"):
            return os.path.expanduser(data["store_path"])
        confdir = confdir or data.get("confdir")
    return str(default_store_path(confdir or DEFAULT_CONFDIR))


def _fail(message: str) -> int:
    print(f"httpsdump flows: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    """Run `httpsdump flows ARGV…`; returns the exit code (0, or 2 with a message on stderr)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, argparse printed why)
        return e.code if isinstance(e.code, int) else 2
    path = "?"
    try:
        path = _store_path(args)
        return _COMMANDS[args.command](args, path)
    except UsageError as e:
        return _fail(str(e))
    except ConfigError as e:
        return _fail(e.message)
    except StoreError as e:
        return _fail(str(e))
    except sqlite3.Error as e:
        return _fail(f"cannot read the flow store {path}: {e}")
    except BrokenPipeError:  # `httpsdump flows list | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except KeyboardInterrupt:
        return 130


# --- list -----------------------------------------------------------------------------------------


def _size(n: object) -> str:
    if not isinstance(n, int):
        return "-"
    if n < 1000:
        return f"{n} B"
    x = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        x /= 1000
        if x < 1000 or unit == "TB":
            return f"{x:.1f} {unit}"
    return "-"  # unreachable


def _duration(ms: object) -> str:
    if not isinstance(ms, (int, float)):
        return "-"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def _cmd_list(args: argparse.Namespace, path: str) -> int:
    f = _filters(args, args.limit)
    with open_store(path) as store:
        rows = list(store.summaries(f, newest_first=True))
        rows.reverse()  # the newest last, next to the prompt
        more = 0
        if f.limit and len(rows) == f.limit:
            total = store.count(FlowFilter(**{**_asdict(f), "limit": None}))
            more = total - len(rows)
    if not rows:
        print("no flows match" if _any_filter(f) else f"no flows stored in {path}", file=sys.stderr)
        return 0
    out = sys.stdout
    width = shutil.get_terminal_size((160, 24)).columns if out.isatty() else 160
    host_w = min(max(len(printable(r["host"] or "")) for r in rows), 28)
    host_w = max(host_w, 4)
    fixed = 8 + 1 + 8 + 1 + 7 + 1 + 6 + 1 + host_w + 1 + 1 + 9 + 1 + 9
    longest = max(len(printable(r["url"] or "(no request)")) for r in rows)
    url_w = max(min(longest, width - fixed), 24)
    out.write(f"{'TIME':<8} {'ID':<8} {'METHOD':<7} {'STATUS':<6} {'HOST':<{host_w}} {'URL':<{url_w}} "
              f"{'SIZE':>9} {'DURATION':>9}\n")
    today = _dt.date.today()
    last_day = today
    for r in rows:
        when = _dt.datetime.fromtimestamp(r["start"] or 0)
        if when.date() != last_day:
            out.write(f"-- {when.date().isoformat()} --\n")
            last_day = when.date()
        status = str(r["status"]) if r["status"] is not None else "ERR"
        url = printable(r["url"] or "(no request)")
        line = (f"{when:%H:%M:%S} {r['id'][:8]:<8} {_cut(printable(r['method'] or '-'), 7):<7} {status:<6} "
                f"{_cut(printable(r['host'] or '-'), host_w):<{host_w}} {_cut(url, url_w):<{url_w}} "
                f"{_size(r['size']):>9} {_duration(r['duration']):>9}")
        if r["error_kind"]:
            line += f"  ! {printable(r['error_kind'])}"
        out.write(line.rstrip() + "\n")
    if more > 0:
        print(f"({len(rows)} shown; {more} older matching flows not shown: raise --limit, or 0 for all)",
              file=sys.stderr)
    return 0


def _asdict(f: FlowFilter) -> dict:
    return {k: getattr(f, k) for k in FlowFilter.__slots__}


def _any_filter(f: FlowFilter) -> bool:
    return bool(f.host or f.method or f.status or f.failed or f.since is not None or f.grep)


# --- show -----------------------------------------------------------------------------------------


def _show_body(body: dict | None) -> list[str]:
    if not isinstance(body, dict):
        return []
    size = body.get("size") or 0
    lines: list[str] = []
    notes = []
    if body.get("content_encoding"):
        dec = body.get("decoded_size")
        notes.append(f"{body['content_encoding']}, {size} bytes on the wire"
                     + (f", {dec} decoded" if isinstance(dec, int) else ""))
    if body.get("decode_error"):
        notes.append(f"cannot decode: {body['decode_error']}")
    text = body.get("text")
    if isinstance(text, str):
        ctype = body.get("content_type") or ""
        if (ctype == "application/json" or ctype.endswith("+json")) and not body.get("truncated"):
            try:
                text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            except ValueError:
                notes.append("not valid JSON")
        if text.endswith("\n"):
            text = text[:-1]  # the last line's end, not an empty line after it
        lines += [printable(line.expandtabs(4)) for line in text.split("\n")]
    elif isinstance(body.get("base64"), str):
        try:
            data = base64.b64decode(body["base64"])
        except ValueError:
            data = b""
        lines.append(f"({printable(str(body.get('summary') or 'binary'))})")
        lines += _hexdump(data[:256])
        if len(data) > 256:
            lines.append(f"… {len(data) - 256} more bytes shown by 'flows export'")
    elif size:
        lines.append(f"({size} bytes, not captured)")
    if body.get("truncated"):
        notes.append(f"truncated: {body.get('captured', 0)} of {size} bytes captured")
    if notes:
        lines.append("(" + "; ".join(printable(str(n)) for n in notes) + ")")
    return lines


def _hexdump(data: bytes) -> list[str]:
    out = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        out.append(f"{i:08x}  {hexes:<47}  {text}")
    return out


def _tls_lines(name: str, side: dict) -> list[str]:
    facts = [str(side[k]) for k in ("version", "cipher") if side.get(k)]
    if side.get("sni"):
        facts.append(f"SNI {side['sni']}")
    offer = side.get("alpn_offer") or []
    if side.get("alpn") or offer:
        facts.append(f"ALPN {side.get('alpn') or '-'}" + (f" (offered {', '.join(map(str, offer))})" if offer else ""))
    out = [f"TLS {name}: " + (", ".join(facts) or "-")]
    if name == "upstream":
        if side.get("insecure"):
            verdict = "NOT verified (insecure mode)"
        elif side.get("verified"):
            verdict = "verified"
        elif side.get("verified") is False:
            verdict = f"verification FAILED: {side.get('verify_result') or 'unknown reason'} (code {side.get('verify_code')})"
        else:
            verdict = "not verified"
        cert = side.get("cert")
        if isinstance(cert, dict):
            sans = ", ".join(map(str, cert.get("sans") or [])) or "-"
            out.append(f"certificate: {cert.get('subject')} (issuer {cert.get('issuer')}; SAN {sans}); {verdict}")
            out.append(f"  valid {cert.get('not_before')} to {cert.get('not_after')}; SHA-256 {cert.get('sha256')}")
        else:
            out.append(f"certificate: none seen; {verdict}")
    return out


def render_show(rec: dict) -> str:
    """The text `flows show` prints for a record (everything from the network made printable)."""
    lines: list[str] = []
    start = rec.get("start") or 0
    when = _dt.datetime.fromtimestamp(start).astimezone()
    lines.append(f"flow {rec.get('id')}")
    lines.append(f"time:    {when.isoformat(sep=' ', timespec='milliseconds')}")
    lines.append(f"client:  {rec.get('client')}  mode: {rec.get('mode')}"
                 + ("  [insecure]" if rec.get("insecure") else "")
                 + (f"  [upgraded: {rec['upgraded']}]" if rec.get("upgraded") else ""))
    tls = rec.get("tls") or {}
    for name in ("client", "upstream"):
        if isinstance(tls.get(name), dict):
            lines += _tls_lines(name, tls[name])
    t = rec.get("timings") or {}
    steps = [("client TLS", "client_tls_ms"), ("connect", "connect_ms"), ("upstream TLS", "upstream_tls_ms"),
             ("request sent", "request_sent_ms"), ("first byte", "first_byte_ms"), ("total", "total_ms")]
    shown = [f"{label} {_duration(t[key])}" for label, key in steps if isinstance(t.get(key), (int, float))]
    if shown:
        lines.append("timings: " + ", ".join(shown))
    err = rec.get("error")
    if err:
        if isinstance(err, dict):
            extra = ", ".join(f"{k}={v}" for k, v in err.items() if k not in ("kind", "message"))
            lines.append(f"error:   {err.get('kind', 'error')}: {err.get('message', '')}" + (f" ({extra})" if extra else ""))
        else:
            lines.append(f"error:   {err}")
    req = rec.get("request")
    if isinstance(req, dict):
        lines.append("")
        lines.append(f"> {req.get('method')} {req.get('target')} HTTP/{req.get('http_version')}")
        lines += _message_lines(">", req)
    else:
        lines.append("")
        lines.append("(no request: the flow failed before one was read)")
    resp = rec.get("response")
    if isinstance(resp, dict):
        lines.append("")
        lines.append(f"< HTTP/{resp.get('http_version')} {resp.get('status')} {resp.get('reason') or ''}".rstrip())
        lines += _message_lines("<", resp)
    elif isinstance(req, dict):
        lines.append("")
        lines.append("(no response)")
    # Everything shown came from the network: no terminal escape gets through (printable is idempotent).
    return "\n".join(printable(line) for line in lines) + "\n"


def _message_lines(mark: str, msg: dict) -> list[str]:
    out = [f"{mark} {printable(str(k))}: {printable(str(v))}" for k, v in msg.get("headers") or ()]
    body = _show_body(msg.get("body"))
    if body:
        out.append(mark)
        out += [f"  {line}" for line in body]
    for k, v in msg.get("trailers") or ():
        out.append(f"{mark} {printable(str(k))}: {printable(str(v))}  (trailer)")
    return out


def _cmd_show(args: argparse.Namespace, path: str) -> int:
    with open_store(path) as store:
        rec = store.get(args.id)
    sys.stdout.write(render_show(rec))
    return 0


# --- export ---------------------------------------------------------------------------------------


def _jsonl_chunks(records: Iterable[dict]) -> Iterator[bytes]:
    for r in records:
        yield (record_json(r) + "\n").encode("utf-8")


def _cmd_export(args: argparse.Namespace, path: str) -> int:
    f = _filters(args, args.limit)
    target = args.har if args.har is not None else args.jsonl
    if not target:
        raise UsageError("export: the output file name is empty")
    if target != "-" and os.path.isdir(target):
        raise UsageError(f"export: {target} is a directory")
    count = 0

    def counted(records: Iterable[dict]) -> Iterator[dict]:
        nonlocal count
        for r in records:
            count += 1
            yield r

    with open_store(path) as store:
        if f.limit:  # the N newest, written oldest first
            records: Iterable[dict] = reversed(list(store.query(f, newest_first=True)))
        else:
            records = store.query(f)
        try:
            if target == "-":
                out: IO[bytes] = sys.stdout.buffer
                if args.har is not None:
                    write_har(counted(records), out)
                else:
                    for chunk in _jsonl_chunks(counted(records)):
                        out.write(chunk)
                out.flush()
            elif args.har is not None:
                write_har(counted(records), target)
            else:
                atomic_write(target, _jsonl_chunks(counted(records)))
        except BrokenPipeError:
            raise
        except OSError as e:
            raise UsageError(f"cannot write {target}: {e.strerror or e}") from None
    what = "HAR" if args.har is not None else "JSON Lines"
    print(f"exported {count} flow{'s' if count != 1 else ''} to {'standard output' if target == '-' else target}"
          f" ({what})", file=sys.stderr if target == "-" else sys.stdout)
    return 0


# --- clear ----------------------------------------------------------------------------------------


def _cmd_clear(args: argparse.Namespace, path: str) -> int:
    if not os.path.exists(path):
        raise ConfigError(f"no flow store at {path} (nothing to clear)")
    with open_store(path, readonly=False) as store:
        n = store.clear()
    print(f"removed {n} flow{'s' if n != 1 else ''} from {path}")
    return 0


_COMMANDS = {"list": _cmd_list, "show": _cmd_show, "export": _cmd_export, "clear": _cmd_clear}
