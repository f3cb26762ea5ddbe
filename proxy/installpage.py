"""The install page: answered by the proxy itself for the magic host ``httpsdump.invalid``.

Why that name: ``.invalid`` is reserved by RFC 6761 §6.4 and never resolves, so a client that is NOT
using httpsdump gets a DNS error for http://httpsdump.invalid/, never somebody else's site; a client
that is using it gets this page, which therefore also proves the proxy is in the path. The page tells
how to trust the local CA on each platform and offers the certificate (never the key) as PEM and DER.

Pure: ``serve()`` maps a request path to (status, reason, headers, body) and touches no socket or
file; ``response_bytes()`` is the same as wire bytes for relay.py. Nothing here can return the CA's
private key: only ``ca.cert_pem`` and ``ca.cert.as_der()`` are ever read.

There is deliberately no PKCS#12 download: httpsdump's certificate work is M2Crypto, which has no
PKCS#12 writer (no PKCS12 module and no pkcs12 functions in M2Crypto.m2 as of 0.51), `cryptography`
is only a test dependency, and shelling out to `openssl pkcs12` per request is not acceptable. Every
platform the page covers imports the PEM or DER certificate, so /cert/p12 answers 404 with that note.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
from urllib.parse import urlsplit

from ca.authority import CA

__all__ = [
    "INSTALL_HOST",
    "ROUTES",
    "is_install_host",
    "path_of",
    "response_bytes",
    "serve",
]

INSTALL_HOST = "httpsdump.invalid"  # RFC 6761 §6.4: never resolves outside the proxy
ROUTES = ("/", "/cert/pem", "/cert/der")
Header = tuple[bytes, bytes]

_STYLE = (
    "body{font:15px/1.5 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2129}"
    "main{max-width:46rem;margin:0 auto;padding:1rem 1.25rem 3rem}"
    "h1{font-size:1.6rem;margin:.5rem 0}h2{font-size:1.1rem;margin:1.6rem 0 .3rem}"
    ".ok{background:#e3f6e8;border-left:4px solid #2e8b57;padding:.5rem .75rem}"
    ".warn{background:#fff4e0;border-left:4px solid #d08700;padding:.5rem .75rem}"
    "code,pre{font:13px/1.45 ui-monospace,monospace;background:#eceef2;border-radius:4px}"
    "code{padding:0 .2rem}pre{padding:.6rem .75rem;overflow-x:auto;white-space:pre-wrap}"
    ".fp{word-break:break-all}a.dl{font-weight:600}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
# No script, no image, no external anything: the only thing the page may use is its own inline style.
_CSP = (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'").encode()

_COMMON: list[Header] = [
    (b"Cache-Control", b"no-store"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
]


@functools.lru_cache(maxsize=1024)  # asked for every request
def is_install_host(host: str) -> bool:
    """True for httpsdump.invalid in any case, with or without a trailing dot or a :port."""
    h = host.strip().lower()
    if h.startswith("["):
        return False
    h = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    return h.rstrip(".") == INSTALL_HOST


def path_of(target: str) -> str:
    """The path of a request target in origin form ("/cert/pem?x") or absolute form
    ("http://httpsdump.invalid/cert/pem"), without query or fragment."""
    if "://" in target[:10]:
        target = urlsplit(target).path or "/"
    return target.split("?", 1)[0].split("#", 1)[0] or "/"


def serve(path: str, ca: CA, *, via_proxy: bool = True,
          method: str = "GET") -> tuple[int, str, list[Header], bytes]:
    """(status, reason, headers, body) for one request to the install host.

    `path` may be origin-form or absolute-form; `via_proxy` is False when the client reached the
    proxy's port directly instead of using it as a proxy (the page then says so). HEAD gets the GET
    headers with an empty body; other methods get 405. Content-Length is always the GET body's length.
    """
    method = method.upper()
    p = path_of(path)
    if p == "/":
        status, reason = 200, "OK"
        body = _page(ca, via_proxy).encode("utf-8")
        headers = [(b"Content-Type", b"text/html; charset=utf-8"), (b"Content-Security-Policy", _CSP)]
    elif p == "/cert/pem":
        status, reason, body = 200, "OK", ca.cert_pem
        headers = [(b"Content-Type", b"application/x-pem-file"),
                   (b"Content-Disposition", b'attachment; filename="httpsdump-ca.pem"')]
    elif p == "/cert/der":
        status, reason, body = 200, "OK", ca.cert.as_der()
        headers = [(b"Content-Type", b"application/x-x509-ca-cert"),
                   (b"Content-Disposition", b'attachment; filename="httpsdump-ca.cer"')]
    elif p == "/cert/p12":
        status, reason = 404, "Not Found"
        body = (b"httpsdump offers no PKCS#12 (.p12) file: M2Crypto, which does all its certificate work, "
                b"cannot write PKCS#12. Every platform imports the CA certificate itself: "
                b"/cert/der (Windows, macOS, Android, iOS) or /cert/pem (Linux, Firefox, curl, Python, Node.js).\n")
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
    else:
        status, reason = 404, "Not Found"
        body = b"httpsdump: no such page here; see / for how to trust the CA (downloads: /cert/pem, /cert/der)\n"
        headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
    if method not in ("GET", "HEAD"):
        status, reason = 405, "Method Not Allowed"
        body = f"httpsdump: {method} is not allowed here; use GET\n".encode()
        headers = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Allow", b"GET, HEAD")]
    headers = [*headers, *_COMMON, (b"Content-Length", str(len(body)).encode())]
    return status, reason, headers, (b"" if method == "HEAD" else body)


def response_bytes(method: str, target: str, ca: CA, *, via_proxy: bool = True, close: bool = False) -> bytes:
    """serve() as a complete HTTP/1.1 response, ready for `client.send()` (adds Connection: close when
    `close`)."""
    from .http1 import serialize_response_head

    status, reason, headers, body = serve(target, ca, via_proxy=via_proxy, method=method)
    if close:
        headers = [*headers, (b"Connection", b"close")]
    return serialize_response_head(status, reason, "1.1", headers) + body


# --- the page ------------------------------------------------------------------------------------


def _page(ca: CA, via_proxy: bool) -> str:
    e = html.escape
    fp = e(ca.fingerprint_sha256)
    subject = e(ca.subject)
    if via_proxy:
        status = '<p class="ok"><strong>This request went through httpsdump.</strong> Your client uses it as its proxy.</p>'
    else:
        status = ('<p class="warn"><strong>This request did not go through httpsdump as a proxy:</strong> you opened '
                  "its listening port directly. Set it as your client's HTTP and HTTPS proxy (below), then open "
                  "<code>http://httpsdump.invalid/</code>.</p>")
    pem_path = '"$(httpsdump ca path)"'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>httpsdump: trust the local CA</title><style>{_STYLE}</style></head>
<body><main>
<h1>httpsdump</h1>
{status}
<p>To see HTTPS traffic in the clear, your client must trust httpsdump's local certificate authority.
Only trust a CA whose private key you control (this one was made by your httpsdump and its key never
leaves the proxy's config directory), and remove it when you are done inspecting.</p>

<h2 id="download">The CA certificate</h2>
<ul>
<li><a class="dl" href="/cert/pem">httpsdump-ca.pem</a> (PEM: Linux, Firefox, curl, Python, Node.js)</li>
<li><a class="dl" href="/cert/der">httpsdump-ca.cer</a> (DER: Windows, macOS, Android, iOS)</li>
</ul>
<p>Subject: <code>{subject}</code><br>SHA-256 fingerprint (compare it with what your device shows, and
with <code>httpsdump ca show</code> on the proxy's machine):</p>
<p class="fp"><code>{fp}</code></p>
<p>There is no PKCS#12 (.p12) download: httpsdump cannot write that format, and every platform below
imports the certificate itself.</p>

<h2 id="linux">Linux: Chromium and Chrome (NSS)</h2>
<pre>httpsdump ca trust --nss</pre>
<p>adds the CA to <code>sql:$HOME/.pki/nssdb</code> (created if missing; needs <code>certutil</code>:
<code>sudo apt-get install libnss3-tools</code>). Restart the browser and start it with
<code>--proxy-server=http://127.0.0.1:8080</code>. Undo: <code>httpsdump ca untrust --nss</code>.</p>

<h2 id="firefox">Firefox</h2>
<p>Settings &rarr; Privacy &amp; Security &rarr; Certificates &rarr; View Certificates &rarr; Authorities &rarr;
Import the PEM file and tick &ldquo;Trust this CA to identify websites&rdquo;. Or, with Firefox closed:
<code>httpsdump ca trust --nss PROFILE_DIR</code> (about:support shows the profile directory). Proxy:
Settings &rarr; Network Settings &rarr; Manual proxy configuration, HTTP proxy <code>127.0.0.1</code> port
<code>8080</code>, &ldquo;Also use this proxy for HTTPS&rdquo;.</p>

<h2 id="debian">Debian and Ubuntu, system-wide</h2>
<pre>sudo httpsdump ca trust --system --confdir ~/.httpsdump</pre>
<p>copies the CA to <code>/usr/local/share/ca-certificates/httpsdump-ca.crt</code> and runs
<code>update-ca-certificates</code>; curl, wget, git, apt and OpenSSL-based programs then trust it
(Python <code>requests</code> uses its own list: see below). Undo:
<code>sudo httpsdump ca untrust --system</code>.</p>

<h2 id="macos">macOS</h2>
<pre>sudo security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain httpsdump-ca.pem</pre>
<p>or open the .cer file, add it to the System keychain, double-click &ldquo;httpsdump CA&rdquo; and set
Trust &rarr; When using this certificate &rarr; Always Trust. Undo:
<code>sudo security delete-certificate -c "httpsdump CA" /Library/Keychains/System.keychain</code>.</p>

<h2 id="windows">Windows</h2>
<p>Open httpsdump-ca.cer &rarr; Install Certificate &rarr; Current User &rarr; Place all certificates in the
following store &rarr; Trusted Root Certification Authorities. Or in a command prompt:
<code>certutil -user -addstore Root httpsdump-ca.cer</code> (for all users, as administrator:
<code>certutil -addstore -f Root httpsdump-ca.cer</code>). Undo:
<code>certutil -user -delstore Root "httpsdump CA"</code>.</p>

<h2 id="android">Android</h2>
<p>Download the .cer file, then Settings &rarr; Security &rarr; More security settings &rarr; Encryption
&amp; credentials &rarr; Install a certificate &rarr; CA certificate (names vary by vendor). Chrome trusts
user-installed CAs; most apps made for Android 7 or later do not, unless their network security
config allows it. Proxy: Wi-Fi network &rarr; Edit &rarr; Proxy &rarr; Manual.</p>

<h2 id="ios">iOS and iPadOS</h2>
<p>Open this page in Safari and tap the .cer link, then Settings &rarr; General &rarr; VPN &amp; Device
Management &rarr; httpsdump CA &rarr; Install. Then turn on full trust: Settings &rarr; General &rarr; About
&rarr; Certificate Trust Settings &rarr; httpsdump CA. Proxy: Settings &rarr; Wi-Fi &rarr; (i) &rarr;
Configure Proxy &rarr; Manual.</p>

<h2 id="cli">Command-line tools and programs (curl, Python, Node.js)</h2>
<pre>export HTTPS_PROXY=http://127.0.0.1:8080 HTTP_PROXY=http://127.0.0.1:8080
export CURL_CA_BUNDLE={pem_path}        # curl
export SSL_CERT_FILE={pem_path}         # Python ssl, urllib, httpx; OpenSSL-based tools
export REQUESTS_CA_BUNDLE={pem_path}    # Python requests
export NODE_EXTRA_CA_CERTS={pem_path}   # Node.js (added to its own list)
export NODE_USE_ENV_PROXY=1             # Node.js 22.21+ / 24.5+: honour HTTPS_PROXY</pre>
<p><code>CURL_CA_BUNDLE</code>, <code>SSL_CERT_FILE</code> and <code>REQUESTS_CA_BUNDLE</code> replace the
default CA list, so every HTTPS connection must then go through httpsdump (<code>NO_PROXY</code> hosts
would fail verification); <code>NODE_EXTRA_CA_CERTS</code> adds to Node.js's list. Run
<code>httpsdump ca path</code> on the proxy's machine; elsewhere, use the downloaded file. <code>127.0.0.1:8080</code> is the default
address: use the one httpsdump printed (&ldquo;listening on &hellip;&rdquo;).</p>

<p><small>Served by httpsdump itself at <code>httpsdump.invalid</code>: the <code>.invalid</code> domain
never resolves (RFC 6761), so without the proxy this address gives a DNS error, never another site.
The CA's private key is never served.</small></p>
</main></body></html>
"""
