"""Plain data for one intercepted exchange: the Flow record and its parts.

The relay fills a Flow as the exchange progresses and hands it to the sinks when it is complete (or
failed). `Flow.to_dict()` is the JSON Lines schema documented in the README; sinks never reach into
the relay, only into these records.

The records built for every exchange are dataclasses declared for Cython (`cython.dataclasses.dataclass`
over `cython.cclass`): compiled (proxy/accel.py) they are extension types, whose fields the methods
here and locals declared with `cython.locals` read directly; from source, plain dataclasses
(proxy/_cython.py). Those with a factory-made field write their __init__ out (see Body).
"""

from __future__ import annotations

import json
import os

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; keep working without it
    _orjson = None
from dataclasses import dataclass
from typing import Any

try:  # compiled (proxy/accel.py): see _fields_json
    import cython
except ImportError:
    from ._cython import cython

__all__ = ["Body", "Message", "Request", "Response", "CertInfo", "TlsSide", "TlsInfo", "Timing", "Flow"]

Headers = list  # list[tuple[bytes, bytes]] as on the wire: case and order kept


# Flow ids: 32 random hex digits (so any short prefix picks a flow, as with git), drawn from the OS
# 256 at a time: uuid4() per flow showed in the profile.
_ID_POOL: list[str] = []


def new_flow_id() -> str:
    if not _ID_POOL:
        raw = os.urandom(16 * 256).hex()
        _ID_POOL.extend(raw[i : i + 32] for i in range(0, len(raw), 32))
    return _ID_POOL.pop()


class Facts(dict):
    """A dict like any other to whoever reads it, carrying its own JSON text, made once (`json`: an
    orjson.Fragment, or None). A connection's TLS facts are the same in each of its records: with
    their text at hand the encoder copies it instead of writing ~30 strings again (a quarter of
    encoding a keep-alive request's record). The text is used by `dumps`/`dumps_line` only; any
    other reader (the store's columns, the stdlib encoder) sees the dict."""

    __slots__ = ("json",)

    @classmethod
    def of(cls, d: dict) -> Facts:
        f = cls(d)
        f.json = None
        if _orjson is not None:
            try:
                # As text: the bytes orjson returns keep the ~4 KiB buffer it wrote them into, which
                # held for a connection's life cost 8 KiB per idle connection (bench idle_500).
                f.json = _orjson.Fragment(_orjson.dumps(d).decode("utf-8"))
            except TypeError:  # lone surrogates: written with the rest of the record by the fallback
                pass
        return f


def _json_default(o):
    """orjson's hook for subclasses of its types (OPT_PASSTHROUGH_SUBCLASS, which the Facts' text
    needs): a Facts is its text; any other subclass is written as its base type, as without the option."""
    if type(o) is Facts:
        return o.json if o.json is not None else dict(o)
    for base in (str, int, float, dict, list, tuple):
        if isinstance(o, base):
            return str.__str__(o) if base is str else base(o)
    raise TypeError(f"Type is not JSON serializable: {type(o).__name__}")


_OPT_LINE = 0 if _orjson is None else _orjson.OPT_APPEND_NEWLINE | _orjson.OPT_PASSTHROUGH_SUBCLASS
_OPT_TEXT = 0 if _orjson is None else _orjson.OPT_PASSTHROUGH_SUBCLASS


def dumps(record: dict) -> str:
    """Compact JSON text of a record. orjson (C) when it can, several times faster than the stdlib
    encoder, which was the largest single cost of logging a flow; the stdlib otherwise. A lone
    surrogate (surrogateescape'd input) becomes the JSON escape "\\udcxx", so the text is valid UTF-8."""
    if _orjson is not None:
        try:
            return _orjson.dumps(record, default=_json_default, option=_OPT_TEXT).decode("utf-8")
        except TypeError:  # orjson refuses lone surrogates
            pass
    text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def dumps_line(record: dict) -> bytes:
    """`dumps(record)` as UTF-8 bytes ending in a newline: a line of a JSON Lines file, made without
    the detour through a str (orjson writes the bytes and the newline itself)."""
    if _orjson is not None:
        try:
            return _orjson.dumps(record, default=_json_default, option=_OPT_LINE)
        except TypeError:  # lone surrogates: dumps() escapes them
            pass
    return dumps(record).encode("utf-8") + b"\n"


