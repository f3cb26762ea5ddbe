#!/usr/bin/env python3
"""atheris (libFuzzer) harness for proxy.clienthello.parse.

    python tests/fuzz/fuzz_clienthello.py [libFuzzer flags] CORPUS_DIR [SEED_DIR...]
    python tests/fuzz/fuzz_clienthello.py --write-seeds DIR      # the captures of tests/data, as binaries

A crash is any exception other than NeedMore/NotTLS, or a broken invariant (AssertionError):
- a parsed hello lies within the input, and its own bytes parse to the same hello;
- every prefix shorter than a parsed hello is NeedMore (it is a valid prefix).
tests/fuzz/run.sh runs this for a bounded time; tests/test_fuzz_parsers.py runs it briefly in CI.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

try:
    import atheris
except ImportError:  # the regression tests replay inputs through TestOneInput without it
    atheris = None

import _harness  # noqa: E402  (tests/fuzz is the script's directory)

_seeds_only = len(sys.argv) == 3 and sys.argv[1] == "--write-seeds"
with atheris.instrument_imports() if atheris and not _seeds_only else contextlib.nullcontext():
    from proxy import clienthello

DATA = Path(__file__).resolve().parent.parent / "data"


def outcome(data: bytes):
    try:
        return clienthello.parse(data)
    except (clienthello.NeedMore, clienthello.NotTLS) as e:
        return type(e)


def TestOneInput(data: bytes) -> None:
    got = outcome(data)
    if isinstance(got, type):
        return
    assert 0 < got.length <= len(data), (got, len(data))
    assert outcome(data[:got.length]) == got, "the hello's own bytes parse differently"
    for cut in (got.length - 1, got.length // 2, 5):
        if 0 <= cut < got.length:
            assert outcome(data[:cut]) is clienthello.NeedMore, f"prefix of {cut} bytes of a valid hello refused"


def seeds() -> dict[str, bytes]:
    return {p.stem: bytes.fromhex(p.read_text()) for p in sorted(DATA.glob("clienthello_*.hex"))}


if __name__ == "__main__":
    _harness.main(TestOneInput, seeds)
