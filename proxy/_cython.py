"""A stand-in for the `cython` module when Cython is not installed: the source then runs as plain
Python, and the few declarations the compiled build uses (proxy/accel.py) mean nothing.

Modules write `try: import cython / except ImportError: from ._cython import cython`; Cython's
compiler reads `import cython` as its own and never sees this file."""

from __future__ import annotations

import dataclasses as _dataclasses

__all__ = ["cython"]


class _Shadow:
    @staticmethod
    def cclass(cls):
        """@cython.cclass: an extension type when compiled; the class as it is here."""
        return cls

    @staticmethod
    def cfunc(f):
        """@cython.cfunc: a function or method only C code calls, when compiled; as it is here."""
        return f

    @staticmethod
    def ccall(f):
        """@cython.ccall: a function or method C code calls directly when compiled; as it is here."""
        return f

    @staticmethod
    def locals(**_types):
        """@cython.locals(name=type): typed local variables when compiled; the function as it is here."""
        return lambda f: f

    @staticmethod
    def declare(*_types, **_attrs):
        """cython.declare(type, visibility=...): a typed attribute when compiled; nothing here."""
        return None


    # C types named in declarations (cython.locals(n=cython.Py_ssize_t)): Python ints here.
    Py_ssize_t = int
    int = int

    # @cython.dataclasses.dataclass over @cython.cclass: a dataclass extension type when compiled; a
    # plain dataclass here (as with Cython's own stand-in, Cython.Shadow, when Cython is installed).
    dataclasses = _dataclasses


cython = _Shadow()
