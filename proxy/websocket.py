"""WebSocket traffic, observed: RFC 6455 frames parsed in both directions for the log. (sans-IO)

After a 101 the relay copies bytes both ways unchanged; it also hands each chunk to a
`WebSocketObserver`, which parses the frames and returns the messages they complete. Nothing here
can change or stop the traffic: `feed` never raises, and a stream that breaks the protocol becomes one
message of type "error" saying why, after which that direction is no longer parsed (the relay goes
on copying its bytes).

Why a parser of our own rather than wsproto's `frame_protocol.FrameProtocol` (checked, wsproto 1.3.2):
- its permessage-deflate decompresses without an output cap: a 200 kB frame inflated to 200 MB in
  one call in our check, and the log must survive decompression bombs;
- a ping or pong between the fragments of a compressed message resets its "this message is
  compressed" state, so the rest of the message is not inflated (RFC 6455 §5.4 allows control frames
  there) and the message ends as an invalid-UTF-8 failure;
- its frames carry neither the RSV1 bit nor the wire size, both of which the log reports.
The tests use wsproto as an independent peer to make frames.

What is checked (each breach is an "error" message): reserved opcodes; RSV bits not claimed by a
negotiated extension; RSV1 (compressed) on a control or continuation frame; client frames must be
masked and server frames must not be (§5.1); control frames at most 125 bytes and never fragmented
(§5.5); the minimal length encoding and a 64-bit length below 2^63 (§5.2); continuation frames only
inside a message, and no new data message inside one (§5.4); UTF-8 in text messages and close reasons
(§8.1); close codes (§7.4: 1000-1003, 1007-1014, 3000-4999) and no one-byte close payload (§5.5.1);
no frame after the close frame; corrupt deflate data (RFC 7692 §7.2.2).

Memory per direction is bounded whatever the peers send: a frame header (at most 14 bytes), one
control payload (at most 125 bytes), the preview of the message in progress, and one inflater (RFC 7692
window, at most 32 KiB plus zlib's state). Payloads are streamed, never buffered whole: a message of
any size is counted; only its preview is kept. Inflating is the one step whose cost is not bounded by
the bytes on the wire (deflate expands up to ~1000:1), so a compressed message that inflates past
`max_message` bytes is a decompression bomb for the log: an "error", and that direction stops.
"""

from __future__ import annotations

import base64
import codecs
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

__all__ = ["WebSocketMessage", "WebSocketObserver", "DeflateParams", "negotiated_extensions"]

CLIENT = "client"
SERVER = "server"

_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_TYPES = {_TEXT: "text", _BINARY: "binary", _CLOSE: "close", _PING: "ping", _PONG: "pong"}
_OPCODES = frozenset((_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG))
# RFC 7692 §7.2.2: the four octets the sender removed from the end of each compressed message.
_DEFLATE_TAIL = b"\x00\x00\xff\xff"
_INFLATE_CHUNK = 1 << 16  # inflater output per step: the transient memory of one step
_MAX_LOGGED = 1000


def _valid_close_code(code: int) -> bool:
    # RFC 6455 §7.4.1/§7.4.2 and the IANA registry: 1004 is reserved, 1005, 1006 and 1015 must never
    # be sent, 1016-2999 are unassigned (for future RFCs), 3000-4999 are for libraries and apps.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class _Violation(Exception):
    """A protocol breach in one direction's byte stream; the message says which."""


