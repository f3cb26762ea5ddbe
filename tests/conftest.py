"""Fixtures shared by the test suite.

* ``pki``          (session) the test PKI of tests/pki.py, written once into the pytest tmp dir.
* ``origins``      (session) lazily started TLS origin servers, one per certificate flavour:
                   ``origins["good"]``, ``origins["expired"]`` ... and ``origins["plain"]`` (plain HTTP).
* ``origin``       (function) shorthand for ``origins["good"]``.
* ``token``        (function) a unique string to put in a URL so a test finds its own origin requests.
* ``start_proxy``  (function) factory: ``start_proxy(*extra_args, confdir=None, verbose=True)`` starts the
                   real proxy (``python -m proxy``) and returns a helpers.ProxyProc (.port, .url, .ca_pem,
                   .log_path, .flows(n), .flow(), .stderr_text(), .curl(...), .tunnel(...), .vm_hwm_kib()).
                   At teardown each proxy gets SIGTERM (SIGKILL after a deadline); the test fails if a
                   proxy died during the test or printed a traceback.
* ``proxy``        (function) ``start_proxy()`` with the default arguments.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import ProxyProc  # noqa: E402
from origin import OriginServer  # noqa: E402
from pki import FLAVOURS, Pki, make_pki  # noqa: E402


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.getbasetemp() / "pki")


class OriginPool:
    """Origin servers started on first use and stopped at the end of the session."""

    def __init__(self, pki: Pki):
        self.pki = pki
        self._servers: dict[str, OriginServer] = {}

    def __getitem__(self, flavour: str) -> OriginServer:
        if flavour not in self._servers:
            if flavour == "plain":
                server = OriginServer("plain")
            elif flavour in FLAVOURS:
                leaf = self.pki[flavour]
                server = OriginServer(flavour, leaf.serve, leaf.key)
            else:
                raise KeyError(f"no origin flavour {flavour!r}")
            self._servers[flavour] = server.start()
        return self._servers[flavour]

    def stop_all(self) -> None:
        for s in self._servers.values():
            s.stop()
        self._servers.clear()


@pytest.fixture(scope="session")
def origins(pki):
    pool = OriginPool(pki)
    yield pool
    pool.stop_all()


@pytest.fixture
def origin(origins) -> OriginServer:
    return origins["good"]


@pytest.fixture
def token() -> str:
    return uuid.uuid4().hex[:16]


@pytest.fixture
def start_proxy(pki, tmp_path):
    started: list[ProxyProc] = []

    def start(*extra_args, confdir: Path | None = None, verbose: bool = True, upstream_ca="pki",
              log_file: bool = True, timeout: float = 20) -> ProxyProc:
        ca = pki.root_pem if upstream_ca == "pki" else upstream_ca
        p = ProxyProc(tmp_path / f"proxy{len(started)}", ca, extra_args, confdir=confdir, verbose=verbose,
                      log_file=log_file)
        p.start(timeout)  # raises (with the proxy's stderr) when it does not come up
        started.append(p)
        return p

    yield start
    problems = []
    for p in started:
        problems += p.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def proxy(start_proxy) -> ProxyProc:
    return start_proxy()
