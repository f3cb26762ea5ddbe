"""Body decoding for the log: content codings, caps, truncated prefixes, charsets, rendering."""

from __future__ import annotations

import base64
import gzip
import json
import time
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.decode import DecodeError, decode_content, preview, printable, render_body
from proxy.flow import Message

TEXT = "".join(f"line {i}: héllo wörld — ünïcode ✓\n" for i in range(3000)).encode()


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstandard.ZstdCompressor().compress,
    "identity": lambda b: b,
}


def message(body: bytes = b"", *headers: tuple[bytes, bytes], cap: int = 1 << 20) -> Message:
    m = Message(headers=list(headers))
    m.body.feed(body, cap)
    return m


# --- decode_content -------------------------------------------------------------------------------


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_each_coding(coding):
    assert decode_content(ENCODERS[coding](TEXT), coding, 1 << 24) == TEXT
    assert decode_content(ENCODERS[coding](TEXT), coding.upper(), 1 << 24) == TEXT  # case-insensitive


def test_no_coding_and_empty_list_elements():
    assert decode_content(b"abc", None, 10) == b"abc"
    assert decode_content(b"abc", "", 2) == b"ab"
    assert decode_content(gzip.compress(b"abc"), " , gzip ,, ", 10) == b"abc"  # RFC 9110 §5.6.1.2


def test_raw_deflate_fallback():
    assert decode_content(raw_deflate(TEXT), "deflate", 1 << 24) == TEXT


def test_stacked_codings_are_undone_in_reverse():
    # "gzip, br": gzip was applied first, then br (RFC 9110 §8.4).
    data = brotli.compress(gzip.compress(TEXT))
    assert decode_content(data, "gzip, br", 1 << 24) == TEXT
    with pytest.raises(DecodeError):
        decode_content(data, "br, gzip", 1 << 24)
    data = zstandard.ZstdCompressor().compress(raw_deflate(TEXT))
    assert decode_content(data, "deflate,zstd", 1 << 24) == TEXT