@dataclass(slots=True)
class WebSocketMessage:
    """One message as seen on the wire, for the log.

    size: payload bytes after decompression (a close frame: its whole payload). wire_size: bytes of
    the frames that carried it, headers and masking keys included (interleaved control frames are
    messages of their own). preview: text messages, the first `preview_limit` characters; binary,
    ping and pong, base64 of the first `preview_limit` bytes; close, the reason; error, "".
    truncated: the preview is not the whole payload. time: the observer's clock when the message's
    last byte was fed. An "error" message says why in `error`; its size and wire_size are 0.
    """

    direction: str  # "client" (client to server, masked) or "server" (server to client)
    type: str  # "text", "binary", "ping", "pong", "close" or "error"
    time: float
    size: int = 0
    wire_size: int = 0
    frames: int = 0
    compressed: bool = False
    preview: str = ""
    truncated: bool = False
    close_code: int | None = None  # close: None when the frame carried no code (RFC 6455: 1005)
    close_reason: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        """JSON-ready; close_code/close_reason only for close, error only for error messages."""
        d = {"direction": self.direction, "type": self.type, "time": self.time, "size": self.size,
             "wire_size": self.wire_size, "frames": self.frames, "compressed": self.compressed,
             "preview": self.preview, "truncated": self.truncated}
        if self.type == "close":
            d["close_code"] = self.close_code
            d["close_reason"] = self.close_reason
        elif self.type == "error":
            d["error"] = self.error
        return d

    def summary(self, width: int = 100) -> str:
        """One printable line for a console: arrow, type, size, preview (escaped, cut to `width`)."""
        from .decode import printable

        arrow = "->" if self.direction == CLIENT else "<-"
        if self.type == "error":
            return printable(f"{arrow} ws error: {self.error}")[:max(width, 20)]
        head = f"{arrow} ws {self.type} {self.size} B" + (" (deflate)" if self.compressed else "")
        if self.type == "close":
            code = "no code" if self.close_code is None else str(self.close_code)
            head += f" {code}"
            body = self.close_reason or ""
        elif self.type == "text":
            body = self.preview
        else:
            body = f"base64:{self.preview}" if self.preview else ""
        if body:
            room = max(width - len(head) - 1, 8)
            shown = printable(body.replace("\n", " "))
            if len(shown) > room or self.truncated:
                shown = shown[:room - 1] + "…"
            head += " " + shown
        return head


@dataclass(frozen=True, slots=True)
class DeflateParams:
    """permessage-deflate as the server accepted it (RFC 7692 §7.1)."""

    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15

    @classmethod
    def from_params(cls, params: dict[str, str | None]) -> "DeflateParams":
        def bits(name: str) -> int:
            try:
                value = int(params.get(name) or 15)
            except ValueError:
                return 15
            return value if 8 <= value <= 15 else 15

        return cls("server_no_context_takeover" in params, "client_no_context_takeover" in params,
                   bits("server_max_window_bits"), bits("client_max_window_bits"))


def _header_values(headers: Iterable, name: str) -> list[str]:
    out = []
    for k, v in headers or ():
        k = k.decode("latin-1") if isinstance(k, (bytes, bytearray)) else str(k)
        if k.lower() == name:
            out.append(v.decode("latin-1") if isinstance(v, (bytes, bytearray)) else str(v))
    return out


def negotiated_extensions(value: str) -> list[tuple[str, dict[str, str | None]]]:
    """Parse a Sec-WebSocket-Extensions value (RFC 6455 §9.1) into [(name, {param: value or None})],
    names and parameter names in lower case, quoted-string values unquoted. Lenient: the observer
    only reads what was agreed, the endpoints judge it."""
    out: list[tuple[str, dict[str, str | None]]] = []
    items: list[list[str]] = [[""]]
    quoted = escaped = False
    for ch in value:  # split on "," and ";" outside quoted strings
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
                continue
            elif ch == '"':
                quoted = False
                continue
            items[-1][-1] += ch
        elif ch == '"':
            quoted = True
        elif ch == ",":
            items.append([""])
        elif ch == ";":
            items[-1].append("")
        else:
            items[-1][-1] += ch
    for parts in items:
        name = parts[0].strip().lower()
        if not name:
            continue
        params: dict[str, str | None] = {}
        for p in parts[1:]:
            k, eq, v = p.partition("=")
            if k.strip():
                params[k.strip().lower()] = v.strip() if eq else None
        out.append((name, params))
    return out


_XOR = [bytes(a ^ b for a in range(256)) for b in range(256)]  # _XOR[k]: a translate table for "^ k"


