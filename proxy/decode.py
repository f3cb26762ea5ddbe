"""Bodies for people and for the traffic log: content-encoding removed, charset applied, size capped.

This is only ever used to *render* a captured body. The relay forwards the origin's bytes unchanged;
nothing here touches what the client receives.

Three hazards shape the code:
- Decompression bombs: a few kilobytes of gzip or brotli inflate to gigabytes. Every decoder is a
  streaming one driven with an output cap, so no more than `limit` bytes (plus one decoder buffer)
  are ever produced, whatever the input.
- Truncated input: the log captures only a prefix of large bodies. A prefix of a compressed stream
  is not corrupt, just short, so decoders return what the prefix yields instead of failing.
- Hostile text: bodies and headers may carry terminal escape sequences or bidi controls. `printable`
  escapes them before anything reaches a console.

The body is assumed to be the message content after transfer-coding (chunked) was removed by the
HTTP/1 codec, i.e. still content-coded (RFC 9110 §8.4).
"""

from __future__ import annotations

import base64
import codecs
import functools
import re
import zlib
import brotli
import zstandard

try:  # compiled (proxy/accel.py): see _Look, _type_and_coding
    import cython
except ImportError:
    from ._cython import cython

from .flow import Message

__all__ = ["DecodeError", "decode_content", "render_body", "preview", "printable"]

# RFC 9659: HTTP zstd encoders keep the window at or below 8 MB, and decoders may refuse larger
# windows; refusing bounds the decoder's own memory, which the output cap does not.
_ZSTD_MAX_WINDOW = 8 << 20
_PREVIEW_LINES = 8

# Media types rendered as text besides text/*; "+json" and "+xml" suffixes too (RFC 6838 §4.2.8).
_TEXT_TYPES = frozenset({
    "application/json", "application/javascript", "application/ecmascript", "application/xml",
    "application/x-www-form-urlencoded", "application/x-ndjson", "application/graphql",
    "application/x-javascript", "application/manifest+json",
})
_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
# C0 controls other than \t \n \f \r, and DEL, mean "not text" when sniffing an unlabelled body.
_JUNK = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f]")
# Shown escaped: C0, DEL, C1 (terminal escapes) and the bidi overrides/isolates (display spoofing).
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))})


class DecodeError(Exception):
    """A body cannot be decoded: unknown content-coding or corrupt data. The message says which."""


# --- content codings (RFC 9110 §8.4.1) --------------------------------------------------------------


def _inflate(data: bytes, limit: int, wbits: int, members: bool = False) -> bytes:
    out = bytearray()
    while True:
        d = zlib.decompressobj(wbits)
        buf = data
        while buf and len(out) < limit:
            out += d.decompress(buf, limit - len(out))  # max_length: never more than the cap
            buf = d.unconsumed_tail
        # RFC 1952 §2.2: a gzip file is a series of members; other trailing bytes are ignored, as
        # browsers do. A stream without its end (d.eof false) is a captured prefix, not an error.
        if not (members and d.eof and len(out) < limit and d.unused_data[:2] == b"\x1f\x8b"):
            return bytes(out)
        data = d.unused_data


def _gzip(data: bytes, limit: int) -> bytes:
    return _inflate(data, limit, 16 + zlib.MAX_WBITS, members=True)


def _deflate(data: bytes, limit: int) -> bytes:
    # RFC 9110 §8.4.1.2: "deflate" is a zlib stream (RFC 1950), but some servers send raw deflate
    # (RFC 1951); fall back to that, as browsers do.
    try:
        return _inflate(data, limit, zlib.MAX_WBITS)
    except zlib.error as first:
        try:
            return _inflate(data, limit, -zlib.MAX_WBITS)
        except zlib.error:
            raise first from None


def _brotli(data: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    # output_buffer_limit stops the decoder once its buffer reaches the cap (it may overshoot by
    # one internal buffer); the rest of the output is pulled with empty input.
    out = bytearray(d.process(data, output_buffer_limit=limit))
    while len(out) < limit and not d.is_finished():
        chunk = d.process(b"", output_buffer_limit=limit - len(out))
        if not chunk:
            break  # a truncated prefix: all it yields has been produced
        out += chunk
    return bytes(out[:limit])


def _zstd(data: bytes, limit: int) -> bytes:
    reader = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
        data, read_across_frames=True)  # RFC 8878 §3.1: a stream may hold several frames
    out = bytearray()
    while len(out) < limit:
        chunk = reader.read(min(limit - len(out), 1 << 16))
        if not chunk:
            break
        out += chunk
    return bytes(out)


