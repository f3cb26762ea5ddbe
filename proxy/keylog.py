"""--keylog-file / SSLKEYLOGFILE: NSS key log lines for both TLS sides, for Wireshark and ssldump.

Each line ("CLIENT_RANDOM ...", "CLIENT_TRAFFIC_SECRET_0 ...") comes from OpenSSL's keylog callback
(tls/openssl_ext.ctx_set_keylog) during a handshake and is appended with one os.write() to a file
created 0600: whoever reads it can decrypt every captured session.
"""

from __future__ import annotations

import os
import threading

from .files import open_private

__all__ = ["KeyLog"]


class KeyLog:
    def __init__(self, path: str) -> None:
        self.path = os.path.expanduser(path)
        self._fd: int | None = open_private(self.path, os.O_WRONLY | os.O_APPEND, "key log file")[0]
        self._lock = threading.Lock()

    def write(self, line: bytes) -> None:
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line.rstrip(b"\n") + b"\n")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
