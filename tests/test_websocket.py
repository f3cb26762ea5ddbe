"""proxy/websocket.py: the observer that parses both directions of a WebSocket connection for the log.

Well-formed traffic is made by an independent implementation, wsproto's frame serializer (masked as a
client, unmasked as a server, with its permessage-deflate), so the parser is not checked against
itself. Protocol violations are written byte by byte with `raw()`, since no library sends them.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

from proxy.websocket import DeflateParams, WebSocketObserver, negotiated_extensions

REQUEST = [(b"Upgrade", b"websocket"), (b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits")]


def observer(extensions: str | None = None, **kw) -> WebSocketObserver:
    headers = [(b"Upgrade", b"websocket")]
    if extensions is not None:
        headers.append((b"Sec-WebSocket-Extensions", extensions.encode()))
    return WebSocketObserver(REQUEST, headers, clock=lambda: 1234.5, **kw)


def peer(direction: str, extensions: str | None = None) -> FrameProtocol:
    """wsproto's frame writer for `direction` ("client": masked), with the extension as agreed."""
    exts = []
    if extensions is not None:
        ext = PerMessageDeflate()
        ext.finalize(extensions)
        exts.append(ext)
    return FrameProtocol(client=direction == "client", extensions=exts)


def raw(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, key: bytes | None = None,
        length16: bool = False, length64: bool = False, length: int | None = None) -> bytes:
    """One frame as written by hand: any header, even one RFC 6455 forbids."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv << 4 | opcode
    mask = 0x80 if key is not None else 0
    if length64 or n > 0xFFFF:
        head = bytes([b0, mask | 127]) + struct.pack("!Q", n)
    elif length16 or n > 125:
        head = bytes([b0, mask | 126]) + struct.pack("!H", n)
    else:
        head = bytes([b0, mask | n])
    if key is None:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


KEY = b"\x37\xfa\x21\x3d"


def client_raw(opcode: int, payload: bytes = b"", **kw) -> bytes:
    return raw(opcode, payload, key=KEY, **kw)


def dicts(messages) -> list[dict]:
    return [m.to_dict() for m in messages]


def feed_all(obs: WebSocketObserver, direction: str, data: bytes) -> list[dict]:
    return dicts(obs.feed(direction, data))


# --- well-formed traffic ---------------------------------------------------------------------------


def test_masked_client_text_and_unmasked_server_binary():
    obs = observer()
    wire = bytes(peer("client").send_data("hello, world"))
    assert wire[1] & 0x80  # wsproto masks as a client
    [m] = feed_all(obs, "client", wire)
    assert m == {"direction": "client", "type": "text", "time": 1234.5, "size": 12, "wire_size": len(wire),
                 "frames": 1, "compressed": False, "preview": "hello, world", "truncated": False}
    wire = bytes(peer("server").send_data(b"\x00\xffbinary"))
    assert not wire[1] & 0x80
    [m] = feed_all(obs, "server", wire)
    assert (m["direction"], m["type"], m["size"], m["wire_size"]) == ("server", "binary", 8, len(wire))
    assert m["preview"] == "AP9iaW5hcnk=" and not m["truncated"]  # base64 of the bytes


def test_every_opcode():
    obs = observer()
    p = peer("client")
    wire = (p.send_data("t") + p.send_data(b"b") + p.ping(b"ping!") + p.pong(b"pong!")
            + p.send_data("frag", fin=False) + p.send_data("ment") + p.close(1001, "going"))
    got = feed_all(obs, "client", bytes(wire))
    assert [(m["type"], m["size"], m["frames"]) for m in got] == [
        ("text", 1, 1), ("binary", 1, 1), ("ping", 5, 1), ("pong", 5, 1), ("text", 8, 2), ("close", 7, 1)]
    assert got[2]["preview"] == "cGluZyE=" and got[3]["preview"] == "cG9uZyE="
    assert got[4]["preview"] == "fragment"
    assert (got[5]["close_code"], got[5]["close_reason"], got[5]["preview"]) == (1001, "going", "going")
    assert sum(m["wire_size"] for m in got) == len(wire)


def test_empty_messages_and_empty_close():
    obs = observer()
    p = peer("server")
    got = feed_all(obs, "server", bytes(p.send_data("") + p.send_data(b"") + p.ping() + p.close()))
    assert [(m["type"], m["size"], m["preview"]) for m in got] == [
        ("text", 0, ""), ("binary", 0, ""), ("ping", 0, ""), ("close", 0, "")]
    assert got[-1]["close_code"] is None and got[-1]["close_reason"] == ""  # RFC 6455 §7.1.5: 1005, not sent
    assert obs.to_dict()["close"] == {"code": None, "reason": "", "by": "server", "answered": False, "time": 1234.5}


@pytest.mark.parametrize("size, header", [(125, 2), (126, 4), (65535, 4), (65536, 10), (3 << 20, 10)])
def test_7_16_and_64_bit_lengths(size, header):
    obs = observer(preview_limit=100)
    payload = os.urandom(size)
    for direction in ("client", "server"):
        wire = bytes(peer(direction).send_data(payload))
        assert len(wire) == size + header + (4 if direction == "client" else 0)
        [m] = feed_all(obs, direction, wire)
        assert (m["type"], m["size"], m["wire_size"]) == ("binary", size, len(wire))
        assert m["preview"] == base64.b64encode(payload[:100]).decode()
        assert m["truncated"] is True


def test_fragmented_text_with_interleaved_ping_and_a_character_split_across_fragments():
    obs = observer()
    p = peer("client")
    # wsproto writes text from str, whole characters: split "é" (C3 A9) across two fragments by hand
    wire = (client_raw(0x1, b"caf\xc3", fin=False) + bytes(p.ping(b"keepalive"))
            + client_raw(0x0, b"\xa9 au", fin=False) + bytes(p.pong()) + client_raw(0x0, b" lait"))
    got = feed_all(obs, "client", wire)
    assert [m["type"] for m in got] == ["ping", "pong", "text"]
    assert got[2]["preview"] == "café au lait" and got[2]["frames"] == 3 and got[2]["size"] == 13
    assert sum(m["wire_size"] for m in got) == len(wire)


def test_text_preview_is_bounded_in_characters():
    obs = observer(preview_limit=5)
    [m] = feed_all(obs, "server", bytes(peer("server").send_data("ééééééé")))
    assert (m["preview"], m["truncated"], m["size"]) == ("ééééé", True, 14)
    [m] = feed_all(obs, "server", bytes(peer("server").send_data("ééééé")))
    assert (m["preview"], m["truncated"]) == ("ééééé", False)


# --- permessage-deflate ----------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["client", "server"])
def test_deflate_with_context_takeover(direction):
    obs = observer("permessage-deflate")
    p = peer(direction, "permessage-deflate")
    text = "the same sentence, again and again. " * 20
    first, second = bytes(p.send_data(text)), bytes(p.send_data(text))
    assert first[0] & 0x40 and len(second) < len(first)  # the second refers back to the first
    got = feed_all(obs, direction, first + second)
    assert [(m["type"], m["preview"], m["size"], m["compressed"]) for m in got] == [
        ("text", text, len(text), True)] * 2
    assert [m["wire_size"] for m in got] == [len(first), len(second)]


@pytest.mark.parametrize("param, direction", [("client_no_context_takeover", "client"),
                                              ("server_no_context_takeover", "server")])
def test_deflate_without_context_takeover(param, direction):
    agreed = f"permessage-deflate; {param}"
    obs = observer(agreed)
    p = peer(direction, agreed)
    text = "no memory between messages " * 10
    first, second = bytes(p.send_data(text)), bytes(p.send_data(b"x" + text.encode()))
    got = feed_all(obs, direction, first + second)
    assert [m["size"] for m in got] == [len(text), len(text) + 1] and all(m["compressed"] for m in got)
    # and the parameter is honoured: a sender that keeps its context is caught referring back
    cheat = peer(direction, "permessage-deflate")
    obs = observer(agreed)
    got = feed_all(obs, direction, bytes(cheat.send_data(text)) + bytes(cheat.send_data(text)))
    assert got[0]["type"] == "text" and got[1]["type"] == "error" and "corrupt" in got[1]["error"]


def test_context_takeover_is_per_direction():
    agreed = "permessage-deflate; server_no_context_takeover"
    obs = observer(agreed)
    c, s = peer("client", agreed), peer("server", agreed)
    text = "shared words " * 30
    got = []
    for _ in range(3):
        got += feed_all(obs, "client", bytes(c.send_data(text)))
        got += feed_all(obs, "server", bytes(s.send_data(text)))
    assert [(m["direction"], m["size"]) for m in got] == [("client", len(text)), ("server", len(text))] * 3


def test_deflate_window_bits():
    agreed = "permessage-deflate; server_max_window_bits=9; client_max_window_bits=10"
    assert DeflateParams.from_params(negotiated_extensions(agreed)[0][1]) == DeflateParams(False, False, 9, 10)
    obs = observer(agreed)
    text = os.urandom(600).hex() * 3  # repeats 1200 characters back: more than a 9-bit window holds
    server = peer("server", agreed)
    for _ in range(2):  # the second message refers back into the first (context takeover)
        got = feed_all(obs, "server", bytes(server.send_data(text)))
        assert (got[0]["type"], got[0]["size"]) == ("text", len(text))
    # zlib makes an 8-bit window 9 bits (and Python's zlib refuses -8 to compress): an agreed 8 must
    # still decode what such a sender makes
    c = zlib.compressobj(9, zlib.DEFLATED, -9)
    data = c.compress(text.encode()) + c.flush(zlib.Z_SYNC_FLUSH)
    got = feed_all(observer("permessage-deflate; client_max_window_bits=8"), "client",
                   client_raw(0x1, data[:-4], rsv=4))
    assert (got[0]["type"], got[0]["size"]) == ("text", len(text))


def test_compressed_fragments_with_a_ping_between_them():
    # wsproto's own reader loses track of compression here (see proxy/websocket.py); its writer is fine
    obs = observer("permessage-deflate")
    p = peer("server", "permessage-deflate")
    wire = (p.send_data("first half, ", fin=False) + p.ping(b"?") + p.send_data("second half", fin=False)
            + p.pong(b"!") + p.send_data(""))
    got = feed_all(obs, "server", bytes(wire))
    assert [m["type"] for m in got] == ["ping", "pong", "text"]
    assert got[2]["preview"] == "first half, second half" and got[2]["compressed"] and got[2]["frames"] == 3


def test_deflate_message_ending_with_a_final_block():
    # RFC 7692 §7.2.3.3: a sender may end each message with BFINAL set (a fresh stream per message)
    obs = observer("permessage-deflate")
    got = []
    for text in (b"final block one", b"final block two"):
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        got += feed_all(obs, "server", raw(0x1, c.compress(text) + c.flush(), rsv=4))
    assert [m["preview"] for m in got] == ["final block one", "final block two"]


def test_uncompressed_message_on_a_deflate_connection():
    obs = observer("permessage-deflate")
    [m] = feed_all(obs, "client", client_raw(0x1, b"plain"))
    assert (m["preview"], m["compressed"]) == ("plain", False)


def test_decompression_bomb_is_an_error_and_memory_stays_bounded():
    obs = observer("permessage-deflate", max_message=1 << 20, preview_limit=16)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = c.compress(b"\x00" * (64 << 20)) + c.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 100_000
    got = feed_all(obs, "server", raw(0x2, bomb[:-4], rsv=4))
    assert [m["type"] for m in got] == ["error"] and "max_message" in got[0]["error"]
    # right at the limit is fine
    obs = observer("permessage-deflate", max_message=1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = c.compress(b"\x00" * (1 << 20)) + c.flush(zlib.Z_SYNC_FLUSH)
    [m] = feed_all(obs, "server", raw(0x2, data[:-4], rsv=4))
    assert (m["type"], m["size"], m["truncated"]) == ("binary", 1 << 20, True)


def test_large_uncompressed_message_is_counted_not_buffered():
    obs = observer(preview_limit=10, max_message=1000)
    p = peer("client")
    wire = bytes(p.send_data(b"y" * 5_000_000))
    side = obs._sides["client"]
    got = []
    for i in range(0, len(wire), 65536):
        got += obs.feed("client", wire[i:i + 65536])
        assert side.msg is None or len(side.msg.head) <= 10
    [m] = got
    assert (m.type, m.size, m.truncated, m.preview) == ("binary", 5_000_000, True, "eXl5eXl5eXl5eQ==")


# --- close codes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000,
                                  3999, 4000, 4999])
def test_valid_close_codes(code):
    obs = observer()
    [m] = feed_all(obs, "server", raw(0x8, struct.pack("!H", code) + "fermé".encode()))
    assert (m["type"], m["close_code"], m["close_reason"]) == ("close", code, "fermé")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_invalid_close_codes(code):
    [m] = feed_all(observer(), "server", raw(0x8, struct.pack("!H", code)))
    assert m["type"] == "error" and f"invalid code {code}" in m["error"]


def test_close_handshake_record():
    obs = observer()
    feed_all(obs, "client", bytes(peer("client").close(1000, "done")))
    assert obs.to_dict()["close"] == {"code": 1000, "reason": "done", "by": "client", "answered": False,
                                      "time": 1234.5}
    feed_all(obs, "server", bytes(peer("server").close(1000, "done")))
    assert obs.to_dict()["close"]["answered"] is True and obs.to_dict()["close"]["by"] == "client"


# --- protocol violations ---------------------------------------------------------------------------

VIOLATIONS = {
    "reserved opcode 0x3": ("server", raw(0x3, b"x")),
    "reserved opcode 0xb": ("server", raw(0xB)),
    "unmasked frame from the client": ("client", raw(0x1, b"x")),
    "masked frame from the server": ("server", raw(0x1, b"x", key=KEY)),
    "RSV1 set without a negotiated extension": ("server", raw(0x1, b"x", rsv=4)),
    "RSV2/RSV3 set": ("server", raw(0x1, b"x", rsv=2)),
    "RSV2/RSV3 set ": ("server", raw(0x1, b"x", rsv=1)),
    "control frame (ping) with a payload over 125 bytes": ("server", raw(0x9, b"p" * 126)),
    "fragmented control frame (pong)": ("server", raw(0xA, b"x", fin=False)),
    "continuation frame with no message in progress": ("server", raw(0x0, b"x")),
    "new binary message inside a fragmented message": ("server", raw(0x1, b"a", fin=False) + raw(0x2, b"b")),
    "invalid UTF-8 in a text message": ("server", raw(0x1, b"ok \xff")),
    "invalid UTF-8 in a text message ": ("client", client_raw(0x1, b"\xed\xa0\x80")),  # a surrogate
    "text message ends inside a UTF-8 sequence": ("server", raw(0x1, b"caf\xc3")),
    "16-bit length for a 5-byte payload": ("server", raw(0x2, b"12345", length16=True)),
    "64-bit length for a 300-byte payload": ("server", raw(0x2, b"x" * 300, length64=True)),
    "64-bit length with the most significant bit set": ("server", raw(0x2, b"", length=1 << 63)),
    "close frame with a 1-byte payload": ("server", raw(0x8, b"\x03")),
    "close frame reason is not UTF-8": ("server", raw(0x8, b"\x03\xe8\xff")),
    "bytes after the close frame": ("server", raw(0x8, b"\x03\xe8") + raw(0x1, b"late")),
}


@pytest.mark.parametrize("reason", list(VIOLATIONS))
def test_each_violation_is_one_error_message_and_parsing_stops(reason):
    direction, wire = VIOLATIONS[reason]
    obs = observer()
    got = feed_all(obs, direction, wire)
    assert got[-1]["type"] == "error" and reason.strip() in got[-1]["error"], got
    assert all(m["type"] != "error" for m in got[:-1])
    assert got[-1]["direction"] == direction and got[-1]["time"] == 1234.5
    # that direction is no longer parsed, even when valid frames follow; the other one still is
    again = peer(direction).send_data("fine")
    assert obs.feed(direction, bytes(again)) == [] and obs.feed(direction, b"\x81\x00") == []
    other = "server" if direction == "client" else "client"
    assert [m.type for m in obs.feed(other, bytes(peer(other).send_data("ok")))] == ["text"]


@pytest.mark.parametrize("wire, reason", [
    (raw(0x9, b"x", rsv=4), "RSV1 (compressed) set on a control frame"),
    (raw(0x1, b"x", rsv=4, fin=False) + raw(0x0, b"y", rsv=4), "RSV1 (compressed) set on a continuation frame"),
    (raw(0x1, b"\xff\xff\xff\xff", rsv=4), "corrupt permessage-deflate data"),
    (raw(0x1, zlib.compress(b"x")[2:], rsv=4), "compressed data after the final deflate block"),
])
def test_deflate_violations(wire, reason):
    got = feed_all(observer("permessage-deflate"), "server", wire)
    assert got[-1]["type"] == "error" and reason in got[-1]["error"], got


def test_error_says_where():
    obs = observer()
    ok = raw(0x1, b"fine")
    [m, err] = feed_all(obs, "server", ok + raw(0x4))
    assert f"frame at byte {len(ok)} of the server's stream" in err["error"]
    assert (err["size"], err["wire_size"], err["preview"]) == (0, 0, "")


def test_end_of_stream_inside_a_frame_or_message():
    obs = observer()
    feed_all(obs, "server", raw(0x1, b"hello")[:4])
    [m] = dicts(obs.feed_eof("server"))
    assert m["type"] == "error" and "ended inside a frame" in m["error"]
    feed_all(obs, "client", client_raw(0x1, b"part", fin=False))
    [m] = dicts(obs.feed_eof("client"))
    assert "ended inside a fragmented message" in m["error"]
    clean = observer()
    feed_all(clean, "server", raw(0x1, b"whole"))
    assert clean.feed_eof("server") == [] and clean.feed_eof("client") == []


def test_unknown_direction_and_odd_input_never_raise():
    obs = observer()
    assert obs.feed("sideways", b"\x81\x00") == [] and obs.feed_eof("sideways") == []
    assert obs.feed("server", b"") == []
    assert [m.type for m in obs.feed("server", bytearray(raw(0x1, b"ba")))] == ["text"]
    assert [m.type for m in obs.feed("server", memoryview(raw(0x1, b"mv")))] == ["text"]


def test_unknown_extension_tolerates_its_rsv_bits():
    obs = observer("x-custom-ext; level=3")
    [m] = feed_all(obs, "server", raw(0x1, b"\xffopaque", rsv=2))
    assert m["type"] == "text" and not m["compressed"] and m["preview"] == "\ufffdopaque"


# --- the record and the extension header ------------------------------------------------------------


def test_record_is_bounded_and_json_ready():
    obs = observer(max_logged=3)
    p = peer("client")
    for i in range(5):
        obs.feed("client", bytes(p.send_data(f"m{i}")))
    obs.feed("client", bytes(p.close(1000, "bye")))
    rec = obs.to_dict()
    assert [m["preview"] for m in rec["messages"]] == ["m0", "m1", "m2"] and rec["messages_dropped"] == 3
    assert rec["close"]["code"] == 1000  # the close is recorded even when its message is dropped
    assert rec["extensions"] is None and rec["subprotocol"] is None
    json.dumps(rec)


def test_record_names_extensions_and_subprotocol():
    obs = WebSocketObserver([], [(b"Sec-WebSocket-Extensions", b"permessage-deflate; server_no_context_takeover"),
                                 ("Sec-WebSocket-Protocol", "chat.v2")])
    rec = obs.to_dict()
    assert rec["extensions"] == "permessage-deflate; server_no_context_takeover"
    assert rec["subprotocol"] == "chat.v2"
    assert obs.deflate == DeflateParams(server_no_context_takeover=True)


def test_extension_header_parsing():
    assert negotiated_extensions('permessage-deflate; client_max_window_bits="10"; Server_No_Context_Takeover, '
                                 'x-foo; a="b,c;d"') == [
        ("permessage-deflate", {"client_max_window_bits": "10", "server_no_context_takeover": None}),
        ("x-foo", {"a": "b,c;d"})]
    assert negotiated_extensions("") == [] and negotiated_extensions(" , ;") == []
    # out-of-range window bits fall back to 15 (the endpoints refuse such an agreement anyway)
    assert DeflateParams.from_params({"server_max_window_bits": "99", "client_max_window_bits": "x"}) == DeflateParams()


def test_summary_line_is_printable():
    obs = observer()
    [m] = obs.feed("server", raw(0x1, "evil \x1b[31m red\u202e".encode()))
    line = m.summary(80)
    assert "\x1b" not in line and "\u202e" not in line and line.startswith("<- ws text")
    [c] = obs.feed("client", client_raw(0x8, b"\x03\xe8bye"))
    assert c.summary() == "-> ws close 5 B 1000 bye"


# --- any split, any bytes ----------------------------------------------------------------------------


def _conversation() -> tuple[str, bytes, bytes]:
    agreed = "permessage-deflate; client_no_context_takeover"
    c, s = peer("client", agreed), peer("server", agreed)
    client = (c.send_data("hello " * 30) + c.send_data(b"\x00" * 300, fin=False) + c.ping(b"p")
              + c.send_data(b"\x01" * 70000) + c.send_data("é" * 40) + c.close(1000, "bye"))
    server = (s.send_data("hello " * 30) + s.send_data("hello " * 30) + s.pong(b"p") + s.send_data("ü", fin=False)
              + s.send_data("ü") + s.close(1000, "bye"))
    return agreed, bytes(client), bytes(server) + raw(0x1, b"trailing")  # ends with a violation


def test_any_split_gives_the_same_messages():
    agreed, client, server = _conversation()
    whole = observer(agreed)
    expected = {d: feed_all(whole, d, data) for d, data in (("client", client), ("server", server))}
    assert [m["type"] for m in expected["server"]][-2:] == ["close", "error"]
    for direction, data in (("client", client), ("server", server)):
        step = 1 if len(data) < 2000 else 97  # every boundary of the small stream; many of the big one
        for cut in range(0, len(data) + 1, step):
            obs = observer(agreed)
            got = feed_all(obs, direction, data[:cut]) + feed_all(obs, direction, data[cut:])
            assert got == expected[direction], f"split at {cut}"
        obs = observer(agreed)
        got = []
        for i in range(len(data)):
            got += feed_all(obs, direction, data[i:i + 1])
        assert got == expected[direction], "byte by byte"


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=8), direction=st.sampled_from(["client", "server"]),
       ext=st.sampled_from([None, "permessage-deflate", "permessage-deflate; server_no_context_takeover", "x-y"]))
def test_arbitrary_bytes_never_raise(chunks, direction, ext):
    obs = observer(ext, preview_limit=8, max_message=4096)
    for chunk in chunks:
        for m in obs.feed(direction, chunk):
            assert m.direction == direction
            json.dumps(m.to_dict())
            m.summary()
    obs.feed_eof(direction)
    json.dumps(obs.to_dict())
    # after an error nothing more comes from that direction
    types = [m["type"] for m in obs.to_dict()["messages"]]
    assert "error" not in types[:-1]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), direction=st.sampled_from(["client", "server"]),
       ext=st.sampled_from([None, "permessage-deflate", "permessage-deflate; client_no_context_takeover; "
                                                        "server_no_context_takeover"]))
def test_mutated_frames_never_raise(data, direction, ext):
    p = peer(direction, ext)
    wire = bytearray()
    for item in data.draw(st.lists(st.one_of(st.text(max_size=50), st.binary(max_size=200)), min_size=1, max_size=5)):
        wire += p.send_data(item)
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    obs = observer(ext, max_message=1 << 16)
    obs.feed(direction, bytes(wire[:cut]))
    obs.feed(direction, bytes(wire[cut:]))
    obs.feed_eof(direction)
    json.dumps(obs.to_dict())


@settings(max_examples=150, deadline=None)
@given(messages=st.lists(st.tuples(st.one_of(st.text(max_size=300), st.binary(max_size=300)), st.integers(1, 4)),
                         min_size=1, max_size=6),
       direction=st.sampled_from(["client", "server"]),
       ext=st.sampled_from([None, "permessage-deflate", "permessage-deflate; client_no_context_takeover; "
                                                        "server_no_context_takeover"]))
def test_what_wsproto_sends_is_what_the_observer_reports(messages, direction, ext):
    p = peer(direction, ext)
    wire = bytearray()
    for payload, pieces in messages:  # each message in up to 4 fragments, a ping after the first
        step = max(1, -(-len(payload) // pieces))
        parts = [payload[i:i + step] for i in range(0, len(payload), step)] or [payload]
        for i, part in enumerate(parts):
            wire += p.send_data(part, fin=i == len(parts) - 1)
            if i == 0 and len(parts) > 1:
                wire += p.ping(b"between")
    obs = observer(ext, preview_limit=1000)
    got = [m for m in obs.feed(direction, bytes(wire)) if m.type != "ping"]
    assert [(m.type, m.size) for m in got] == [
        ("text" if isinstance(x, str) else "binary", len(x.encode() if isinstance(x, str) else x)) for x, _ in messages]
    for m, (x, _) in zip(got, messages):
        assert m.preview == (x if isinstance(x, str) else base64.b64encode(x).decode())


def test_data_in_a_later_fragment_after_the_final_deflate_block():
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    first = c.compress(b"done") + c.flush()  # BFINAL: the message's deflate stream is over
    got = feed_all(observer("permessage-deflate"), "server", raw(0x1, first, rsv=4, fin=False) + raw(0x0, b"more"))
    assert got[-1]["type"] == "error" and "after the final deflate block" in got[-1]["error"]


def test_a_bug_in_the_parser_is_reported_not_raised(monkeypatch):
    import proxy.websocket as ws

    def broken(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(ws, "_unmask", broken)
    obs = observer()
    [m] = feed_all(obs, "client", client_raw(0x1, b"x"))
    assert m["type"] == "error" and "internal error" in m["error"] and "RuntimeError: boom" in m["error"]
    assert obs.feed("client", client_raw(0x1, b"x")) == []


def test_summary_of_binary_and_errors():
    obs = observer(preview_limit=4)
    [b] = obs.feed("server", raw(0x2, b"\x00\x01\x02\x03\x04\x05"))
    assert b.summary() == "<- ws binary 6 B base64:AAECAw==…"
    [e] = obs.feed("server", raw(0x3))
    assert e.summary().startswith("<- ws error: reserved opcode 0x3")


@pytest.mark.parametrize("n", [0, 1, 5, 512, 513, 4099])
def test_unmask_matches_the_rfc_definition(n):
    from proxy.websocket import _unmask

    data, key = os.urandom(n), b"\x01\x80\xff\x37"
    for offset in range(5):  # §5.3: octet i of the payload XOR octet (i mod 4) of the key
        assert _unmask(data, key, offset) == bytes(b ^ key[(i + offset) % 4] for i, b in enumerate(data))


def test_long_masked_text_split_anywhere():
    text = ("ünïcödé text, " * 8000)[:100_000]
    wire = bytes(peer("client").send_data(text))
    for cut in (1, 2, 3, 4, 5, 999, 50_001, len(wire) - 1):
        obs = observer(preview_limit=200_000)
        got = feed_all(obs, "client", wire[:cut]) + feed_all(obs, "client", wire[cut:])
        assert [(m["preview"], m["size"]) for m in got] == [(text, len(text.encode()))]
