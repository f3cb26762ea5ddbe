"""Settings: one frozen dataclass, from defaults < TOML file (--config) < command-line flags.

Every key is validated once, here; a bad key or value raises ConfigError naming the key and why, which
the CLI turns into exit code 2. `config.example.toml` documents the same keys; a test keeps the two in
step.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Config", "load_config", "read_toml", "FIELDS"]


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    confdir: str = "~/.httpsdump"
    upstream_ca: tuple[str, ...] = ()
    insecure: bool = False
    upstream_tls_resumption: bool = True  # resume sessions of verified origins (proxy/tls/sessions.py)
    http2: bool = True  # mirror the client's ALPN offer to the origin; h2 on both sides when both speak it
    log_file: str | None = None
    verbosity: int = 1  # 0 = -q, 1 = one line per flow, 2 = -v
    ca_key_type: str = "ec"
    body_capture_limit: int = 1 << 20
    max_request_line: int = 8192
    max_header_bytes: int = 65536
    max_headers: int = 100
    handshake_timeout: float = 10.0
    header_timeout: float = 30.0
    idle_timeout: float = 120.0
    connect_timeout: float = 10.0
    leaf_cache_size: int = 2048
    proxy_auth: str | None = None  # "user:password": clients must send Proxy-Authorization (Basic)
    allow_any_client: bool = False  # listen beyond loopback without proxy_auth (dangerous)
    allow_public_clients: bool = False  # accept clients from public (global) IP addresses
    max_connections: int = 1000
    max_pipelined: int = 32
    redact: tuple[str, ...] = ()  # header names whose values are replaced in every log
    ignore_hosts: tuple[str, ...] = ()  # glob patterns: tunnel these untouched (no interception)
    allow_hosts: tuple[str, ...] = ()  # glob patterns: when set, intercept only these
    upstream_proxy: str | None = None  # http://[user:pass@]host:port for every origin connection
    client_cert: tuple[str, ...] = ()  # "HOSTPATTERN=FILE.pem" (certificate + key) for mutual TLS
    store: bool = True  # keep flows in the SQLite store (httpsdump flows ...)
    store_path: str | None = None  # default <confdir>/flows.sqlite3
    store_max_flows: int = 100_000
    store_max_bytes: int = 512 << 20
    har_file: str | None = None  # also write a HAR 1.2 file, kept valid after every flow
    keylog_file: str | None = None  # NSS key log for both TLS sides (default: $SSLKEYLOGFILE)
    event_loop: str = "auto"  # "auto" (uvloop when installed), "uvloop" or "asyncio"
    workers: int = 1  # processes accepting on the same port (SO_REUSEPORT); one logger serves them all
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # never set from TOML

    @property
    def confdir_path(self) -> Path:
        return Path(os.path.expanduser(self.confdir))


FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "extra"}


def _check(key: str, value: Any) -> Any:
    """Type- and range-check one setting; return the normalised value."""
    default = FIELDS[key].default

    def fail(why: str) -> ConfigError:
        return ConfigError(f"config key '{key}': {why} (got {value!r})")

    if key in ("redact", "ignore_hosts", "allow_hosts", "client_cert"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
            raise fail("must be a list of strings")
        if key == "client_cert":
            for item in value:
                pattern, sep, path = item.partition("=")
                if not sep or not pattern.strip() or not path.strip():
                    raise ConfigError(f"config key 'client_cert': expected HOSTPATTERN=FILE.pem (got {item!r})")
                if not os.path.isfile(os.path.expanduser(path.strip())):
                    raise ConfigError(f"config key 'client_cert': file not found: {path.strip()}")
            return tuple(value)
        return tuple(v.strip().lower() for v in value)
    if key == "upstream_proxy":
        if value is None:
            return None
        from urllib.parse import urlsplit

        if not isinstance(value, str):
            raise fail("must be a URL like http://[user:pass@]host:port")
        parts = urlsplit(value if "://" in value else "http://" + value)
        try:
            parts.port
        except ValueError:
            raise fail("has an invalid port") from None
        if parts.scheme != "http" or not parts.hostname:
            raise fail("must be a URL like http://[user:pass@]host:port")
        return value
    if key == "proxy_auth":
        if value is None:
            return None
        if not isinstance(value, str) or ":" not in value or not value.split(":", 1)[0]:
            raise ConfigError("config key 'proxy_auth': must be \"user:password\" with a non-empty user")
        return value
    if key == "upstream_ca":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise fail("must be a list of file paths")
        for path in value:
            if not os.path.isfile(os.path.expanduser(path)):
                raise ConfigError(f"config key 'upstream_ca': file not found: {path}")
        return tuple(os.path.expanduser(v) for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise fail("must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("must be an integer")
        if key == "listen_port" and not 0 <= value <= 65535:
            raise fail("must be a port number 0-65535")
        if key == "verbosity" and value not in (0, 1, 2):
            raise fail("must be 0 (quiet), 1 or 2 (verbose)")
        if key != "listen_port" and key != "verbosity" and value <= 0:
            raise fail("must be positive")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise fail("must be a positive number of seconds")
        return float(value)
    # strings (some optional)
    if value is None and key in ("log_file", "store_path", "har_file", "keylog_file"):
        return None
    if not isinstance(value, str) or not value:
        raise fail("must be a non-empty string")
    if key == "event_loop" and value not in ("auto", "uvloop", "asyncio"):
        raise fail("must be 'auto', 'uvloop' or 'asyncio'")
    if key == "ca_key_type" and value not in ("ec", "rsa"):
        raise fail("must be 'ec' or 'rsa'")
    if key == "listen_host":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if value != "localhost":
                raise fail("must be an IP address (or localhost)") from None
    return value


def read_toml(path: str) -> dict[str, Any]:
    """The raw table of a config file; ConfigError when it is missing, unreadable or not TOML."""
    try:
        with open(os.path.expanduser(path), "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None


def load_config(path: str | None, overrides: dict[str, Any]) -> Config:
    """Defaults, then the TOML file at `path` (if any), then `overrides` (flags given explicitly)."""
    values: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path)
        for key, value in data.items():
            if key not in FIELDS:
                raise ConfigError(f"config file {path}: unknown key '{key}' (known keys: {', '.join(FIELDS)})")
            values[key] = _check(key, value)
    for key, value in overrides.items():
        if value is not None:
            values[key] = _check(key, value)
    config = Config(**values)
    _check_exposure(config)
    return config


def _check_exposure(c: Config) -> None:
    """Secure by default: a proxy reachable beyond this machine is an open relay for anyone who finds
    it, and it holds a CA key that can impersonate every site to this user."""
    if c.listen_host in ("localhost",) or ipaddress.ip_address(c.listen_host).is_loopback:
        return
    if c.proxy_auth is None and not c.allow_any_client:
        raise ConfigError(
            f"listening on {c.listen_host} would let anyone who can reach it use the proxy: set --proxy-auth "
            "user:password, or --allow-any-client if the network is trusted (or listen on 127.0.0.1)")
