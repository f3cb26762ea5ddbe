"""The compiled build: the modules on the per-request and per-connection paths, compiled by Cython
into C extensions when Cython and a C compiler are at hand. The source is the program; the build only
runs it with less interpreter overhead (bench/README.md, "The compiled build"). What the source adds
for the compiler, all of it meaningless from source (proxy/_cython.py stands in when Cython is not
installed): http1's readers and the ClientHello parser's reader declare their attributes
(`cython.cclass`, `cython.declare`), and the records built per exchange (flow.py's Flow and its parts,
http1's events, decode's _Look, the ClientHello) are Cython dataclasses (`cython.dataclasses.dataclass`
over `cython.cclass`), so that compiled they are extension types, plain classes and dataclasses from
source; a few per-request loops declare their locals' types (`cython.locals`: bytes, C integers,
those extension types).

    python -m proxy.accel_build           compile what changed (./dev and the Dockerfile run it)
    python -m proxy.accel_build --status  which modules run compiled; exit 1 when any does not

The extensions live in the environment, not in the source tree (<sys.prefix>/httpsdump-compiled/),
with a manifest of the SHA-256 of each source they were compiled from. install(), called when the
package is imported, puts a finder in front of the normal import for the modules whose source still
has its recorded digest; an edited module is imported from its source, so a stale build never runs
(`./dev` compiles it again). HTTPSDUMP_COMPILED=0 runs everything from source; HTTPSDUMP_COMPILED_DIR
puts the build elsewhere (the benchmark and the tests keep their own).

Annotations stay documentation (Cython's annotation_typing off: a `dict` parameter given a list is not
an error, as in Python), and functions keep Python's introspection (binding).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
from pathlib import Path

# The modules a proxied HTTP/1 request or a new connection spends its time in (relative to the package's
# parent). Each compiled module adds ~170 KiB of resident memory (its code, mapped); compiling the other
# modules those paths touch (errors, contexts, sessions, the console sink...) and the HTTP/2 and
# WebSocket relays as well, 20 in all, took under 0.5 % more off those paths for 1.4 MiB more memory
# (bench/README.md, "The compiled build").
MODULES = (
    "proxy/relay.py", "proxy/http1.py", "proxy/streams.py", "proxy/flow.py", "proxy/decode.py",
    "proxy/server.py", "proxy/upstream.py", "proxy/clienthello.py", "proxy/sinks/jsonl.py", "proxy/tls/engine.py",
)
DIRECTIVES = {"language_level": 3, "binding": True, "annotation_typing": False}
ROOT = Path(__file__).resolve().parent.parent  # the directory holding the proxy package
MANIFEST = "manifest.json"

_state: dict = {"enabled": False, "compiled": [], "from_source": [], "reason": "install() not run"}


def build_dir() -> Path:
    return Path(os.environ.get("HTTPSDUMP_COMPILED_DIR") or Path(sys.prefix) / "httpsdump-compiled")


def module_name(rel: str) -> str:
    return rel[: -len(".py")].replace("/", ".")


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(where: Path) -> dict:
    try:
        with open(where / MANIFEST, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("abi") != sysconfig.get_config_var("EXT_SUFFIX"):
        return {}  # made by another interpreter
    mods = data.get("modules")
    return mods if isinstance(mods, dict) else {}


def built(manifest: dict, where: Path, rel: str) -> Path | None:
    """The compiled file of module `rel` in the build at `where` (its `manifest`), if there is one and it
    was made from the source as it is now; else None."""
    entry = manifest.get(rel)
    if not isinstance(entry, dict) or "so" not in entry:
        return None
    so = where / entry["so"]
    try:
        return so if so.is_file() and entry.get("sha256") == source_digest(ROOT / rel) else None
    except OSError:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the listed modules in the compiled build; every other name is left to the normal import."""

    def __init__(self, builds: dict[str, str]) -> None:
        self.builds = builds

    def find_spec(self, fullname, path=None, target=None):
        so = self.builds.get(fullname)
        if so is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, so)
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)


def install() -> None:
    """Route imports of the compiled modules whose source is unchanged to their build (once)."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if os.environ.get("HTTPSDUMP_COMPILED", "1") == "0":
        _state.update(reason="HTTPSDUMP_COMPILED=0")
        return
    where = build_dir()
    manifest = read_manifest(where)
    if not manifest:
        _state.update(reason=f"no compiled build in {where} (python -m proxy.accel_build)")
        return
    builds: dict[str, str] = {}
    from_source: list[str] = []  # edited since the build, or not in it
    for rel in MODULES:
        so = built(manifest, where, rel)
        if so is not None:
            builds[module_name(rel)] = str(so)
        else:
            from_source.append(module_name(rel))
    _state.update(enabled=bool(builds), compiled=sorted(builds), from_source=from_source,
                  reason="" if builds else f"the build in {where} does not match these sources")
    if builds:
        sys.meta_path.insert(0, _Finder(builds))


def status() -> dict:
    """What install() found: {"enabled", "compiled": [module names], "from_source": [module names], "reason"}."""
    return dict(_state)


def summary() -> str:
    """One line for the log: how many of the modules run compiled, and why the others do not."""
    s = _state
    if not s["enabled"]:
        return f"compiled build: off ({s['reason']})"
    line = f"compiled build: {len(s['compiled'])} of {len(MODULES)} modules"
    if s["from_source"]:
        line += f"; from source (edited since the build, or not built): {', '.join(s['from_source'])}"
    return line
