"""The compiled build (proxy/accel.py, proxy/accel_build.py): the suite runs on it, and a build is
used only for the sources it was made from.

The build tests compile the smallest listed module for real (Cython and gcc, a few seconds) from a copy of the
package, into a directory of their own, and look at what a fresh interpreter imports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import proxy.relay
from proxy import accel

REPO_ROOT = Path(__file__).resolve().parent.parent
EXT = sysconfig.get_config_var("EXT_SUFFIX")


def test_the_suite_runs_on_what_the_environment_says():
    """`./dev test` compiles the hot modules first, so the suite tests the build; with HTTPSDUMP_COMPILED=0
    (the second run of .ci/run) it tests the source. Either way every listed module is one or the other."""
    s = accel.status()
    if os.environ.get("HTTPSDUMP_COMPILED") == "0":
        assert not s["enabled"] and s["reason"] == "HTTPSDUMP_COMPILED=0"
        assert proxy.relay.__file__.endswith("relay.py")
    else:
        assert s["enabled"], s["reason"]
        assert s["from_source"] == [], f"edited since the build (./dev test compiles them again): {s['from_source']}"
        assert sorted(s["compiled"]) == sorted(accel.module_name(m) for m in accel.MODULES)
        assert proxy.relay.__file__.endswith("relay" + EXT)


@pytest.fixture()
def package_copy(tmp_path):
    src = tmp_path / "src"
    for pkg in ("proxy", "ca"):
        shutil.copytree(REPO_ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def run(src: Path, build: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("HTTPSDUMP_COMPILED", "PYTHONPATH")}
    environ.update(PYTHONPATH=str(src), HTTPSDUMP_COMPILED_DIR=str(build), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=src, env=environ, capture_output=True, text=True,
                          timeout=300)


# The build tests compile the smallest of the listed modules, and import it with the relay (not built).
SMALL = min((m for m in accel.MODULES if m != "proxy/relay.py"), key=lambda m: (REPO_ROOT / m).stat().st_size)
SMALL_NAME = accel.module_name(SMALL)
IMPORTS = f"""
import importlib, json
import proxy.relay
from proxy import accel
m = importlib.import_module({SMALL_NAME!r})
print(json.dumps({{"small": m.__file__, "relay": proxy.relay.__file__, "status": accel.status(),
                  "summary": accel.summary(), "missing": sorted(n for n in m.__all__ if not hasattr(m, n))}}))
"""
BUILD_ONE = f"import sys; from proxy import accel_build; sys.exit(accel_build.build(modules=({SMALL!r},)))"


def imports(src: Path, build: Path, **env: str) -> dict:
    r = run(src, build, IMPORTS, **env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert out["missing"] == []  # every public name is there, compiled or not
    return out


def test_a_build_is_used_only_for_the_source_it_was_made_from(package_copy, tmp_path):
    build = tmp_path / "build"
    r = run(package_copy, build, BUILD_ONE)
    assert r.returncode == 0, r.stderr
    assert "compiling 1 module(s)" in r.stderr
    manifest = json.loads((build / "manifest.json").read_text())
    assert manifest["abi"] == EXT and set(manifest["modules"]) == {SMALL}
    so = build / (SMALL[: -len(".py")] + EXT)
    assert so.is_file()

    out = imports(package_copy, build)
    assert out["small"] == str(so)
    assert out["relay"] == str(package_copy / "proxy" / "relay.py")  # not in this build: the source
    assert out["status"]["compiled"] == [SMALL_NAME] and "proxy.relay" in out["status"]["from_source"]
    assert out["summary"].startswith(f"compiled build: 1 of {len(accel.MODULES)} modules; from source")

    # Nothing changed: building again compiles nothing.
    r = run(package_copy, build, BUILD_ONE)
    assert r.returncode == 0 and "compiling" not in r.stderr, r.stderr

    # An edited module is imported from its source until it is compiled again.
    src = package_copy / SMALL
    src.write_text(src.read_text() + "\n# edited\n")
    out = imports(package_copy, build)
    assert out["small"] == str(src)
    assert SMALL_NAME in out["status"]["from_source"] and not out["status"]["enabled"]
    assert "does not match these sources" in out["summary"]
    r = run(package_copy, build, BUILD_ONE)
    assert r.returncode == 0 and "compiling 1 module(s)" in r.stderr, r.stderr
    assert imports(package_copy, build)["small"] == str(so)

    # HTTPSDUMP_COMPILED=0: everything from source.
    out = imports(package_copy, build, HTTPSDUMP_COMPILED="0")
    assert out["small"] == str(src) and out["summary"] == "compiled build: off (HTTPSDUMP_COMPILED=0)"


@pytest.mark.parametrize("manifest", ["{", '{"abi": ".cpython-0-other.so", "modules": {}}', "[]"])
def test_an_unreadable_or_foreign_manifest_means_source(package_copy, tmp_path, manifest):
    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_text(manifest)
    out = imports(package_copy, build)
    assert out["small"] == str(package_copy / SMALL) and out["relay"].endswith("relay.py")
    assert out["summary"].startswith("compiled build: off (no compiled build in")


def test_without_cython_the_build_says_so_and_the_proxy_runs_from_source(package_copy, tmp_path):
    build = tmp_path / "build"
    r = run(package_copy, build, "import sys; sys.modules['Cython'] = None\n" + BUILD_ONE)
    assert r.returncode == 1
    assert "no compiled build: Cython is not installed" in r.stderr and "Traceback" not in r.stderr
    assert imports(package_copy, build)["small"] == str(package_copy / SMALL)


def test_status_exits_1_unless_every_module_runs_compiled(package_copy, tmp_path):
    build = tmp_path / "build"
    assert run(package_copy, build, BUILD_ONE).returncode == 0
    r = run(package_copy, build, "import sys; from proxy import accel_build; sys.exit(accel_build.main(['--status']))")
    assert r.returncode == 1 and r.stdout.startswith("compiled build: 1 of ")


def test_the_source_runs_without_cython_installed(package_copy, tmp_path):
    """The HTTP/1 readers are declared for the compiled build with `cython.cclass` (proxy/http1.py); from
    source, where Cython may not be installed at all (a plain `pip install .`, the Docker image), the
    declarations come from proxy/_cython.py and do nothing: the readers are plain classes that parse,
    the records plain dataclasses that render, the ClientHello parser's typed loops plain loops."""
    code = """
import sys; sys.modules['cython'] = None; sys.modules['Cython'] = None
import json
from proxy import http1
rr = http1.RequestReader()
rr.feed(b'GET /a HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')
head = rr.next_event()
resp = http1.ResponseReader('GET')
resp.feed(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok')
events = [type(e).__name__ for e in iter(resp.next_event, None)]
from proxy.decode import render_body
from proxy.flow import Flow, Request, Response, dumps_line
from proxy import clienthello
import ssl
out = ssl.MemoryBIO()
tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out, server_hostname="a.test")
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = clienthello.parse(out.read())  # a real ClientHello, from Python's ssl
flow = Flow(client_addr="c", mode="https", request=Request(method="GET", headers=head.headers),
            response=Response(status=200, headers=[(b"Content-Type", b"text/plain")]))
flow.response.body.feed(b"ok", 10)
record = json.loads(dumps_line(flow.to_dict(decode_body=render_body)))
print(json.dumps({"file": http1.__file__, "shim": type(http1.cython).__module__, "target": head.target,
                  "events": events, "plain": hasattr(rr, "__dict__"), "text": record["response"]["body"]["text"],
                  "headers": record["request"]["headers"], "sni": hello.sni}))
"""
    r = run(package_copy, tmp_path / "none", code, HTTPSDUMP_COMPILED="0")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"file": str(package_copy / "proxy" / "http1.py"), "shim": "proxy._cython", "target": "/a",
                   "events": ["ResponseHead", "Data", "EndOfMessage"], "plain": True, "text": "ok",
                   "headers": [["Host", "x"]], "sni": "a.test"}