def loads(text: bytes | str):
    """Parse JSON text (a record, as `dumps` wrote it): orjson when installed, the stdlib otherwise."""
    if _orjson is not None:
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:  # e.g. the escape of a lone surrogate, which the stdlib reads
            pass
    return json.loads(text)


def _render_body():
    """decode.render_body (imported late: decode imports this module); cached, as this runs per flow."""
    global _RENDER_BODY
    if _RENDER_BODY is None:
        from .decode import render_body

        _RENDER_BODY = render_body
    return _RENDER_BODY


_RENDER_BODY = None


@cython.locals(k=bytes, v=bytes)
def _fields_json(fields: Headers) -> list:
    """Header or trailer fields as [name, value] pairs of text, decoded as latin-1 (every byte kept).
    Compiled, `k` and `v` are known to be bytes, so each decode is one C call to the latin-1 decoder
    instead of a method lookup and a codec-name lookup (a dozen fields per exchange, in every record)."""
    out = []
    for k, v in fields:
        out.append([k.decode("latin-1"), v.decode("latin-1")])
    return out


@cython.dataclasses.dataclass(init=False)
@cython.cclass
class Body:
    """A body as relayed: its true size, and a captured prefix (up to the configured cap)."""

    size: int = 0
    captured: bytearray = cython.dataclasses.field(default_factory=bytearray)
    truncated: bool = False

    # The records with a factory-made field have their __init__ written out (init=False): Cython's
    # generated one looks each factory up through an import per call (~8k instructions per Request).
    def __init__(self, size: int = 0, captured: bytearray | None = None, truncated: bool = False) -> None:
        self.size = size
        self.captured = bytearray() if captured is None else captured
        self.truncated = truncated

    def feed(self, data: bytes, cap: int) -> None:
        self.size += len(data)
        room = cap - len(self.captured)
        if room > 0:
            self.captured += data[:room]
        if len(data) > room:
            self.truncated = True


@cython.dataclasses.dataclass(init=False)
@cython.cclass
class Message:
    http_version: str = "1.1"
    headers: Headers = cython.dataclasses.field(default_factory=list)
    body: Body = cython.dataclasses.field(default_factory=Body)
    trailers: Headers = cython.dataclasses.field(default_factory=list)

    def __init__(self, http_version: str = "1.1", headers: Headers | None = None, body: Body | None = None,
                 trailers: Headers | None = None) -> None:
        self._set_message(http_version, headers, body, trailers)

    @cython.cfunc
    def _set_message(self, http_version: str, headers: Headers | None, body: Body | None,
                     trailers: Headers | None):
        """The message's own fields, for its __init__ and its subclasses' (compiled: a C call)."""
        self.http_version = http_version
        self.headers = [] if headers is None else headers
        self.body = Body() if body is None else body
        self.trailers = [] if trailers is None else trailers

    @cython.locals(k=bytes, n=cython.Py_ssize_t)
    def header(self, name: bytes) -> bytes | None:
        """First value of a header, case-insensitively (name in lower case). Compiled, fields whose
        length differs are passed over by a C comparison, without lower()."""
        n = len(name)
        for k, v in self.headers:
            if len(k) == n and k.lower() == name:
                return v
        return None


@cython.dataclasses.dataclass(init=False)
@cython.cclass
class Request(Message):
    method: str = ""
    scheme: str = "https"
    host: str = ""
    port: int = 443
    target: str = "/"  # the request-target as sent by the client

    def __init__(self, http_version: str = "1.1", headers: Headers | None = None, body: Body | None = None,
                 trailers: Headers | None = None, method: str = "", scheme: str = "https", host: str = "",
                 port: int = 443, target: str = "/") -> None:
        self._set_message(http_version, headers, body, trailers)
        self.method = method
        self.scheme = scheme
        self.host = host
        self.port = port
        self.target = target

    @property
    def url(self) -> str:
        if self.target.startswith(("http://", "https://")):
            return self.target
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = host if self.port == default else f"{host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.target}"


@cython.dataclasses.dataclass(init=False)
@cython.cclass
class Response(Message):
    status: int = 0
    reason: str = ""

    def __init__(self, http_version: str = "1.1", headers: Headers | None = None, body: Body | None = None,
                 trailers: Headers | None = None, status: int = 0, reason: str = "") -> None:
        self._set_message(http_version, headers, body, trailers)
        self.status = status
        self.reason = reason


