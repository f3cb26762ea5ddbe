"""The one exception hierarchy of httpsdump.

Every failure the proxy can meet is one of these. Each class carries the HTTP status the client gets
(`status`), a short machine-readable `kind` for the log, and which `side` failed. Exceptions from
M2Crypto, httptools and the OS are translated into these at the module that calls them, so the relay
maps errors to responses and log fields in exactly one place (`ProxyError.to_record`).
"""

from __future__ import annotations

import enum

__all__ = [
    "ProxyError",
    "ClientError",
    "BadRequest",
    "HeadersTooLarge",
    "RequestLineTooLong",
    "ClientTLSError",
    "ClientTimeout",
    "ProxyAuthRequired",
    "VersionNotSupported",
    "TooManyPipelined",
    "UpstreamError",
    "UpstreamConnectError",
    "UpstreamTimeout",
    "UpstreamTLSError",
    "CertificateError",
    "CertReason",
    "UpstreamProtocolError",
    "StreamReset",
    "ConfigError",
    "CAError",
]


class ProxyError(Exception):
    """Root of every error httpsdump reports. `str(e)` is a sentence a person can act on."""

    status: int = 502
    kind: str = "proxy"
    side: str = "proxy"
    headers: tuple = ()  # extra response headers the client must get with `status`

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_record(self) -> dict:
        """The error as it appears in a flow record (JSON-ready)."""
        return {"kind": self.kind, "side": self.side, "status": self.status, "message": self.message}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


# --- the client (browser/curl) broke the protocol or went away -----------------------------------


class ClientError(ProxyError):
    status = 400
    kind = "client_protocol"
    side = "client"


class BadRequest(ClientError):
    """Malformed request line or headers, or ambiguous framing (request smuggling)."""


class HeadersTooLarge(ClientError):
    status = 431
    kind = "headers_too_large"


class RequestLineTooLong(ClientError):
    status = 414
    kind = "request_line_too_long"


class ClientTLSError(ClientError):
    """The TLS handshake with the client failed (e.g. it does not trust our CA)."""

    kind = "client_tls"


class ClientTimeout(ClientError):
    status = 408
    kind = "client_timeout"


class ProxyAuthRequired(ClientError):
    """RFC 9110 §11.7.1: the client must (re)send Proxy-Authorization."""

    status = 407
    kind = "proxy_auth"
    headers = ((b"Proxy-Authenticate", b'Basic realm="httpsdump", charset="UTF-8"'),)


class VersionNotSupported(ClientError):
    """RFC 9110 §15.6.6: this proxy speaks HTTP/1.0 and HTTP/1.1 on the wire."""

    status = 505
    kind = "http_version"


class TooManyPipelined(ClientError):
    status = 429
    kind = "too_many_pipelined"


# --- the origin server (or the way to it) failed ------------------------------------------------


class UpstreamError(ProxyError):
    status = 502
    kind = "upstream"
    side = "upstream"


class UpstreamConnectError(UpstreamError):
    kind = "upstream_connect"


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "upstream_timeout"


class UpstreamTLSError(UpstreamError):
    """The TLS handshake with the origin failed for a reason other than its certificate."""

    kind = "upstream_tls"


class CertReason(enum.Enum):
    """Why the origin's certificate was refused, built from OpenSSL's X509_V_ERR_* code (never from
    message text). Values are the words the client sees in the 502 body."""

    EXPIRED = "certificate has expired"
    NOT_YET_VALID = "certificate is not yet valid"
    HOSTNAME_MISMATCH = "hostname mismatch"
    IP_MISMATCH = "IP address mismatch"
    SELF_SIGNED = "self-signed certificate"
    SELF_SIGNED_IN_CHAIN = "self-signed certificate in certificate chain"
    UNKNOWN_ISSUER = "unable to get local issuer certificate"
    UNKNOWN_ISSUER_CERT = "unable to get issuer certificate"
    LEAF_NOT_VERIFIABLE = "unable to verify the first certificate"
    NO_SAN = "certificate has no subjectAltName (CN-only certificates are refused, as browsers do)"
    REVOKED = "certificate revoked"
    INVALID_CA = "invalid CA certificate"
    INVALID_PURPOSE = "certificate not valid for TLS server authentication"
    BAD_SIGNATURE = "certificate signature failure"
    KEY_TOO_SMALL = "certificate key too small"
    OTHER = "certificate verification failed"

    @classmethod
    def from_verify_code(cls, code: int) -> "CertReason":
        return _VERIFY_CODES.get(code, cls.OTHER)


# OpenSSL include/openssl/x509_vfy.h
_VERIFY_CODES = {
    2: CertReason.UNKNOWN_ISSUER_CERT,
    7: CertReason.BAD_SIGNATURE,
    9: CertReason.NOT_YET_VALID,
    10: CertReason.EXPIRED,
    18: CertReason.SELF_SIGNED,
    19: CertReason.SELF_SIGNED_IN_CHAIN,
    20: CertReason.UNKNOWN_ISSUER,
    21: CertReason.LEAF_NOT_VERIFIABLE,
    23: CertReason.REVOKED,
    24: CertReason.INVALID_CA,
    26: CertReason.INVALID_PURPOSE,
    62: CertReason.HOSTNAME_MISMATCH,
    64: CertReason.IP_MISMATCH,
    66: CertReason.KEY_TOO_SMALL,
}


class CertificateError(UpstreamError):
    """The origin's certificate failed verification. `verify_code` is OpenSSL's X509_V_ERR_* value
    (0 when the refusal is our own policy, e.g. NO_SAN)."""

    kind = "upstream_certificate"

    def __init__(self, reason: CertReason, verify_code: int, detail: str = "") -> None:
        message = reason.value + (f": {detail}" if detail else "")
        super().__init__(message)
        self.reason = reason
        self.verify_code = verify_code
        self.detail = detail

    def to_record(self) -> dict:
        rec = super().to_record()
        rec["reason"] = self.reason.name.lower()
        rec["verify_code"] = self.verify_code
        return rec


class UpstreamProtocolError(UpstreamError):
    """The origin sent a response that cannot be relayed unambiguously."""

    kind = "upstream_protocol"


class StreamReset(ProxyError):
    """HTTP/2: a peer reset one stream (RST_STREAM) or refused it (GOAWAY); the reset is passed on to
    the other side with the same error code, and the flow records who reset it and why."""

    kind = "stream_reset"

    def __init__(self, message: str, side: str, code: int) -> None:
        super().__init__(message)
        self.side = side
        self.code = code
        self.status = 502 if side == "upstream" else 400

    def to_record(self) -> dict:
        rec = super().to_record()
        rec["h2_error_code"] = self.code
        return rec


# --- start-up problems (CLI exit code 2) --------------------------------------------------------


class ConfigError(ProxyError):
    """A bad option, config key or value. The message names the key and why; the CLI exits 2."""

    kind = "config"


class CAError(ProxyError):
    """The local CA cannot be loaded or created safely. The message says how to fix it; exit 2."""

    kind = "ca"