def test_multi_member_gzip():
    assert decode_content(gzip.compress(b"abc") + gzip.compress(b"def"), "gzip", 100) == b"abcdef"
    assert decode_content(gzip.compress(b"abc") + b"\0\0junk", "gzip", 100) == b"abc"  # as browsers do


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_truncated_prefix_gives_a_prefix(coding):
    big = TEXT * 20  # zstd decodes whole blocks (128 KiB), so make several
    encoded = ENCODERS[coding](big)
    out = decode_content(encoded[: len(encoded) // 2], coding, 1 << 24)
    assert 0 < len(out) < len(big)
    assert big.startswith(out)
    assert decode_content(encoded[:3], coding, 100) == b""  # not even a header yet: nothing, no error


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_bomb_is_capped(coding):
    bomb = ENCODERS[coding](bytes(100_000_000))
    assert len(bomb) < 200_000
    t0 = time.perf_counter()
    assert decode_content(bomb, coding, 1 << 20) == bytes(1 << 20)
    assert time.perf_counter() - t0 < 1.0


def test_bomb_inside_a_stack_is_capped():
    bomb = brotli.compress(gzip.compress(bytes(50_000_000)))
    assert decode_content(bomb, "gzip, br", 4096) == bytes(4096)


def test_limit_zero():
    assert decode_content(brotli.compress(TEXT), "br", 0) == b""
    with pytest.raises(DecodeError, match="compress"):
        decode_content(b"x", "compress", 0)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_corrupt_data(coding):
    bad = bytearray(ENCODERS[coding](TEXT))
    bad[0:12] = b"not at all!!"  # destroy the header
    with pytest.raises(DecodeError, match=f"corrupt {coding}"):
        decode_content(bytes(bad), coding, 1 << 24)


def test_unknown_coding():
    with pytest.raises(DecodeError, match="unsupported content-coding 'compress'"):
        decode_content(b"\x1f\x9d", "compress", 100)
    with pytest.raises(DecodeError, match="aes128gcm"):
        decode_content(b"x", "gzip, aes128gcm", 100)


@given(st.binary(max_size=300), st.sampled_from(sorted(ENCODERS)), st.integers(0, 5000))
@settings(max_examples=300)
def test_arbitrary_input_only_raises_decode_error(data, coding, limit):
    try:
        assert len(decode_content(data, coding, limit)) <= limit
    except DecodeError:
        pass


@given(st.binary(max_size=2000), st.sampled_from(["gzip", "deflate", "br", "zstd", "gzip, br"]),
       st.integers(1, 3000))
@settings(max_examples=200)
def test_round_trip_and_prefix_property(data, codings, limit):
    encoded = data
    for c in codings.split(", "):
        encoded = ENCODERS[c](encoded)
    assert decode_content(encoded, codings, limit) == data[:limit]


# --- render_body ----------------------------------------------------------------------------------


def test_empty_body():
    out = render_body(message(b"", (b"Content-Type", b"text/html"), (b"Content-Encoding", b"gzip")))
    assert out == {"size": 0, "captured": 0, "truncated": False, "content_type": "text/html",
                   "content_encoding": "gzip", "decoded_size": None}


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
def test_encoded_json_is_rendered_as_text(coding):
    doc = json.dumps({"ok": True, "name": "Zoë"}).encode()
    out = render_body(message(ENCODERS[coding](doc), (b"content-type", b"application/json"),
                              (b"CONTENT-ENCODING", coding.encode())))
    assert out["text"] == doc.decode() and "base64" not in out
    assert (out["decoded_size"], out["content_encoding"], out["truncated"]) == (len(doc), coding, False)


@pytest.mark.parametrize("charset, text", [
    ("latin-1", "Grüße, café"),
    ("ISO-8859-1", "Grüße, café"),
    ('"utf-8"', "Grüße ✓ 日本"),
    ("Shift_JIS", "こんにちは、世界"),
])
def test_charsets(charset, text):
    data = text.encode(charset.strip('"'))
    out = render_body(message(data, (b"Content-Type", f"text/plain; Charset={charset}".encode())))
    assert out["text"] == text
    assert out["content_type"] == "text/plain"


def test_truncated_multibyte_text_has_no_replacement_at_the_cut():
    data = "こんにちは".encode("shift_jis")  # 2 bytes a character
    out = render_body(message(data, (b"Content-Type", b"text/plain;charset=shift_jis"), cap=5))
    assert (out["text"], out["truncated"], out["size"], out["captured"]) == ("こん", True, 10, 5)


def test_charset_default_bom_and_bad_labels():
    hdr = (b"Content-Type", b"text/html")
    assert render_body(message("é".encode(), hdr))["text"] == "é"  # utf-8 by default
    assert render_body(message(b"\xff\xfeh\x00i\x00", hdr))["text"] == "hi"  # BOM outranks
    assert render_body(message(b"\xe9t\xe9", hdr))["text"] == "\ufffdt\ufffd"  # labelled text stays text
    for bogus in (b"no-such-charset", b"hex", b"rot13"):
        out = render_body(message(b"plain", (b"Content-Type", b"text/plain; charset=" + bogus)))
        assert out["text"] == "plain"


def test_unlabelled_bodies_are_sniffed():
    assert render_body(message("a=1&b=ü\n".encode()))["text"] == "a=1&b=ü\n"
    out = render_body(message(b"MZ\x90\x00\x03\x00", (b"Content-Type", b"application/octet-stream")))
    assert base64.b64decode(out["base64"]) == b"MZ\x90\x00\x03\x00"
    assert out["summary"] == "binary, 6 bytes, application/octet-stream"
    assert "text" not in render_body(message(b"\x1b[31mred"))  # control junk is not text


def test_binary_body():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20
    out = render_body(message(png, (b"Content-Type", b"image/png")))
    assert base64.b64decode(out["base64"]) == png and "text" not in out
    assert out["summary"] == f"binary, {len(png)} bytes, image/png"


def test_decode_error_shows_raw_bytes():
    out = render_body(message(b"definitely not gzip", (b"Content-Type", b"text/plain"),
                              (b"Content-Encoding", b"gzip")))
    assert out["decode_error"].startswith("corrupt gzip")
    assert base64.b64decode(out["base64"]) == b"definitely not gzip"
    assert out["decoded_size"] is None and "text" not in out
    assert out["summary"].startswith("undecodable gzip")


def test_repeated_content_encoding_fields_combine():
    data = brotli.compress(gzip.compress(b"stacked"))
    out = render_body(message(data, (b"Content-Encoding", b"gzip"), (b"content-encoding", b"br")))
    assert (out["text"], out["content_encoding"]) == ("stacked", "gzip, br")


def test_text_limit_cuts_decoded_output():
    out = render_body(message(gzip.compress(TEXT), (b"Content-Type", b"text/plain"),
                              (b"Content-Encoding", b"gzip")), text_limit=100)
    assert out["text"] == TEXT[:100].decode("utf-8", "ignore")
    assert out["truncated"] is True and out["decoded_size"] is None


def test_truncated_capture_of_compressed_body():
    enc = gzip.compress(TEXT * 20)
    out = render_body(message(enc, (b"Content-Type", b"text/plain"), (b"Content-Encoding", b"gzip"),
                              cap=len(enc) // 2))
    assert out["truncated"] is True and out["size"] == len(enc) and out["captured"] == len(enc) // 2
    assert (TEXT * 20).decode().startswith(out["text"]) and len(out["text"]) > 1000


@given(st.binary(max_size=400), st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)),
                                         max_size=4), st.integers(0, 500))
@settings(max_examples=300)
def test_render_never_raises(body, headers, cap):
    extra = [(b"content-type", b"text/plain; charset=utf-16"), (b"content-encoding", b"br")]
    headers += extra[: cap % 3]
    m = message(body, *headers, cap=cap)
    json.dumps(render_body(m, text_limit=300))
    preview(m, 40)


# --- preview and printable ------------------------------------------------------------------------


def test_preview_is_bounded():
    m = message(gzip.compress(TEXT), (b"Content-Type", b"text/plain"), (b"Content-Encoding", b"gzip"))
    lines = preview(m, 20).split("\n")
    assert len(lines) <= 9 and all(len(line) <= 20 for line in lines[:-1])
    assert lines[0] == "line 0: héllo wörld…"
    assert lines[-1].startswith("…")


def test_preview_escapes_terminal_controls():
    out = preview(message(b"\x1b]0;pwned\x07hi\r", (b"Content-Type", b"text/plain")), 80)
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out


def test_preview_of_binary_empty_and_uncaptured():
    assert preview(message(), 80) == ""
    gif = message(bytes(10), (b"Content-Type", b"image/gif"))
    assert preview(gif, 80) == "(binary, 10 bytes, image/gif)"
    assert preview(message(b"abc", cap=0), 80) == "(3 bytes, not captured)"
    assert "corrupt br" in preview(message(b"garbage data here!", (b"Content-Encoding", b"br")), 200)
    assert preview(message(brotli.compress(b""), (b"Content-Encoding", b"br")), 80) == ""


def test_printable():
    assert printable("ok\x1b[2J\x9b\u202egnp.exe\t") == "ok\\x1b[2J\\x9b\\u202egnp.exe\\x09"
    assert printable("日本 ✓") == "日本 ✓"