@cython.locals(m=Message)
def _message_dict(m: Message, d: dict, decode_body: Any) -> dict:
    """`d` completed with a message's version, fields and body (Flow.to_dict, once per message).
    The records' classes are extension types when compiled: a local declared as one (cython.locals)
    reads their fields directly instead of through CPython's attribute lookup (~170 instructions each)."""
    d["http_version"] = m.http_version
    d["headers"] = _fields_json(m.headers)
    if m.trailers:
        d["trailers"] = _fields_json(m.trailers)
    if decode_body is not None:
        d["body"] = decode_body(m)
    else:
        d["body"] = {"size": m.body.size, "captured": len(m.body.captured), "truncated": m.body.truncated}
    return d


@dataclass(frozen=True, slots=True)
class CertInfo:
    subject: str
    issuer: str
    sans: tuple[str, ...]
    sha256: str
    not_before: str
    not_after: str


@cython.dataclasses.dataclass
@cython.cclass
class TlsSide:
    sni: str | None = None
    version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    alpn_offer: tuple[str, ...] = ()
    # upstream only
    verified: bool | None = None
    insecure: bool = False
    verify_code: int | None = None
    verify_result: str | None = None
    cert: CertInfo | None = None
    resumed: bool = False  # upstream: a resumed session (its certificate was verified on an earlier connection)
    _cached: tuple | None = cython.dataclasses.field(default=None, init=False, repr=False, compare=False)  # (facts, dict)

    def to_dict(self, client: bool) -> dict:
        """The JSON-ready facts. One connection's flows all carry the same side, so the dict is made
        once and shared by their records while the facts stay the same (records are read, never
        modified). The facts are compared, not watched: a __setattr__ hook cost more per connection
        (every field of every new side) than building the dict does."""
        facts = (client, self.sni, self.version, self.cipher, self.alpn, self.alpn_offer, self.verified,
                 self.insecure, self.verify_code, self.verify_result, self.cert, self.resumed)  # every field
        cached = self._cached
        if cached is not None and cached[0] == facts:
            return cached[1]
        d = Facts.of(self._make_dict(client))
        self._cached = (facts, d)
        return d

    def _make_dict(self, client: bool) -> dict:
        # Written out rather than dataclasses.asdict(): this runs for every flow, and asdict's deep
        # copies cost more than the rest of the record together (measured with cProfile).
        d: dict[str, Any] = {"sni": self.sni, "version": self.version, "cipher": self.cipher, "alpn": self.alpn,
                             "alpn_offer": list(self.alpn_offer)}
        if client:
            return d
        c = self.cert
        d.update(verified=self.verified, insecure=self.insecure, resumed=self.resumed, verify_code=self.verify_code,
                 verify_result=self.verify_result,
                 cert=None if c is None else {"subject": c.subject, "issuer": c.issuer, "sans": list(c.sans),
                                              "sha256": c.sha256, "not_before": c.not_before,
                                              "not_after": c.not_after})
        return d


@cython.dataclasses.dataclass
@cython.cclass
class TlsInfo:
    client: TlsSide | None = None
    upstream: TlsSide | None = None


@cython.dataclasses.dataclass
@cython.cclass
class Timing:
    """Milliseconds since the flow's start for each milestone (None = not reached)."""

    start: float = 0.0  # wall clock, seconds since the epoch
    client_tls_ms: float | None = None
    connect_ms: float | None = None
    upstream_tls_ms: float | None = None
    request_sent_ms: float | None = None
    first_byte_ms: float | None = None
    total_ms: float | None = None


