"""Sans-IO HTTP/1.1 framing: a thin adapter over httptools (llhttp) plus the serialisers.

Theory of operation
-------------------
httptools parses in C and calls back synchronously from `feed_data()`; the callbacks here only append
plain event objects to a list, so a reader is "bytes in, events out" like h11's `next_event()`:
`RequestHead`/`ResponseHead`, `Data`, `EndOfMessage` (with trailers). Why httptools and not h11: it
keeps header names' case and order exactly as on the wire, it is strict by default (it rejects
Content-Length together with Transfer-Encoding, duplicate Content-Lengths, a Transfer-Encoding that
does not end in chunked, bad chunk sizes, obs-fold, bare CR, NUL and whitespace before the colon,
which is the request-smuggling list of RFC 9112 §6.3 and §11.2), and it is several times faster,
which the per-request CPU budget of the benchmark issue needs.

What llhttp cannot know is added here:
- limits: request line (414), header block size and count (431), enforced while the head is still
  arriving so a slow or huge head cannot grow memory;
- a response to HEAD has no body whatever its Content-Length says (RFC 9110 §9.3.2), and a 101 ends
  HTTP on the connection: for both we stop the parser at the end of the head (`_StopParsing`) and,
  for 101, hand back the bytes after the head (`ResponseReader.leftover`);
- a close-delimited response ends at EOF (RFC 9112 §6.3 rule 8), and a Content-Length or chunked body
  cut short by EOF is an error (truncation), never a complete message.
One ResponseReader per exchange: the proxy has at most one request outstanding per upstream
connection, so anything after the final response is unsolicited and marks the connection unusable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools

try:  # compiled (proxy/accel.py), the readers are extension types: see _Reader
    import cython
except ImportError:  # the source without Cython installed: the declarations mean nothing
    from ._cython import cython

from .errors import (
    BadRequest,
    HeadersTooLarge,
    RequestLineTooLong,
    TooManyPipelined,
    UpstreamProtocolError,
    VersionNotSupported,
)

__all__ = [
    "Limits",
    "RequestHead",
    "ResponseHead",
    "Data",
    "EndOfMessage",
    "RequestReader",
    "ResponseReader",
    "serialize_request_head",
    "serialize_response_head",
    "chunk",
    "LAST_CHUNK",
    "simple_response",
]

Headers = list  # list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_line: int = 8192
    max_head: int = 65536
    max_headers: int = 100
    max_pipelined: int = 32  # request heads parsed ahead of the one being served

    @property
    def unfinished(self) -> int:
        """Bytes that may arrive before a head, or a chunk-size line or trailer field, is complete."""
        return self.max_head + self.max_request_line


# The events a reader hands out, one or more per message. Compiled (proxy/accel.py), each is an
# extension type made by Cython's dataclass support: five of them per keep-alive exchange, built at C
# speed where a Python dataclass runs its generated __init__ in the interpreter. From source they are
# plain dataclasses (proxy/_cython.py); annotations stay documentation either way.
@cython.dataclasses.dataclass
@cython.cclass
class RequestHead:
    method: str
    target: str
    http_version: str
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    upgrade: bool = False  # CONNECT or Upgrade: the connection stops being HTTP after this message


@cython.dataclasses.dataclass
@cython.cclass
class ResponseHead:
    status: int
    reason: str
    http_version: str
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None
    close_delimited: bool
    informational: bool = False  # 1xx other than 101: another head follows


@cython.dataclasses.dataclass(frozen=True)
@cython.cclass
class Data:
    data: bytes


@cython.dataclasses.dataclass(init=False)
@cython.cclass
class EndOfMessage:
    trailers: Headers = cython.dataclasses.field(default_factory=list)

    def __init__(self, trailers: Headers | None = None) -> None:
        # Written out: Cython's generated __init__ looks the factory up through an import per call.
        self.trailers = [] if trailers is None else trailers


class _StopParsing(Exception):
    pass


class _Faulty(ValueError):
    pass


_FRAMING_LENGTHS = frozenset(map(len, (b"transfer-encoding", b"content-length", b"upgrade")))


def _framing(headers: Headers, version: str) -> tuple[bool, int | None, bytes | None]:
    """(chunked, content_length, upgrade) from the head; _Faulty when the framing is ambiguous."""
    codings: list[bytes] = []
    length = None
    upgrade = None
    for k, v in headers:
        if len(k) not in _FRAMING_LENGTHS:  # most fields: no lower() needed to know they do not matter
            continue
        lk = k.lower()
        if lk == b"transfer-encoding":
            codings += [c.strip().lower() for c in v.split(b",") if c.strip()]
        elif lk == b"content-length":
            length = int(v)  # llhttp has already rejected anything that is not digits
        elif lk == b"upgrade":
            upgrade = v
    if not codings:
        return False, length, upgrade
    if version == "1.0":
        # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message MUST be treated as faulty framing.
        raise _Faulty("Transfer-Encoding in an HTTP/1.0 message")
    if codings.count(b"chunked") > 1:
        # RFC 9112 §6.1: a sender MUST NOT apply chunked more than once.
        raise _Faulty("chunked transfer coding applied more than once")
    return codings[-1] == b"chunked", length, upgrade


@cython.cclass
class _Reader:
    """Shared callback plumbing of both readers.

    Compiled (proxy/accel.py), the readers are extension types (`cython.cclass`): the attributes
    declared below are fields of the object, read and written at C speed from the readers' own
    methods, where a plain class pays CPython's generic attribute lookup on every access (~115
    instructions; llhttp calls back into a reader a dozen times per message). That took 25k
    instructions off a keep-alive request (bench/instructions: 332.5k -> 307.6k). Run from source,
    the declarations do nothing. Every attribute a reader is given must be declared in its class.
    """
    _carried = cython.declare(object, visibility="public")
    _chunked = cython.declare(object, visibility="public")
    _fields = cython.declare(object, visibility="public")
    _headers = cython.declare(object, visibility="public")
    _in_body = cython.declare(object, visibility="public")
    _in_head = cython.declare(object, visibility="public")
    _max_fields = cython.declare(object, visibility="public")
    _moved = cython.declare(object, visibility="public")
    _reason = cython.declare(object, visibility="public")
    _span = cython.declare(object, visibility="public")
    _stalled = cython.declare(object, visibility="public")
    _trailers = cython.declare(object, visibility="public")
    _url = cython.declare(object, visibility="public")
    events = cython.declare(list, visibility="public")  # a list: its pop/append are C calls compiled
    limits = cython.declare(object, visibility="public")
    # set by each reader: its httptools parser, and the bytes after a message that ends HTTP
    _parser = cython.declare(object, visibility="public")
    leftover = cython.declare(object, visibility="public")

    _too_large = HeadersTooLarge  # the client's fault (431); the origin's is a 502

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._max_fields = limits.max_headers  # read once per field: one attribute instead of two
        # A list, not a deque: it holds a few events at a time, and a reader lives as long as its
        # connection, idle ones included (an empty deque is ~600 bytes, an empty list 56).
        self.events: list = []
        self._url = b""
        self._reason = b""
        self._headers: Headers = []
        self._fields = self._headers  # where on_header appends: the head's fields, then any trailers
        self._in_head = False
        self._in_body = False
        self._trailers: Headers | None = None
        self._span = 0  # bytes the head being parsed may span at most (see _check_head)
        self._carried = 0  # bytes fed in earlier calls while a head was unfinished
        self._chunked = False  # the message's body is chunked (from the end of its head): see _feed
        self._moved = False  # body data or a chunk boundary came out of the current feed (fields: see _feed)
        self._stalled = 0  # bytes fed in a chunked body that brought none of those

    # httptools callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._reason = b""
        self._headers = self._fields = []
        self._in_head = True
        self._trailers = None
        self._chunked = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_request_line:
            raise RequestLineTooLong(f"request line longer than {self.limits.max_request_line} bytes")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every field of every message: one append and one count check. The size of the
        # block is checked once the head is complete (_check_head); feed() bounds an unfinished head.
        # (A field ending in a chunked body's feed counts as progress there: _feed compares the count.)
        fields = self._fields
        fields.append((name, value))
        if len(fields) > self._max_fields:
            what = "header" if self._trailers is None else "trailer"
            raise self._too_large(f"more than {self.limits.max_headers} {what} fields")

    def _check_head(self) -> None:
        """At the end of a head: refuse a header block over the size limit. The block is measured
        only when the bytes it arrived in could hold that much (a head that came in one small read
        cannot be too large)."""
        limit = self.limits.max_head
        if self._span > limit and sum(len(k) + len(v) + 4 for k, v in self._headers) > limit:
            raise self._too_large(f"header block larger than {limit} bytes")

    def on_body(self, body: bytes) -> None:
        self._moved = True
        if body:
            self.events.append(Data(body))

    def on_chunk_complete(self) -> None:
        self._moved = True

    def on_chunk_header(self) -> None:
        self._moved = True
        # Header callbacks after this one are trailers (RFC 9112 §7.1.2).
        if self._trailers is None:
            self._trailers = self._fields = []

    def on_message_complete(self) -> None:
        self._in_body = False
        self.events.append(EndOfMessage(self._trailers or []))

    def _feed(self, parser, data: bytes, error_cls) -> None:
        n = len(data)
        self._span = self._carried + n
        chunked = self._chunked
        fields, count = None, 0  # in a chunked body: the fields before this feed (see below)
        if chunked:
            self._moved = False
            fields = self._fields
            count = len(fields)
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            cause = e.__cause__ or e.__context__
            if isinstance(cause, _StopParsing):
                return
            if isinstance(cause, (BadRequest, HeadersTooLarge, RequestLineTooLong, TooManyPipelined,
                                  VersionNotSupported, UpstreamProtocolError)):
                raise cause from None
            raise error_cls(f"cannot parse: {cause or e}") from None
        except httptools.HttpParserError as e:
            raise error_cls(f"malformed HTTP: {e}") from None
        finally:
            self._carried = self._carried + n if self._in_head else 0
        # In a chunked body, bytes that brought no field, no body data and no chunk boundary are a
        # chunk-size line, a chunk extension or a trailer field still arriving. httptools keeps a
        # field's pieces until it ends, so an endless trailer field would grow without bound: bounded
        # like a head instead. (Heads have their own bound; other bodies hold nothing back.)
        if not chunked:
            return
        if self._moved or self._in_head or self._fields is not fields or len(fields) != count:  # (a field: progress)
            self._stalled = 0
        else:
            self._stalled += n
            bound = self.limits.unfinished
            if self._stalled > bound:
                raise self._too_large(f"a chunk-size line, chunk extension or trailer field longer than {bound} bytes")

    def next_event(self):
        return self.events.pop(0) if self.events else None

    @property
    def in_head(self) -> bool:
        """A message has begun and its head is not complete yet."""
        return self._in_head


@cython.cclass
class RequestReader(_Reader):
    """Requests from the client, pipelined ones included, in order."""
    _heads_queued = cython.declare(object, visibility="public")
    upgraded = cython.declare(object, visibility="public")

    def __init__(self, limits: Limits = Limits()) -> None:
        super().__init__(limits)
        self._parser = httptools.HttpRequestParser(self)
        self.upgraded = False
        self.leftover = b""  # bytes after a CONNECT/Upgrade request: not HTTP any more
        self._heads_queued = 0

    def next_event(self):
        if not self.events:
            return None
        ev = self.events.pop(0)  # (not super().next_event(): a Python-level call per event)
        if isinstance(ev, RequestHead):
            self._heads_queued -= 1
        return ev

    def push_back(self, ev) -> None:
        """Undo next_event() for `ev` (it becomes the next event again)."""
        if isinstance(ev, RequestHead):
            self._heads_queued += 1
        self.events.insert(0, ev)

    def on_headers_complete(self) -> None:
        self._check_head()
        self._in_head = False
        p = self._parser
        version = p.get_http_version()  # formatted by httptools on every call: once per head
        try:
            chunked, length, upgrade = _framing(self._headers, version)
        except _Faulty as e:
            raise BadRequest(f"ambiguous message framing: {e}") from None
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        method = p.get_method().decode("ascii")
        if version not in ("1.0", "1.1"):
            # An HTTP/0.9 request line (no version) or "HTTP/2.0" in text: never forwarded as is.
            raise VersionNotSupported(f"HTTP/{version} requests are not supported (HTTP/1.0 and 1.1 only)")
        self._chunked = chunked
        self._heads_queued += 1
        if self._heads_queued > self.limits.max_pipelined:
            raise TooManyPipelined(f"more than {self.limits.max_pipelined} pipelined requests queued")
        self.events.append(
            RequestHead(
                method=method,
                target=self._url.decode("latin-1"),
                http_version=version,
                headers=self._headers,
                keep_alive=p.should_keep_alive(),
                chunked=chunked,
                content_length=length,
                upgrade=method == "CONNECT" or upgrade is not None,
            )
        )

    def feed(self, data: bytes) -> None:
        if self.upgraded:
            self.leftover += data
            return
        try:
            self._feed(self._parser, data, BadRequest)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            self.leftover = data[int(e.args[0]) :]
        # llhttp buffers a header that spans reads; bound what an unfinished head may hold.
        if self._in_head and self._carried > self.limits.unfinished:
            raise HeadersTooLarge(f"request head larger than {self.limits.max_head} bytes")


@cython.cclass
class ResponseReader(_Reader):
    """The response(s) to ONE request: any 1xx, then the final response."""
    _close_delimited = cython.declare(object, visibility="public")
    _final = cython.declare(object, visibility="public")
    _head_buf = cython.declare(object, visibility="public")
    _head_only = cython.declare(object, visibility="public")
    _heads_in_buf = cython.declare(object, visibility="public")
    _reusable = cython.declare(object, visibility="public")
    _stopped = cython.declare(object, visibility="public")
    done = cython.declare(object, visibility="public")
    switched = cython.declare(object, visibility="public")
    unsolicited = cython.declare(object, visibility="public")

    _too_large = UpstreamProtocolError

    def __init__(self, request_method: str, limits: Limits = Limits()) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._start(request_method, limits)

    def reset(self, request_method: str) -> bool:
        """Ready this reader for the next response on the same connection, keeping its parser (a
        new llhttp parser per response was ~3% of a keep-alive exchange). Only after a response that
        ended cleanly and left the connection persistent; False (nothing changed) otherwise."""
        if not self._reusable:
            return False
        self._start(request_method, self.limits)
        return True

    def _start(self, request_method: str, limits: Limits) -> None:
        _Reader.__init__(self, limits)
        self._reusable = False  # set when a final response ends with llhttp ready for the next one
        self._head_only = request_method == "HEAD"
        self._close_delimited = False
        self.done = False
        self.switched = False  # a 101: the rest of the stream is the new protocol
        self.unsolicited = False  # the origin sent bytes after the final response
        self._head_buf = bytearray()  # raw bytes of the heads not yet consumed (bounded)
        self._heads_in_buf = 0  # complete heads at the start of _head_buf
        self._stopped = False  # parsing stopped at the final head (HEAD, 101)
        self._final = False  # the final head went on into body parsing (llhttp's own framing)
        self.leftover = b""

    def on_message_begin(self) -> None:
        if self.done:
            self.unsolicited = True
            self._reusable = False  # llhttp stops in the middle of what follows
            raise _StopParsing()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._check_head()
        self._in_head = False
        p = self._parser
        status = p.get_status_code()
        version = p.get_http_version()  # formatted by httptools on every call: once per head
        try:
            chunked, length, _ = _framing(self._headers, version)
        except _Faulty as e:
            raise UpstreamProtocolError(f"the origin's response has ambiguous framing: {e}") from None
        except ValueError:
            raise UpstreamProtocolError("the origin sent an invalid Content-Length") from None
        informational = 100 <= status < 200 and status != 101
        if informational and (chunked or any(k.lower() == b"transfer-encoding" for k, _ in self._headers) or length):
            # RFC 9110 §15.2: a 1xx response ends with its header section; framing headers on it make
            # the stream ambiguous (llhttp's reading of what follows depends on how the bytes arrive).
            raise UpstreamProtocolError(f"the origin sent a {status} interim response with a body")
        no_body = self._head_only or status in (101, 204, 304) or informational
        self._chunked = chunked and not no_body
        self._close_delimited = not (no_body or chunked or length is not None)
        head = ResponseHead(
            status=status,
            reason=self._reason.decode("latin-1"),
            http_version=version,
            headers=self._headers,
            # llhttp takes a HEAD response without Content-Length for a close-delimited one; it is bodiless.
            keep_alive=(_persistent(self._headers, version) if self._head_only
                        else p.should_keep_alive() and not self._close_delimited),
            chunked=self._chunked,
            content_length=length,
            close_delimited=self._close_delimited,
            informational=informational,
        )
        self.events.append(head)
        self._heads_in_buf += 1
        if informational:
            return
        if status == 101 or self._head_only:
            # llhttp would wait for a HEAD response's body, and stops with an error after a 101.
            self.done = True
            self._stopped = True
            self.switched = status == 101
            self.events.append(EndOfMessage())
            raise _StopParsing()
        self._in_body = True
        self._final = True

    def on_message_complete(self) -> None:
        if self.done:
            return
        if self.events and isinstance(self.events[-1], ResponseHead) and self.events[-1].informational:
            return  # the end of a 1xx is not the end of the exchange
        self.done = True
        super().on_message_complete()
        self._reusable = self._parser.should_keep_alive()
        # The events own the message now; a reader kept for the connection's next response must not
        # hold this one's fields while the connection idles.
        self._headers = self._fields = []
        self._trailers = None

    def feed(self, data: bytes) -> None:
        if self.done:
            self._reusable = False
            if self.switched:  # after a 101 every byte belongs to the new protocol
                self.leftover += data
                return
            # Stray empty lines after a response are tolerated (as llhttp does within one read, RFC
            # 9112 §2.2); anything else is unsolicited, whichever read it arrives in.
            if data.strip(b"\r\n"):
                self.unsolicited = True
                self.leftover += data
            return
        tracking = self._in_head or not self._in_body  # bytes of heads: kept until their end is known
        if tracking:
            self._head_buf += data
        try:
            self._feed(self._parser, data, UpstreamProtocolError)
        except UpstreamProtocolError:
            self._reusable = False
            if not self.done:
                raise
            # llhttp refuses bytes after a message that ends the connection; our exchange is complete
            # all the same: those bytes are unsolicited, whichever read they arrived in.
            self.unsolicited = True
        if self._final:  # llhttp frames the body from here on: no head bytes to keep
            self._head_buf.clear()
            self._heads_in_buf = 0
        elif tracking and self._heads_in_buf:
            # Drop the complete heads (1xx ones, and the final head of a HEAD/101 exchange, where
            # parsing stopped): what remains is a partial head, or the bytes after the final one.
            rest = _after_heads(self._head_buf, self._heads_in_buf)
            self._head_buf = bytearray(rest)
            self._heads_in_buf = 0
            if self._stopped:  # HEAD or 101: what follows the head is not part of this response
                self.leftover = bytes(rest)
                self._head_buf.clear()
                if rest.strip(b"\r\n") and not self.switched:  # stray empty lines are tolerated (see feed)
                    self.unsolicited = True
        if len(self._head_buf) > self.limits.unfinished:
            raise UpstreamProtocolError(f"the origin's response head is larger than {self.limits.max_head} bytes")

    def feed_eof(self) -> None:
        """The origin closed its side. Ends a close-delimited body; anything else was cut short."""
        if self.done:
            return
        if self._in_body and self._close_delimited:
            self.done = True
            self._in_body = False
            self.events.append(EndOfMessage())
            return
        where = "in the response body" if self._in_body else "before sending a complete response head"
        if not self._in_body and not self._head_buf and not self._headers:
            where = "without sending a response"
        raise UpstreamProtocolError(f"the origin closed the connection {where}")


def _persistent(headers: Headers, version: str) -> bool:
    """RFC 9112 §9.3: does the connection persist after this message (by version and Connection)?"""
    tokens = {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}
    if b"close" in tokens:
        return False
    return version == "1.1" or b"keep-alive" in tokens


_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _after_heads(buf: bytearray, n: int) -> bytes:
    """The bytes of `buf` after its first `n` complete heads (bodiless: 1xx, HEAD, 101)."""
    pos = 0
    for _ in range(n):
        m = _HEAD_END.search(buf, pos)
        if m is None:
            return b""
        pos = m.end()
    return bytes(buf[pos:])


# --- serialisers ------------------------------------------------------------------------------

_CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def _headers_bytes(headers: Headers) -> bytes:
    # Two C-level joins: less than half the time of concatenating each line (this runs twice per exchange).
    if not headers:
        return b""
    return b"\r\n".join([b": ".join(field) for field in headers]) + _CRLF


def serialize_request_head(method: str, target: str, version: str, headers: Headers) -> bytes:
    return f"{method} {target} HTTP/{version}\r\n".encode("latin-1") + _headers_bytes(headers) + _CRLF


def serialize_response_head(status: int, reason: str, version: str, headers: Headers) -> bytes:
    return f"HTTP/{version} {status} {reason}\r\n".encode("latin-1") + _headers_bytes(headers) + _CRLF


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Headers) -> bytes:
    return b"0\r\n" + _headers_bytes(trailers) + _CRLF


def simple_response(status: int, reason: str, body: str, *, close: bool = True, extra: Headers = ()) -> bytes:
    """A complete response generated by the proxy itself (errors, CONNECT replies)."""
    payload = body.encode("utf-8")
    headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(payload)).encode()),
        *extra,
    ]
    if close:
        headers.append((b"Connection", b"close"))
    return serialize_response_head(status, reason, "1.1", headers) + payload
