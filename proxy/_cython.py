"""A stand-in for the `cython` module when Cython is not installed: the source then runs as plain
Python, and the few declarations the compiled build uses (proxy/accel.py) mean nothing.

Modules write `try: import cython / except ImportError: from ._cython import cython`; Cython's
compiler reads `import cython` as its own and never sees this file."""

from __future__ import annotations

__all__ = ["cython"]


class _Shadow:
    @staticmethod
    def cclass(cls):
        """@cython.cclass: an extension type when compiled; the class as it is here."""
        return cls

    @staticmethod
    def declare(*_types, **_attrs):
        """cython.declare(type, visibility=...): a typed attribute when compiled; nothing here."""
        return None


cython = _Shadow()