def _unmask(data, key: bytes, offset: int) -> bytes:
    """RFC 6455 §5.3: XOR with the 4-byte key, starting `offset` bytes into the frame's payload."""
    n = len(data)
    if not n:
        return b""
    r = offset & 3
    k = key[r:] + key[:r]
    if n <= 512:  # one big-int XOR: the fastest way for short payloads
        mask = (k * ((n + 3) >> 2))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(mask, "little")).to_bytes(n, "little")
    buf = bytearray(data)  # long ones: four strided translates (int conversion is slower there)
    for j in range(4):
        buf[j::4] = buf[j::4].translate(_XOR[k[j]])
    return bytes(buf)


class _Message:
    """The data message in progress in one direction."""

    __slots__ = ("opcode", "compressed", "size", "wire", "frames", "head", "parts", "chars", "cut", "decoder")

    def __init__(self, opcode: int, compressed: bool, strict_text: bool) -> None:
        self.opcode = opcode
        self.compressed = compressed
        self.size = 0
        self.wire = 0
        self.frames = 0
        self.head = bytearray()  # binary: the first preview bytes
        self.parts: list[str] = []  # text: the first preview characters
        self.chars = 0
        self.cut = False  # text: characters beyond the preview were seen
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict" if strict_text else "replace") \
            if opcode == _TEXT else None


