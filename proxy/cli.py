"""Command line: argument parsing, config loading, exit codes. Nothing else.

    httpsdump [--listen-host H] [--listen-port P] [--confdir D] [--upstream-ca FILE]... [--insecure]
              [--log-file PATH] [--config FILE] [-q | -v]
    httpsdump ca path|show|export [--confdir D] [--format pem|der] [-o FILE]
    httpsdump ca trust|untrust (--nss [DB] | --system) [--confdir D]
    httpsdump flows list|show|export|clear ...   (the flow store; see proxy/flowscli.py)

Exit codes: 0 clean exit (also after SIGINT/SIGTERM), 2 bad usage, config or CA (the message names
what is wrong and how to fix it), 3 the listen address cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

from . import accel
from .errors import CAError, ConfigError

__all__ = ["main"]

log = logging.getLogger("httpsdump")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--confdir", help="directory holding the CA (default ~/.httpsdump)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (see config.example.toml)")


def _proxy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="httpsdump",
        description="A local HTTPS inspection proxy: every request and response, decoded, in the clear.",
        epilog="Subcommands: 'httpsdump ca path|show|export' (see 'httpsdump ca --help').",
    )
    p.add_argument("--listen-host", help="address to listen on (default 127.0.0.1; loopback only is safe)")
    p.add_argument("--listen-port", type=int, help="port to listen on (default 8080; 0 = any free port)")
    _common(p)
    p.add_argument("--upstream-ca", action="append", metavar="FILE",
                   help="also trust this CA file when verifying origins (repeatable; adds to the system store)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="DANGEROUS: do not stop on invalid origin certificates (every affected flow is marked)")
    p.add_argument("--no-http2", dest="http2", action="store_false", default=None,
                   help="speak HTTP/1.1 only (h2 is not offered to origins nor selected for clients)")
    p.add_argument("--log-file", metavar="PATH", help="append every flow as one JSON line to PATH (created 0600)")
    p.add_argument("--store", dest="store_path", metavar="PATH",
                   help="flow store (SQLite) path; default <confdir>/flows.sqlite3 (see 'httpsdump flows --help')")
    p.add_argument("--no-store", dest="store", action="store_false", default=None, help="keep no flow store")
    p.add_argument("--har-file", metavar="PATH", help="also write every flow to this HAR 1.2 file (created 0600)")
    p.add_argument("--keylog-file", metavar="PATH",
                   help="append TLS key log lines (NSS format, both sides) for Wireshark; default $SSLKEYLOGFILE")
    p.add_argument("--proxy-auth", metavar="USER:PASS",
                   help="require these Basic proxy credentials from every client (needed to listen beyond loopback)")
    p.add_argument("--allow-any-client", action="store_true", default=None,
                   help="DANGEROUS: listen beyond loopback WITHOUT authentication: anyone who can reach the port "
                        "can use the proxy (clients from public addresses are still refused)")
    p.add_argument("--ignore-hosts", action="append", metavar="PATTERN",
                   help="do not intercept matching hosts: their TLS is tunnelled untouched (glob, e.g. '*.apple.com'; "
                        "repeatable)")
    p.add_argument("--allow-hosts", action="append", metavar="PATTERN",
                   help="intercept only matching hosts; tunnel all others untouched (repeatable)")
    p.add_argument("--upstream-proxy", metavar="URL",
                   help="reach every origin through this HTTP proxy with CONNECT: http://[user:pass@]host:port")
    p.add_argument("--client-cert", action="append", metavar="HOSTPATTERN=FILE",
                   help="present FILE (PEM certificate + key) to origins matching HOSTPATTERN (repeatable)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="serve with N processes on the same port (SO_REUSEPORT); default 1")
    p.add_argument("--redact", action="append", metavar="HEADER",
                   help="replace this header's value in every log, e.g. --redact authorization --redact cookie")
    v = p.add_mutually_exclusive_group()
    v.add_argument("-q", "--quiet", action="store_true", help="print no flows")
    v.add_argument("-v", "--verbose", action="store_true", help="print headers, bodies and TLS facts")
    return p


def _ca_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="httpsdump ca", description="Inspect, export, trust or untrust the local CA certificate.")
    sub = p.add_subparsers(dest="action", required=True)
    for name, text in (("path", "print the CA certificate's path"), ("show", "print the CA's subject, validity, fingerprint"),
                       ("export", "write the CA certificate (never the key)")):
        sp = sub.add_parser(name, help=text)
        _common(sp)
        if name == "export":
            sp.add_argument("--format", choices=("pem", "der"), default="pem")
            sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")
    from ca import trust

    trust.add_parsers(sub, _common)  # trust / untrust --nss [DB] | --system
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"httpsdump: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["ca"]:
            return _run_ca(_ca_parser().parse_args(argv[1:]))
        if argv[:1] == ["flows"]:
            from . import flowscli

            return flowscli.main(argv[1:])
        return _run_proxy(_proxy_parser().parse_args(argv))
    except (ConfigError, CAError) as e:
        return _fail(e.message)
    except KeyboardInterrupt:
        return 0


def _load(args) -> "Config":
    from .config import load_config

    overrides = {"confdir": args.confdir}
    for key in ("listen_host", "listen_port", "log_file", "insecure", "proxy_auth", "allow_any_client", "redact",
                "ignore_hosts", "allow_hosts", "upstream_proxy", "client_cert", "store", "store_path", "har_file", "keylog_file",
                "http2", "workers"):
        overrides[key] = getattr(args, key, None)
    if getattr(args, "quiet", False):
        overrides["verbosity"] = 0
    elif getattr(args, "verbose", False):
        overrides["verbosity"] = 2
    config = load_config(args.config, {k: v for k, v in overrides.items() if v is not None})
    extra_cas = getattr(args, "upstream_ca", None)
    if extra_cas:  # flags add to the config file's list, never replace it
        config = load_config(args.config, {**{k: v for k, v in overrides.items() if v is not None},
                                           "upstream_ca": list(config.upstream_ca) + extra_cas})
    return config


def _run_ca(args) -> int:
    from ca import commands

    config = _load(args)
    confdir = config.confdir_path
    if args.action == "path":
        return commands.cmd_path(confdir, sys.stdout)
    if args.action == "show":
        return commands.cmd_show(confdir, sys.stdout)
    if args.action in ("trust", "untrust"):
        from ca import trust

        return trust.run(args, confdir, sys.stdout)
    return commands.cmd_export(confdir, args.format, args.output, sys.stdout.buffer)


def _run_proxy(args) -> int:
    config = _load(args)
    logging.basicConfig(level=logging.DEBUG if config.verbosity > 1 else logging.INFO,
                        format="httpsdump: %(message)s", stream=sys.stderr)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    from .logproc import LogSpec, start_logger

    # With the flow store or several workers, the outputs (JSONL log, store, HAR file) belong to a
    # logger process (proxy/logproc.py): the store's SQLite work then runs beside the relay, not in
    # its GIL. A single worker with no store writes its JSONL log and HAR file itself: a second
    # process would cost more memory than the plain appends it takes over (measured in bench/).
    # It is forked before the CA and TLS libraries are loaded, so it shares (and copies) less.
    spec = LogSpec.from_config(config)
    use_logger = not spec.empty and (config.workers > 1 or spec.store_path is not None)
    logger = start_logger(spec, config.workers) if use_logger else None
    from ca.authority import load_or_create

    ca = load_or_create(config.confdir_path, key_type=config.ca_key_type)
    logger_failed = 0
    try:
        code = _run_proxy_with(config, ca, spec, logger)
    finally:
        if logger is not None:
            for channel in logger.channels:
                channel.close()  # the logger stops once every channel is closed, after writing all
            logger_failed = logger.wait()
    return code or logger_failed  # 1 when the logger failed: flows may be missing


def _run_proxy_with(config, ca, spec, logger) -> int:
    from .server import ProxyServer, is_loopback
    from .sinks.console import ConsoleSink

    keylog = None
    keylog_path = config.keylog_file or os.environ.get("SSLKEYLOGFILE")
    if keylog_path:
        from .keylog import KeyLog

        keylog = KeyLog(keylog_path)
        log.warning("writing TLS session keys to %s: anyone who reads it can decrypt the captured traffic",
                    keylog.path)
    if config.workers > 1:
        from .workers import run_workers

        return run_workers(config, ca, logger, columns=bool(spec.store_path), keylog=keylog)
    sinks = [ConsoleSink(sys.stdout, config.verbosity)]
    if logger is not None:
        from .logproc import LogChannel

        sinks.append(LogChannel(logger.channels[0], columns=bool(spec.store_path)))
    else:
        if config.log_file:
            from .sinks.jsonl import JsonlSink

            sinks.append(JsonlSink(config.log_file))
        if config.har_file:
            from .har import HarFileSink

            sinks.append(HarFileSink(config.har_file))
    try:
        server = ProxyServer(config, ca, sinks, keylog=keylog)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"cannot load an --upstream-ca file: {e}") from None
    if not is_loopback(config.listen_host):
        log.warning("listening on %s: anyone who can reach this address can use the proxy", config.listen_host)
    if config.insecure:
        log.warning("--insecure: origin certificates are NOT enforced; affected flows are marked insecure")
    try:
        return _run_loop(_serve(server, config), config.event_loop)
    except OSError as e:
        return _fail(f"cannot listen on {config.listen_host}:{config.listen_port}: {e.strerror or e} "
                     "(is another proxy running there? choose another --listen-port)", 3)


def _run_loop(main, choice: str) -> int:
    """uvloop when asked for or, with "auto", when installed: the same asyncio code on a C event loop
    (measured in bench/); the stock loop otherwise."""
    # Start-up objects (modules, CA, contexts) go to the collector's permanent generation, and the
    # young generation is collected less often: the cyclic GC was ~4% of the keep-alive profile,
    # and the relay's per-request objects are freed by reference counting, not by the collector.
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    log.debug("%s", accel.summary())
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError("event_loop = 'uvloop' but uvloop is not installed (pip install uvloop)") from None
        else:
            log.debug("event loop: uvloop %s", uvloop.__version__)
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


async def _serve(server, config) -> int:
    await server.start()
    log.info("listening on %s:%d", config.listen_host, server.port)
    log.info("CA certificate: %s (trust it in your client; see the README)",
             config.confdir_path / "httpsdump-ca.pem")
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # a second signal: leave at once
            os._exit(0)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    log.info("shutting down (%d open connections)", server.open_connections)
    await server.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
