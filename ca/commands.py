"""`httpsdump ca path|show|export`: what a user needs to trust the local CA in a browser or a device.

Why these three: `path` for scripts (`curl --cacert "$(httpsdump ca path)"`), `show` to compare the
fingerprint with what a trust store displays, and `export` for the format a platform wants (PEM for
Linux, Firefox and curl; DER for Windows, macOS and Android). They only read: they use `load()`, never
create a CA, and there is deliberately no way to export the private key. Problems are raised as
CAError, which the CLI turns into exit status 2; success returns 0.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, TextIO

from ca.authority import CA_CERT, load
from proxy.errors import CAError

__all__ = ["EXPORT_FORMATS", "cmd_export", "cmd_path", "cmd_show"]

EXPORT_FORMATS = ("pem", "der")


def cmd_path(confdir: Path, out: TextIO) -> int:
    """Print the path of the CA certificate (PEM)."""
    load(confdir)
    out.write(f"{Path(confdir) / CA_CERT}\n")
    return 0


def cmd_show(confdir: Path, out: TextIO) -> int:
    """Print what identifies the CA: names, serial, validity, key type, fingerprint and files."""
    ca = load(confdir)
    rows = [
        ("subject", ca.subject),
        ("issuer", ca.cert.get_issuer().as_text()),
        ("serial", f"{ca.cert.get_serial_number():x}"),
        ("not before", f"{ca.not_before:%Y-%m-%d %H:%M:%S} UTC"),
        ("not after", f"{ca.not_after:%Y-%m-%d %H:%M:%S} UTC"),
        ("key type", ca.key_type),
        ("sha256", ca.fingerprint_sha256),
        ("certificate", str(ca.cert_path)),
        ("certificate (DER)", str(ca.cert_der_path)),
        ("private key", f"{ca.key_path} (keep it private)"),
    ]
    width = max(len(label) for label, _ in rows) + 2
    out.writelines(f"{label + ':':<{width}}{value}\n" for label, value in rows)
    return 0


def cmd_export(confdir: Path, fmt: str, output: str | None, out: BinaryIO) -> int:
    """Write the CA certificate (never the key) as PEM or DER, to the file `output` (mode 0644) or to
    `out` when `output` is None or "-"."""
    if fmt not in EXPORT_FORMATS:
        raise CAError(f"unknown export format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    ca = load(confdir)
    data = ca.cert_pem if fmt == "pem" else ca.cert.as_der()
    if output is None or output == "-":
        out.write(data)
        out.flush()
        return 0
    target = Path(output)
    if target.exists() and target.resolve() == ca.key_path.resolve():
        raise CAError(f"refusing to overwrite the CA key {ca.key_path}: choose another output file")
    _write_file(target, data)
    return 0


def _write_file(target: Path, data: bytes) -> None:
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            if stat.S_ISREG(os.fstat(fd).st_mode):  # not a device such as /dev/stdout
                os.fchmod(fd, 0o644)  # a certificate is public; make the mode exact despite the umask
            f.write(data)
    except OSError as e:
        raise CAError(f"cannot write {target}: {e.strerror}: choose another output file") from e