class _Direction:
    """The frame parser for one direction's byte stream."""

    def __init__(self, name: str, obs: "WebSocketObserver", deflate: DeflateParams | None, foreign: bool) -> None:
        self.name = name
        self.obs = obs
        self.masked = name == CLIENT  # §5.1: client frames are masked, server frames are not
        self.deflate = deflate is not None
        if deflate is not None:
            own = name == CLIENT
            self.no_takeover = deflate.client_no_context_takeover if own else deflate.server_no_context_takeover
            bits = deflate.client_max_window_bits if own else deflate.server_max_window_bits
            # zlib's deflate turns an 8-bit window into 9 bits, and inflating that with 8 fails.
            self.wbits = max(bits, 9)
        else:
            self.no_takeover, self.wbits = False, 15
        self.foreign = foreign  # an extension we do not know was negotiated: RSV bits and payloads are its own
        self.dead = False
        self.closed = False
        self.offset = 0  # bytes of this direction consumed so far
        self.hbuf = bytearray()
        self.frame_at = 0  # offset of the current frame's first byte
        self.remaining = -1  # payload bytes left in the current frame; -1: reading a header
        self.fin = True
        self.opcode = 0
        self.key: bytes | None = None
        self.mask_off = 0
        self.ctl = bytearray()
        self.msg: _Message | None = None
        self.inflater = None

    # --- feeding -------------------------------------------------------------------------------------

    def feed(self, data, out: list) -> None:
        if self.dead or not data:
            return
        try:
            self._feed(memoryview(data).cast("B"), out)
        except _Violation as e:
            out.append(self._fail(str(e)))
        except Exception as e:  # a bug here must cost the relay nothing: report it as this stream's end
            out.append(self._fail(f"internal error in the WebSocket parser: {type(e).__name__}: {e}"))

    def eof(self, out: list) -> None:
        if self.dead:
            return
        if self.hbuf or self.remaining >= 0:
            out.append(self._fail(f"the {self.name}'s stream ended inside a frame"))
        elif self.msg is not None:
            out.append(self._fail(f"the {self.name}'s stream ended inside a fragmented message"))
        self.dead = True

    def _fail(self, reason: str) -> WebSocketMessage:
        self.dead = True
        self.msg = self.inflater = None
        self.hbuf = bytearray()
        self.ctl = bytearray()
        return WebSocketMessage(self.name, "error", self.obs.clock(), error=reason)

    def _feed(self, data: memoryview, out: list) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self.remaining < 0:  # a frame header
                if self.closed:
                    raise _Violation(f"bytes after the close frame (at byte {self.offset + pos} of the "
                                     f"{self.name}'s stream)")
                h = self.hbuf
                if not h:
                    self.frame_at = self.offset + pos
                if len(h) < 2:
                    take = min(2 - len(h), n - pos)
                    h += data[pos:pos + take]
                    pos += take
                    if len(h) < 2:
                        break
                    self._check_start(h[0], h[1])
                need = 2 + (2 if h[1] & 0x7F == 126 else 8 if h[1] & 0x7F == 127 else 0) + (4 if h[1] & 0x80 else 0)
                if len(h) < need:
                    take = min(need - len(h), n - pos)
                    h += data[pos:pos + take]
                    pos += take
                    if len(h) < need:
                        break
                self._start_frame(bytes(h), out)
                self.hbuf = bytearray()
                continue
            take = min(self.remaining, n - pos)
            chunk = data[pos:pos + take]
            pos += take
            self.remaining -= take
            if self.opcode & 0x8:
                self.ctl += self._plain(chunk)
            else:
                self._data(chunk)
            self.mask_off += take
            if self.remaining == 0:
                self._end_frame(out)
        self.offset += n

    def _where(self) -> str:
        return f"(frame at byte {self.frame_at} of the {self.name}'s stream)"

    def _plain(self, chunk) -> bytes:
        return _unmask(chunk, self.key, self.mask_off) if self.key else bytes(chunk)

    # --- frame headers -------------------------------------------------------------------------------

    def _check_start(self, b0: int, b1: int) -> None:
        """The first two bytes of a frame, checked before its length: errors as early as they show."""
        opcode, fin, rsv = b0 & 0x0F, bool(b0 & 0x80), b0 & 0x70
        if opcode not in _OPCODES:
            raise _Violation(f"reserved opcode {opcode:#x} {self._where()}")
        control = bool(opcode & 0x8)
        if rsv and not self.foreign:
            if rsv & 0x30:
                raise _Violation(f"RSV2/RSV3 set without a negotiated extension {self._where()}")
            if not self.deflate:
                raise _Violation(f"RSV1 set without a negotiated extension {self._where()}")
            if control or opcode == _CONT:
                kind = "control" if control else "continuation"
                raise _Violation(f"RSV1 (compressed) set on a {kind} frame {self._where()}")
        if control:
            if not fin:
                raise _Violation(f"fragmented control frame ({_TYPES[opcode]}) {self._where()}")
            if b1 & 0x7F > 125:
                raise _Violation(f"control frame ({_TYPES[opcode]}) with a payload over 125 bytes {self._where()}")
        elif opcode == _CONT and self.msg is None:
            raise _Violation(f"continuation frame with no message in progress {self._where()}")
        elif opcode != _CONT and self.msg is not None:
            raise _Violation(f"new {_TYPES[opcode]} message inside a fragmented message {self._where()}")
        if bool(b1 & 0x80) != self.masked:
            what = "unmasked frame from the client" if self.masked else "masked frame from the server"
            raise _Violation(f"{what} {self._where()}")

    def _start_frame(self, h: bytes, out: list) -> None:
        b0, b1 = h[0], h[1]
        length, i = b1 & 0x7F, 2
        if length == 126:
            length, i = int.from_bytes(h[2:4], "big"), 4
            if length < 126:
                raise _Violation(f"16-bit length for a {length}-byte payload (not minimal) {self._where()}")
        elif length == 127:
            length, i = int.from_bytes(h[2:10], "big"), 10
            if length >> 63:
                raise _Violation(f"64-bit length with the most significant bit set {self._where()}")
            if length < 65536:
                raise _Violation(f"64-bit length for a {length}-byte payload (not minimal) {self._where()}")
        self.key = h[i:i + 4] if b1 & 0x80 else None
        self.fin, self.opcode, self.remaining, self.mask_off = bool(b0 & 0x80), b0 & 0x0F, length, 0
        if self.opcode & 0x8:
            self.ctl = bytearray()
        else:
            if self.opcode != _CONT:
                self.msg = _Message(self.opcode, bool(b0 & 0x40) and self.deflate and not self.foreign,
                                    strict_text=not self.foreign)
            self.msg.frames += 1
            self.msg.wire += len(h) + length
        if length == 0:
            self._end_frame(out)

    # --- payloads ------------------------------------------------------------------------------------

    def _data(self, chunk) -> None:
        m = self.msg
        if m.compressed:
            self._inflate(self._plain(chunk))
        elif m.opcode == _TEXT:
            self._content(m, self._plain(chunk))
        else:  # binary: only the preview is ever unmasked
            room = self.obs.preview_limit - len(m.head)
            if room > 0:
                m.head += self._plain(chunk[:room])
            m.size += len(chunk)

    def _content(self, m: _Message, data: bytes) -> None:
        """Payload bytes of a message, after decompression."""
        m.size += len(data)
        if m.decoder is None:
            room = self.obs.preview_limit - len(m.head)
            if room > 0:
                m.head += data[:room]
            return
        try:
            text = m.decoder.decode(data, False)
        except UnicodeDecodeError as e:
            raise _Violation(f"invalid UTF-8 in a text message: {e.reason} {self._where()}") from None
        self._keep_text(m, text)

    def _keep_text(self, m: _Message, text: str) -> None:
        room = self.obs.preview_limit - m.chars
        if room > 0 and text:
            kept = text[:room]
            m.parts.append(kept)
            m.chars += len(kept)
        if len(text) > max(room, 0):
            m.cut = True

    def _inflate(self, data: bytes) -> None:
        m = self.msg
        d = self.inflater
        if d is None:
            d = self.inflater = zlib.decompressobj(-self.wbits)
        if d.eof:  # RFC 7692 §7.2.3.3: a final block ended the message's data already
            if data:
                raise _Violation(f"compressed data after the final deflate block {self._where()}")
            return
        buf = data
        while True:
            try:
                got = d.decompress(buf, _INFLATE_CHUNK)
            except zlib.error as e:
                raise _Violation(f"corrupt permessage-deflate data: {e} {self._where()}") from None
            if got:
                if m.size + len(got) > self.obs.max_message:
                    raise _Violation(f"compressed message inflates past {self.obs.max_message} bytes "
                                     f"(max_message; a decompression bomb?) {self._where()}")
                self._content(m, got)
            buf = d.unconsumed_tail
            if d.eof:
                if d.unused_data and d.unused_data != _DEFLATE_TAIL:
                    raise _Violation(f"compressed data after the final deflate block {self._where()}")
                return
            if not buf and len(got) < _INFLATE_CHUNK:
                return

    # --- frame ends ----------------------------------------------------------------------------------

    def _end_frame(self, out: list) -> None:
        self.remaining = -1
        self.key = None
        if self.opcode & 0x8:
            out.append(self._control())
            return
        if not self.fin:
            return
        m = self.msg
        if m.compressed:
            d = self.inflater
            if d is not None and not d.eof:
                self._inflate(_DEFLATE_TAIL)
            if self.no_takeover or (self.inflater is not None and self.inflater.eof):
                self.inflater = None  # the sender starts each message with an empty window
        if m.decoder is not None:
            try:
                self._keep_text(m, m.decoder.decode(b"", True))
            except UnicodeDecodeError:
                raise _Violation(f"text message ends inside a UTF-8 sequence {self._where()}") from None
            preview, truncated = "".join(m.parts), m.cut
        else:
            preview, truncated = base64.b64encode(m.head).decode("ascii"), m.size > len(m.head)
        self.msg = None
        out.append(WebSocketMessage(self.name, _TYPES[m.opcode], self.obs.clock(), size=m.size, wire_size=m.wire,
                                    frames=m.frames, compressed=m.compressed, preview=preview, truncated=truncated))

    def _control(self) -> WebSocketMessage:
        payload = bytes(self.ctl)
        self.ctl = bytearray()
        header = 2 + (4 if self.masked else 0)
        kind = _TYPES[self.opcode]
        msg = WebSocketMessage(self.name, kind, self.obs.clock(), size=len(payload), wire_size=header + len(payload),
                               frames=1)
        limit = self.obs.preview_limit
        if self.opcode != _CLOSE:
            msg.preview = base64.b64encode(payload[:limit]).decode("ascii")
            msg.truncated = len(payload) > limit
            return msg
        # RFC 6455 §5.5.1: empty, or a 2-byte code then a UTF-8 reason
        if len(payload) == 1:
            raise _Violation(f"close frame with a 1-byte payload {self._where()}")
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if not _valid_close_code(code):
                raise _Violation(f"close frame with invalid code {code} {self._where()}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise _Violation(f"close frame reason is not UTF-8 {self._where()}") from None
            msg.close_code, msg.close_reason = code, reason
            msg.preview, msg.truncated = reason[:limit], len(reason) > limit
        else:
            msg.close_reason = ""
        self.closed = True
        return msg


class WebSocketObserver:
    """Parses both directions of one WebSocket connection for the log; never touches the bytes.

    Create it from the handshake that switched protocols: `request_headers` and `response_headers`
    are (name, value) pairs, bytes or str (flow.request.headers / flow.response.headers). The 101's
    Sec-WebSocket-Extensions says whether permessage-deflate (and with which parameters) was agreed.

    `feed(direction, data)` with direction "client" (client to server) or "server" (server to client)
    returns the messages these bytes complete; `feed_eof(direction)` when that side's stream ends.
    The observer also keeps the first `max_logged` messages (counting the rest) and the close
    handshake for `to_dict()`, the record for the upgrade's flow.
    """

    def __init__(self, request_headers: Iterable = (), response_headers: Iterable = (), *,
                 preview_limit: int = 4096, max_message: int = 16 << 20, max_logged: int = _MAX_LOGGED,
                 clock: Callable[[], float] = time.time) -> None:
        self.preview_limit = max(int(preview_limit), 0)
        self.max_message = max(int(max_message), 0)
        self.max_logged = max(int(max_logged), 0)
        self.clock = clock
        ext_values = _header_values(response_headers, "sec-websocket-extensions")
        self.extensions = ", ".join(v.strip() for v in ext_values) or None
        agreed = negotiated_extensions(self.extensions or "")
        deflate = next((DeflateParams.from_params(p) for name, p in agreed if name == "permessage-deflate"), None)
        foreign = any(name != "permessage-deflate" for name, _ in agreed)
        self.deflate = deflate
        protocols = _header_values(response_headers, "sec-websocket-protocol")
        self.subprotocol = protocols[0].strip() if protocols else None
        self._sides = {CLIENT: _Direction(CLIENT, self, deflate, foreign),
                       SERVER: _Direction(SERVER, self, deflate, foreign)}
        self.messages: list[WebSocketMessage] = []
        self.messages_dropped = 0
        self.close: dict | None = None

    def feed(self, direction: str, data: bytes) -> list[WebSocketMessage]:
        """Messages completed by `data` from `direction` ("client" or "server"). Never raises."""
        out: list[WebSocketMessage] = []
        side = self._sides.get(direction)
        if side is None:
            return out
        side.feed(data, out)
        self._record(out)
        return out

    def feed_eof(self, direction: str) -> list[WebSocketMessage]:
        """That side's stream ended: an "error" if it stopped inside a frame or a fragmented message."""
        out: list[WebSocketMessage] = []
        side = self._sides.get(direction)
        if side is not None:
            side.eof(out)
            self._record(out)
        return out

    def _record(self, out: list[WebSocketMessage]) -> None:
        for m in out:
            if m.type == "close":
                if self.close is None:
                    self.close = {"code": m.close_code, "reason": m.close_reason, "by": m.direction,
                                  "answered": False, "time": m.time}
                elif m.direction != self.close["by"]:
                    self.close["answered"] = True
            if len(self.messages) < self.max_logged:
                self.messages.append(m)
            else:
                self.messages_dropped += 1

    def to_dict(self) -> dict:
        """The flow's "websocket" record: the messages logged, how many more there were, the close."""
        return {"messages": [m.to_dict() for m in self.messages], "messages_dropped": self.messages_dropped,
                "close": None if self.close is None else dict(self.close), "extensions": self.extensions,
                "subprotocol": self.subprotocol}