_DECODERS = {
    "gzip": _gzip,
    "x-gzip": _gzip,  # RFC 9110 §8.4.1.3: "x-gzip" is the same as "gzip"
    "deflate": _deflate,
    "br": _brotli,  # RFC 7932
    "zstd": _zstd,  # RFC 8878
    "identity": lambda data, limit: data[:limit],
}
_ERRORS = (zlib.error, brotli.error, zstandard.ZstdError)


def decode_content(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Remove the content codings named by `content_encoding`; return at most `limit` bytes.

    A truncated prefix decodes to what it holds. Raises DecodeError for an unknown coding or data
    that is not in the named coding.
    """
    limit = max(limit, 0)
    # RFC 9110 §8.4: codings are listed in the order applied, so undo them last to first.
    codings = _codings(content_encoding)
    unknown = [c for c in codings if c not in _DECODERS]
    if unknown:
        raise DecodeError(f"unsupported content-coding {unknown[0]!r}")
    if not limit:
        return b""  # (and brotli would read a zero output limit as "unlimited")
    out = bytes(data)
    for i, coding in enumerate(reversed(codings)):
        # An inner layer is still compressed, and compressed data can be slightly larger than what
        # it holds (stored blocks, headers): give it that headroom, so that `limit` bytes come out.
        cap = limit if i == len(codings) - 1 else limit + (limit >> 6) + 1024
        try:
            out = _DECODERS[coding](out, cap)
        except _ERRORS as e:
            raise DecodeError(f"corrupt {coding} data: {e}") from None
    return out[:limit]


def _codings(content_encoding: str | None) -> list[str]:
    # Coding names are case-insensitive (RFC 9110 §8.4.1); empty list elements are ignored
    # (RFC 9110 §5.6.1.2).
    return [c for c in (c.strip().lower() for c in (content_encoding or "").split(",")) if c]


# --- media type and charset (RFC 9110 §8.3) -------------------------------------------------------


@functools.lru_cache(maxsize=256)  # an origin sends the same few values over and over (once per flow)
def _content_type(value: bytes | None) -> tuple[str | None, str | None]:
    """(media type in lower case, charset parameter) from a Content-Type field value."""
    if value is None:
        return None, None
    # RFC 9110 §8.3.1: media-type = type "/" subtype parameters; the type, subtype and parameter
    # names are case-insensitive; a parameter value may be a quoted-string.
    media, *params = value.decode("latin-1").split(";")
    charset = None
    for p in params:
        name, _, v = p.partition("=")
        if name.strip().lower() == "charset":
            charset = v.strip().strip('"').strip() or None
    return media.strip().lower() or None, charset


def _is_text_type(media: str | None) -> bool:
    return bool(media) and (media.startswith("text/") or media in _TEXT_TYPES
                            or media.endswith(("+json", "+xml")))


_UTF8_LABELS = frozenset({None, "utf-8", "UTF-8", "utf8", "UTF8"})


def _decode_text(data: bytes, charset: str | None, partial: bool) -> str:
    # A byte order mark outranks the label (WHATWG Encoding, "decode"); without a label, UTF-8
    # (RFC 9110 dropped HTTP/1.1's ISO-8859-1 default, RFC 7231 Appendix B).
    if not partial and charset in _UTF8_LABELS and data[:1] not in b"\xef\xff\xfe":
        return data.decode("utf-8", "replace")  # the common case, without codec lookups (per flow)
    for bom, name in _BOMS:
        if data.startswith(bom):
            charset, data = name, data[len(bom):]
            break
    try:
        b"\x00".decode(charset or "utf-8", "replace")  # LookupError: unknown, or not a text codec
        name = codecs.lookup(charset or "utf-8").name
    except LookupError:
        name = "utf-8"
    # WHATWG Encoding: the bare "utf-16" label means little-endian (Python's codec wants a BOM).
    name = {"utf-16": "utf-16-le", "utf-32": "utf-32-le"}.get(name, name)
    # A prefix may end inside a multi-byte character: leave it out rather than show U+FFFD.
    try:
        return codecs.getincrementaldecoder(name)("replace").decode(data, final=not partial)
    except UnicodeError:  # a few codecs raise despite "replace"
        return data.decode("utf-8", "replace")


def _sniff_utf8(data: bytes, partial: bool) -> str | None:
    try:
        text = data.decode("utf-8") if not partial else codecs.getincrementaldecoder("utf-8")().decode(data)
    except UnicodeDecodeError:
        return None
    return None if _JUNK.search(text) else text


# --- rendering -------------------------------------------------------------------------------------


@cython.dataclasses.dataclass
@cython.cclass
class _Look:
    """What a body looks like once decoded, capped at some limit. Built for every body of every
    flow: compiled (proxy/accel.py) an extension type, which builds in ~200 instructions where a
    NamedTuple's __new__ runs in the interpreter (~2,500) and a frozen dataclass's __init__ cost a
    third of render_body; from source a plain dataclass."""

    media: str | None
    encoding: str | None
    payload: bytes  # decoded content, or the raw captured bytes if decoding failed
    partial: bool  # payload is not the whole body (capture cap or render cap)
    decoded_size: int | None  # None: no coding, decoding failed, or cut by the cap
    error: str | None
    text: str | None  # payload as text, if it is text


@cython.locals(k=bytes, n=cython.Py_ssize_t)
def _type_and_coding(message: Message) -> tuple[str | None, str | None, str | None]:
    """(media type, charset, content coding) from the message's fields, in one pass over them."""
    ctype = None
    cenc = None
    for k, v in message.headers:  # this runs for every message of every flow
        n = len(k)  # compiled: C integers compared (no lower() for fields of other lengths)
        if n != 12 and n != 16:  # len(b"content-type"), len(b"content-encoding")
            continue
        lk = k.lower()
        if lk == b"content-type":
            if ctype is None:
                ctype = v
        elif lk == b"content-encoding":
            cenc = [v] if cenc is None else [*cenc, v]
    media, charset = _content_type(ctype)
    # RFC 9110 §5.3: repeated field lines combine into one comma-separated list, in order.
    encoding = ", ".join(v.decode("latin-1").strip() for v in cenc) if cenc else None
    return media, charset, encoding


def _look(message: Message, limit: int) -> _Look:
    body = message.body
    raw = bytes(body.captured)
    media, charset, encoding = _type_and_coding(message)
    payload, partial = raw[:limit], body.truncated or len(raw) > limit
    decoded_size = error = None
    if raw and encoding is not None and any(c != "identity" for c in _codings(encoding)):
        try:
            decoded = decode_content(raw, encoding, limit + 1)  # one more byte: detect the cut
        except DecodeError as e:
            error = str(e)
        else:
            payload, partial = decoded[:limit], body.truncated or len(decoded) > limit
            decoded_size = None if len(decoded) > limit else len(decoded)
    text = None
    if error is None and payload:
        if _is_text_type(media):
            text = _decode_text(payload, charset, partial)
        else:
            text = _sniff_utf8(payload, partial)
    elif error is None and raw:
        text = ""  # a compressed stream that holds nothing
    return _Look(media, encoding, payload, partial, decoded_size, error, text)


def _summary(message: Message, look: _Look) -> str:
    size = look.decoded_size if look.decoded_size is not None and not look.partial else message.body.size
    kind = f"undecodable {look.encoding}" if look.error else "binary"
    return f"{kind}, {size} bytes, {look.media or 'unknown type'}"


def render_body(message: Message, *, text_limit: int = 1 << 20) -> dict:
    """A body as a JSON-ready dict, for `Flow.to_dict(decode_body=render_body)`.

    `truncated` is true when the text or base64 shown is not the whole body, because the capture
    or `text_limit` (applied to the decoded bytes) cut it.
    """
    body = message.body
    if not body.captured:  # nothing to decode (a GET, a 204, or a body not captured)
        media, _, encoding = _type_and_coding(message)
        return {"size": body.size, "captured": 0, "truncated": body.truncated, "content_type": media,
                "content_encoding": encoding, "decoded_size": None}
    look = _look(message, text_limit)
    out: dict = {
        "size": body.size,
        "captured": len(body.captured),
        "truncated": look.partial if body.captured else body.truncated,
        "content_type": look.media,
        "content_encoding": look.encoding,
        "decoded_size": look.decoded_size,
    }
    if look.error is not None:
        out["decode_error"] = look.error
    if look.text is not None:
        out["text"] = look.text
    elif look.payload:
        out["base64"] = base64.b64encode(look.payload).decode("ascii")
        out["summary"] = _summary(message, look)
    return out


def printable(text: str) -> str:
    """`text` with control characters and bidi overrides escaped, safe to write to a terminal."""
    return text.translate(_ESCAPES)


def preview(message: Message, width: int) -> str:
    """A few printable lines of the body, each at most `width` characters; "" for an empty body."""
    body = message.body
    if not body.captured:
        return "" if body.size == 0 else f"({body.size} bytes, not captured)"
    width = max(width, 8)
    look = _look(message, width * _PREVIEW_LINES * 4)
    if look.text is None:
        note = f"; {look.error}" if look.error else ""
        return f"({_summary(message, look)}{note})"[:width]
    lines = look.text.splitlines() or [""]
    more = look.partial or len(lines) > _PREVIEW_LINES
    shown = []
    for line in lines[:_PREVIEW_LINES]:
        line = printable(line.expandtabs(4))
        shown.append(line if len(line) <= width else line[:width - 1] + "…")
    if more:
        shown.append(f"… ({body.size} bytes on the wire)")
    return "\n".join(shown)