def test_compiled_readers_are_extension_types():
    """Compiled, a reader has no instance dict: its attributes are the declared fields (proxy/http1.py)."""
    from proxy import http1

    rr = http1.RequestReader()
    if http1.__file__.endswith(".py"):
        assert hasattr(rr, "__dict__")  # the source: a plain class
        return
    assert not hasattr(rr, "__dict__")
    with pytest.raises(AttributeError):
        rr.undeclared = 1
    rr.upgraded = True  # declared attributes stay readable and writable from Python
    assert rr.upgraded is True


def test_compiled_records_are_extension_types_with_dataclass_manners():
    """The records built per exchange (proxy/flow.py, http1's events, decode's _Look) are Cython
    dataclass extension types when compiled and plain dataclasses from source: either way they compare,
    print and list their fields as dataclasses do, and each gets its own fresh lists and parts."""
    import dataclasses

    from proxy import decode, flow, http1

    a, b = flow.Request(method="GET"), flow.Request(method="GET")
    assert a == b and a.headers is not b.headers and a.body is not b.body and a.trailers is not b.trailers
    assert repr(a).startswith("Request(http_version='1.1', headers=[], body=Body(size=0, ")
    assert flow.Flow("c", "https").id != flow.Flow("c", "https").id
    f = flow.Flow("c", "https")
    assert f.tls is not flow.Flow("c", "https").tls and f.timing.total_ms is None and f.insecure is False
    assert [x.name for x in dataclasses.fields(flow.Response)][-2:] == ["status", "reason"]
    assert http1.EndOfMessage().trailers == [] and http1.EndOfMessage().trailers is not http1.EndOfMessage().trailers
    assert http1.Data(b"x") == http1.Data(b"x") and hash(http1.Data(b"x")) == hash(http1.Data(b"x"))
    with pytest.raises(AttributeError):  # frozen (dataclasses.FrozenInstanceError from source)
        http1.Data(b"x").data = b"y"
    records = [flow.Flow("c", "https"), flow.Request(), flow.Response(), flow.Body(), flow.TlsSide(), flow.TlsInfo(),
               flow.Timing(), http1.EndOfMessage(), http1.Data(b""), decode._look(flow.Response(), 10)]
    if flow.__file__.endswith(".py"):
        assert all(hasattr(r, "__dict__") for r in records)  # the source: plain dataclasses
        return
    assert decode.__file__.endswith(".so") and http1.__file__.endswith(".so")
    for r in records:
        assert not hasattr(r, "__dict__"), type(r)
    with pytest.raises(AttributeError):
        f.undeclared = 1
