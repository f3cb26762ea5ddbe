"""Files that hold secrets (traffic log, HAR, key log): opened so that they are private (0600)."""

from __future__ import annotations

import os
import stat

from .errors import ConfigError

__all__ = ["open_private"]


def open_private(path: str, flags: int, what: str) -> tuple[int, os.stat_result]:
    """os.open(path, flags | O_CREAT | O_CLOEXEC) created with mode 0600, and tightened to 0600 when a
    regular file already exists with looser permissions (a FIFO or /dev/stdout is not ours to chmod).
    Returns (fd, fstat); a failure is a ConfigError naming `what`, the path and the OS reason."""
    try:
        fd = os.open(path, flags | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        raise ConfigError(f"cannot open the {what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"cannot make the {what} {path} private (0600): {e.strerror or e}") from None
    return fd, st