@cython.dataclasses.dataclass(init=False)
@cython.cclass
class Flow:
    client_addr: str
    mode: str  # "https" (CONNECT + TLS), "tunnel-http" (CONNECT, plain HTTP inside), "http" (forward)
    id: str = cython.dataclasses.field(default_factory=new_flow_id)
    request: Request | None = None
    response: Response | None = None
    tls: TlsInfo = cython.dataclasses.field(default_factory=TlsInfo)
    timing: Timing = cython.dataclasses.field(default_factory=Timing)
    error: dict | None = None  # ProxyError.to_record()
    upgraded: str | None = None  # e.g. "websocket" once switched to a raw relay
    tunnel: dict | None = None  # passthrough: {"host", "port", "bytes_from_client", "bytes_from_server"}
    websocket: dict | None = None  # after a WebSocket upgrade: messages both ways (proxy/websocket.py)
    stream_id: int | None = None  # HTTP/2: the client's stream id (proxy/http2.py)
    _rendered: tuple | None = cython.dataclasses.field(default=None, init=False, repr=False, compare=False)  # (record, line)
    _text: str | None = cython.dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __init__(self, client_addr: str, mode: str, id: str | None = None, request: Request | None = None,
                 response: Response | None = None, tls: TlsInfo | None = None, timing: Timing | None = None,
                 error: dict | None = None, upgraded: str | None = None, tunnel: dict | None = None,
                 websocket: dict | None = None, stream_id: int | None = None, insecure: bool = False) -> None:
        self.client_addr = client_addr
        self.mode = mode
        self.id = new_flow_id() if id is None else id
        self.request = request
        self.response = response
        self.tls = TlsInfo() if tls is None else tls
        self.timing = Timing() if timing is None else timing
        self.error = error
        self.upgraded = upgraded
        self.tunnel = tunnel
        self.websocket = websocket
        self.stream_id = stream_id
        self.insecure = insecure
        self._rendered = None
        self._text = None

    def rendered(self) -> tuple[dict, str]:
        """(record, JSON text) with bodies decoded, computed once and shared by every sink (the JSON
        Lines log and the flow store write the same text). Call it only once the flow is complete."""
        record, line = self.rendered_bytes()
        if self._text is None:
            self._text = line[:-1].decode("utf-8")
        return record, self._text

    def rendered_line(self) -> bytes:
        """The same record as UTF-8 JSON text with a newline: a line for a JSON Lines file."""
        return self.rendered_bytes()[1]

    def rendered_bytes(self) -> tuple[dict, bytes]:
        """(record, rendered_line()): for sinks that write bytes and also read the record."""
        if self._rendered is None:
            record = self.to_dict(decode_body=_render_body())
            self._rendered = (record, dumps_line(record))
        return self._rendered
    insecure: bool = False

    def __repr__(self) -> str:
        req = f"{self.request.method} {self.request.url}" if self.request else "-"
        st = self.response.status if self.response else (self.error or {}).get("kind", "-")
        return f"<Flow {self.id[:8]} {self.client_addr} {req} -> {st}>"

    @cython.locals(r=Request, s=Response, t=Timing, sides=TlsInfo)
    def to_dict(self, decode_body: Any = None) -> dict:
        """JSON-ready dict; `decode_body(message) -> dict` renders bodies (see decode.py)."""
        out: dict[str, Any] = {
            "id": self.id,
            "start": self.timing.start,
            "client": self.client_addr,
            "mode": self.mode,
        }
        if self.stream_id is not None:
            out["stream_id"] = self.stream_id
        r = self.request
        if r is not None:
            d = {"method": r.method, "url": r.url, "scheme": r.scheme, "host": r.host, "port": r.port,
                 "target": r.target}
            out["request"] = _message_dict(r, d, decode_body)
        else:
            out["request"] = None
        s = self.response
        out["response"] = None if s is None else _message_dict(s, {"status": s.status, "reason": s.reason}, decode_body)
        tls = {}
        sides = self.tls
        if sides.client is not None:
            tls["client"] = sides.client.to_dict(client=True)
        if sides.upstream is not None:
            tls["upstream"] = sides.upstream.to_dict(client=False)
        out["tls"] = tls or None
        t = self.timing
        out["timings"] = {
            "client_tls_ms": t.client_tls_ms,
            "connect_ms": t.connect_ms,
            "upstream_tls_ms": t.upstream_tls_ms,
            "request_sent_ms": t.request_sent_ms,
            "first_byte_ms": t.first_byte_ms,
            "total_ms": t.total_ms,
        }
        out["error"] = self.error
        out["upgraded"] = self.upgraded
        if self.tunnel is not None:
            out["tunnel"] = self.tunnel
        if self.websocket is not None:
            out["websocket"] = self.websocket
        out["insecure"] = self.insecure
        return out
