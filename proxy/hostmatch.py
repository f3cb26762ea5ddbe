"""Which hosts to inspect: --ignore-hosts / --allow-hosts patterns, and per-host choices such as
--client-cert. Pure.

Pattern syntax: a shell-style glob (`*` any run of characters, `?` one character, `[ab]` a set),
matched case-insensitively against the host name alone AND against "host:port"; so `example.com`,
`*.example.com`, `10.0.0.*` and `*:8443` all do what they say. `*.example.com` does not match
`example.com` itself: list both when you want both.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

__all__ = ["HostPatterns", "HostPolicy"]


class HostPatterns:
    def __init__(self, patterns: tuple[str, ...] | list[str]) -> None:
        self.patterns = tuple(p.strip().lower() for p in patterns if p.strip())
        self._re = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns)) if self.patterns else None

    def match(self, host: str, port: int | None = None) -> bool:
        if self._re is None:
            return False
        h = host.lower().rstrip(".")
        return bool(self._re.match(h) or (port is not None and self._re.match(f"{h}:{port}")))

    def __bool__(self) -> bool:
        return bool(self.patterns)


@dataclass(frozen=True)
class HostPolicy:
    """Intercept a host unless it is ignored, or (with an allow list) unless it is allowed."""

    ignore: HostPatterns = HostPatterns(())
    allow: HostPatterns = HostPatterns(())

    def intercept(self, host: str, port: int | None = None) -> bool:
        if self.allow and not self.allow.match(host, port):
            return False
        return not self.ignore.match(host, port)
