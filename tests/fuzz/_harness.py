"""What the two atheris harnesses share: their command line (main) and keep-going mode.

Keep fuzzing past a crash: with FUZZ_KEEP_GOING=DIR, the first input of each distinct failure is
saved as DIR/crash-<signature hash>-<input sha1> and the run goes on (libFuzzer's -fork mode does not see
atheris's Python exceptions, so it cannot do this). Without the variable the harness is unchanged: any
exception reaches atheris and is a crash."""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
from pathlib import Path

_REPO = str(Path(__file__).resolve().parent.parent.parent)


def signature(e: BaseException) -> str:
    """Exception type, the deepest frame in the repository, and (for broken invariants) its category."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(_REPO)]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    category = getattr(e, "category", "")
    return f"{type(e).__name__}@{where}{'/' + category if category else ''}"


def keep_going(test_one_input):
    out = os.environ.get("FUZZ_KEEP_GOING")
    if not out:
        return test_one_input
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def wrapped(data: bytes) -> None:
        try:
            test_one_input(data)
        except Exception as e:  # noqa: BLE001 - every failure is a finding here
            sig = signature(e)
            if sig in seen:
                return
            seen.add(sig)
            name = f"crash-{hashlib.sha1(sig.encode()).hexdigest()[:10]}-{hashlib.sha1(data).hexdigest()}"
            (directory / name).write_bytes(data)
            print(f"\n=== FUZZ_KEEP_GOING: new failure {sig}: {type(e).__name__}: {str(e)[:300]}\n"
                  f"    input saved as {directory / name}", file=sys.stderr, flush=True)

    return wrapped


def main(test_one_input, seeds) -> None:
    """The harness's command line: `--write-seeds DIR`, or libFuzzer flags and corpus directories."""
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        out = Path(sys.argv[2])
        out.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            (out / name).write_bytes(data)
        return
    import atheris

    atheris.Setup(sys.argv, keep_going(test_one_input))
    atheris.Fuzz()
