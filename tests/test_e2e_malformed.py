"""End to end, hostile or broken clients: raw sockets send what no well-behaved client would. The proxy
answers with the right 4xx, forwards nothing ambiguous, and keeps serving everybody else."""

from __future__ import annotations

import pytest

from helpers import https, raw_exchange, run_curl
from origin import HELLO_BODY


def still_serves(proxy, origin) -> None:
    r = proxy.curl(*https("good.test", origin, "/hello"))
    assert r.rc == 0 and r.out == HELLO_BODY, f"the proxy stopped serving normal requests\n{r}"


@pytest.mark.parametrize("garbage", [b"THIS IS NOT HTTP AT ALL\r\n\r\n", b"GET\r\n\r\n"])
def test_garbage_request_line_gives_400(proxy, origin, garbage):
    resp = raw_exchange(proxy.port, garbage)
    assert resp.status == 400, resp
    still_serves(proxy, origin)


def test_header_block_over_64k_gives_431(proxy, origins, origin, token):
    plain = origins["plain"]
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 8000) for i in range(9))  # ~72 KB, few headers
    req = (f"GET http://127.0.0.1:{plain.port}/hello?t={token} HTTP/1.1\r\nHost: 127.0.0.1:{plain.port}\r\n".encode()
           + filler + b"\r\n")
    assert len(req) > 64 * 1024
    resp = raw_exchange(proxy.port, req)
    assert resp.status == 431, resp
    assert plain.requests_with(token) == []
    still_serves(proxy, origin)


def test_header_block_over_64k_in_tunnel_gives_431(proxy, origin, token):
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 8000) for i in range(9))
    with proxy.tunnel(f"127.0.0.1:{origin.port}", "good.test") as t:
        resp = t.request(f"GET /hello?t={token} HTTP/1.1\r\nHost: good.test\r\n".encode() + filler + b"\r\n")
    assert resp.status == 431, resp
    assert origin.requests_with(token) == []
    still_serves(proxy, origin)


def test_content_length_and_transfer_encoding_in_tunnel_gives_400(proxy, origin, token):
    """Request smuggling: both framings at once must be refused, never forwarded."""
    smuggle = (f"POST /upload?t={token} HTTP/1.1\r\nHost: good.test\r\nContent-Length: 5\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode()
    with proxy.tunnel(f"127.0.0.1:{origin.port}", "good.test") as t:
        assert t.connect.status == 200
        resp = t.request(smuggle, "POST")
    assert resp.status == 400, resp
    assert origin.requests_with(token) == [], "an ambiguous request reached the origin"
    f = proxy.flows(1)[-1]
    assert f["error"] is not None and f["error"]["status"] == 400
    still_serves(proxy, origin)


def test_client_that_distrusts_the_proxy_ca(proxy, pki, origin, token):
    """A client without the proxy's CA refuses the handshake; the proxy logs it and carries on."""
    r = run_curl(*https("good.test", origin, f"/hello?t={token}"), proxy_url=proxy.url, cacert=pki.root_pem)
    assert r.rc == 60, str(r)
    assert origin.requests_with(token) == []
    still_serves(proxy, origin)
