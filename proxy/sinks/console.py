"""The console sink: one line per flow, or (with -v) the headers, a body preview and the TLS facts.

Everything shown comes from the network, so all of it goes through `printable` (no terminal escape
sequence from an origin ever reaches the terminal), and rendering tolerates missing parts and bytes
that are not UTF-8: a flow that fails half-way is still worth a line.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TextIO

from ..decode import preview, printable
from ..flow import Flow, Message, TlsSide

__all__ = ["ConsoleSink"]

log = logging.getLogger(__name__)

_RESET = "\x1b[0m"
_STATUS_COLOURS = {2: "\x1b[32m", 3: "\x1b[36m", 4: "\x1b[33m", 5: "\x1b[31m"}
_ERROR_COLOUR = "\x1b[1;31m"


def _show(raw: bytes | str | None) -> str:
    """Network bytes as printable text: UTF-8 where it is, \\xNN escapes where it is not."""
    if raw is None:
        return ""
    text = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "backslashreplace")
    return printable(text)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
    return ""  # unreachable


def _ms(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _media_type(m: Message) -> str:
    value = m.header(b"content-type")
    return _show(value.split(b";")[0].strip()) if value else ""


_CLEAR_LINE = "\r\x1b[2K"  # carriage return, then ECMA-48 "erase entire line"


class ConsoleSink:
    """Writes flows to `stream` (usually stdout). verbosity 0: nothing; 1: one line; 2: details.

    Colour is used when the stream is a terminal and NO_COLOR (https://no-color.org) is not set,
    unless `color` says otherwise. `width` bounds body preview lines.
    """

    writes_records = False  # renders its own lines: the server need not render the JSON record for it

    def __init__(self, stream: TextIO, verbosity: int, *, color: bool | None = None,
                 width: int = 100) -> None:
        self._stream = stream
        self._verbosity = verbosity
        self._width = width
        if color is None:
            try:
                color = stream.isatty() and not os.environ.get("NO_COLOR")
            except (AttributeError, ValueError, OSError):
                color = False
        self._color = color
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.live = verbosity > 0 and stream.isatty()  # a status line only on a terminal
        except (AttributeError, ValueError, OSError):
            self.live = False
        self._status = ""  # the live status line currently drawn below the flow lines

    def __repr__(self) -> str:
        return f"<ConsoleSink verbosity={self._verbosity} color={self._color}>"

    def started(self, flow: Flow) -> None:
        """A response is still streaming (SSE, long poll, slow download): show that it started; the
        full line follows when it ends."""
        if self._verbosity <= 0:
            return
        try:
            text = self._summary(flow) + " [streaming…]\n"
        except Exception:
            log.exception("console sink could not render flow %s", getattr(flow, "id", "?"))
            return
        self._write(text, flow)

    def emit(self, flow: Flow) -> None:
        if self._verbosity <= 0:
            return
        try:
            text = self.render(flow)
        except Exception:  # a rendering bug must not cost the relay a flow; say so loudly
            log.exception("console sink could not render flow %s", getattr(flow, "id", "?"))
            return
        self._write(text, flow)

    def status(self, text: str) -> None:
        """Draw (or replace) the live status line. Flow lines are printed above it, so it never
        breaks them; it is erased before anything else is written."""
        if not self.live:
            return
        with self._lock:
            if self._closed:
                return
            self._status = printable(text)
            try:
                self._stream.write(_CLEAR_LINE + self._status)
                self._stream.flush()
            except (OSError, ValueError):
                self.live = False

    def _write(self, text: str, flow: Flow) -> None:
        with self._lock:
            if self._closed:
                log.warning("console sink: flow %s emitted after close; dropped", flow.id)
                return
            if self._status:  # erase the status line, print the flow, draw the status line again
                text = _CLEAR_LINE + text + self._status
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError) as e:  # broken pipe, closed stream
                log.warning("console sink: cannot write flow %s: %s", flow.id, e)

    def close(self) -> None:
        """Flush the stream; it is not ours to close (usually stdout)."""
        with self._lock:
            self._closed = True
            try:
                if self._status:
                    self._stream.write(_CLEAR_LINE)
                    self._status = ""
                self._stream.flush()
            except (OSError, ValueError):
                pass

    # --- rendering -----------------------------------------------------------------------------------

    def render(self, flow: Flow) -> str:
        """The text `emit` writes for `flow` (one line, or a block at verbosity 2), newline-terminated."""
        lines = [self._summary(flow)]
        if self._verbosity >= 2:
            lines += self._details(flow)
        return "\n".join(lines) + "\n"

    def _paint(self, text: str, colour: str) -> str:
        return f"{colour}{text}{_RESET}" if self._color and colour else text

    def _summary(self, flow: Flow) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(flow.timing.start or 0))
        req, resp, err = flow.request, flow.response, flow.error
        if req is not None:
            what = f"{_show(req.method)} {_show(req.url)}"
        else:  # failed before a request was read, e.g. in the client's TLS handshake
            sni = flow.tls.client.sni if flow.tls.client is not None else None
            what = f"({_show(flow.mode)}{' ' + _show(sni) if sni else ''}, no request)"
        parts = [when, _show(flow.client_addr), what, "->"]
        dur = _ms(flow.timing.total_ms) if flow.timing.total_ms is not None else ""
        if resp is not None:
            status = f"{resp.status} {_show(resp.reason)}".strip()
            parts.append(self._paint(status, _STATUS_COLOURS.get(resp.status // 100, "")))
            parts += [p for p in (_media_type(resp), _size(resp.body.size), dur) if p]
            if err:  # e.g. the origin broke off the body after the head was relayed
                parts.append(self._paint(f"ERROR {_error_text(err)}", _ERROR_COLOUR))
        elif err:
            parts.append(self._paint(f"ERROR {_error_text(err)}", _ERROR_COLOUR))
            parts += [f"({dur})"] if dur else []
        else:
            parts += [p for p in ("(no response)", dur) if p]
        if flow.insecure or (flow.tls.upstream is not None and flow.tls.upstream.insecure):
            parts.append("[insecure]")
        if flow.upgraded:
            parts.append(f"[upgraded: {_show(flow.upgraded)}]")
        return " ".join(parts)

    def _details(self, flow: Flow) -> list[str]:
        out: list[str] = []
        for name, side in (("client", flow.tls.client), ("upstream", flow.tls.upstream)):
            if side is not None:
                out += _tls_lines(name, side)
        if flow.error:
            out.append("  error: " + ", ".join(f"{k}={_show(str(v))}" for k, v in _items(flow.error)))
        t = flow.timing
        steps = [("client TLS", t.client_tls_ms), ("connect", t.connect_ms),
                 ("upstream TLS", t.upstream_tls_ms), ("first byte", t.first_byte_ms), ("total", t.total_ms)]
        if any(ms is not None for _, ms in steps):
            out.append("  timing: " + ", ".join(f"{k} {_ms(ms)}" for k, ms in steps if ms is not None))
        if flow.request is not None:
            r = flow.request
            out += self._message(">", f"{_show(r.method)} {_show(r.target)} HTTP/{_show(r.http_version)}", r)
        if flow.response is not None:
            s = flow.response
            status_line = f"HTTP/{_show(s.http_version)} {s.status} {_show(s.reason)}".rstrip()
            out += self._message("<", status_line, s)
        return out

    def _message(self, mark: str, first: str, m: Message) -> list[str]:
        out = [f"  {mark} {first}"]
        out += [f"  {mark} {_show(k)}: {_show(v)}" for k, v in m.headers]
        body = preview(m, self._width)
        if body:
            out.append(f"  {mark}")
            out += [f"  {mark}   {line}" for line in body.split("\n")]
        if m.trailers:
            out += [f"  {mark} {_show(k)}: {_show(v)}  (trailer)" for k, v in m.trailers]
        return out


def _items(d: object) -> list[tuple[str, object]]:
    return list(d.items()) if isinstance(d, dict) else [("error", d)]


def _error_text(err: object) -> str:
    if not isinstance(err, dict):
        return _show(str(err))
    return f"{_show(str(err.get('kind', 'error')))}: {_show(str(err.get('message', '')))}"


def _tls_lines(name: str, s: TlsSide) -> list[str]:
    facts = [_show(x) for x in (s.version, s.cipher) if x]
    if s.sni:
        facts.append(f"SNI {_show(s.sni)}")
    if s.alpn or s.alpn_offer:
        offer = f" (offered {', '.join(_show(p) for p in s.alpn_offer)})" if s.alpn_offer else ""
        facts.append(f"ALPN {_show(s.alpn) or '-'}{offer}")
    out = [f"  TLS {name}: " + (", ".join(facts) or "-")]
    if name == "upstream":
        if s.insecure:
            verdict = "NOT verified (insecure mode)"
        elif s.verified:
            verdict = "verified"
        elif s.verified is False:
            why = _show(s.verify_result) or "unknown reason"
            verdict = f"verification FAILED: {why} (code {s.verify_code})"
        else:
            verdict = "not verified"
        if s.cert is not None:
            c = s.cert
            sans = ", ".join(_show(x) for x in c.sans)
            out.append(f"  certificate: {_show(c.subject)} (issuer {_show(c.issuer)}; SAN {sans or '-'});"
                       f" {verdict}")
        else:
            out.append(f"  certificate: none seen; {verdict}")
    return out
