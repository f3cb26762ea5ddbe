"""Builds the compiled modules (proxy/accel.py says what they are and how they are loaded).

    python -m proxy.accel_build           compile the modules whose source changed since the last build
    python -m proxy.accel_build --quiet   the same, silent when there is nothing to do (./dev)
    python -m proxy.accel_build --status  which modules run compiled; exit 1 when any does not

Needs Cython, setuptools and a C compiler with the Python headers; without them, or when the
compiler fails, it says so and exits 1, and the proxy runs from source.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from .accel import (DIRECTIVES, MANIFEST, MODULES, ROOT, build_dir, built, module_name, read_manifest, source_digest,
                    status, summary)


def build(quiet: bool = False, modules: tuple[str, ...] = MODULES) -> int:
    """Compile those of `modules` (paths as in MODULES) whose source changed since the last build.
    0 when they are all built."""
    try:
        return _build(quiet, modules)
    except OSError as e:
        print(f"httpsdump: the compiled build failed: {e}; the proxy runs from source", file=sys.stderr)
        return 1


def _build(quiet: bool, modules: tuple[str, ...]) -> int:
    try:
        from Cython.Build import cythonize
        from setuptools import Distribution, Extension
    except ImportError as e:
        print(f"httpsdump: no compiled build: {(e.name or 'Cython').split('.')[0]} is not installed (pip install cython setuptools);"
              " the proxy runs from source", file=sys.stderr)
        return 1
    where = build_dir()
    manifest = read_manifest(where)
    todo = [rel for rel in modules if built(manifest, where, rel) is None]
    if not todo:
        if not quiet:
            print(f"httpsdump: compiled build up to date ({len(modules)} modules in {where})", file=sys.stderr)
        return 0
    print(f"httpsdump: compiling {len(todo)} module(s) with Cython into {where}...", file=sys.stderr)
    where.mkdir(parents=True, exist_ok=True)
    digests = {rel: source_digest(ROOT / rel) for rel in todo}  # before compiling: what the build is of
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with tempfile.TemporaryDirectory(prefix="httpsdump-build-") as tmp:
        exts = [Extension(module_name(rel), [str(ROOT / rel)]) for rel in todo]
        cwd = os.getcwd()
        try:
            os.chdir(tmp)  # setuptools and Cython write relative to the working directory
            exts = cythonize(exts, build_dir=tmp, compiler_directives=DIRECTIVES, quiet=True,
                             nthreads=os.cpu_count() or 1)
            dist = Distribution({"name": "httpsdump-compiled", "ext_modules": exts})
            cmd = dist.get_command_obj("build_ext")
            cmd.build_lib = str(Path(tmp) / "lib")
            cmd.build_temp = str(Path(tmp) / "temp")
            cmd.parallel = os.cpu_count() or 1
            dist.run_command("build_ext")
        except (Exception, SystemExit) as e:  # a compiler error ends in SystemExit from distutils
            print(f"httpsdump: the compiled build failed ({e}); the proxy runs from source", file=sys.stderr)
            return 1
        finally:
            os.chdir(cwd)
        for rel in todo:
            so_rel = rel[: -len(".py")] + suffix
            dest = where / so_rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_dest = dest.with_name(dest.name + ".new")
            shutil.copyfile(Path(tmp) / "lib" / so_rel, tmp_dest)
            os.replace(tmp_dest, dest)  # a running proxy keeps the file it mapped
            manifest[rel] = {"so": so_rel, "sha256": digests[rel]}
    import Cython

    data = {"abi": suffix, "cython": Cython.__version__, "modules": manifest}
    tmp_manifest = where / (MANIFEST + ".new")
    tmp_manifest.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, where / MANIFEST)
    print(f"httpsdump: compiled {len(todo)} module(s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in ([], ["--quiet"]):
        return build(quiet=bool(args))
    if args == ["--status"]:
        print(summary())
        s = status()
        return 0 if s["enabled"] and not s["from_source"] else 1
    print("usage: python -m proxy.accel_build [--quiet | --status]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
