"""httpsdump: a local HTTPS inspection proxy.

The pipeline, and which module owns each step::

    client ──TCP──▶ server.py (accept, track, graceful shutdown)
          ──▶ relay.py: first request: CONNECT host:port (tunnel) or GET http://… (forward proxy)
          ──▶ clienthello.py: peek the TLS ClientHello (SNI, ALPN offer), pure bytes → facts
          ──▶ ca/ (authority, mint, store): a leaf certificate for the SNI, minted once, cached
          ──▶ tls/engine.py in server mode: the client's TLS over memory BIOs (M2Crypto)
              tls/engine.py in client mode: the origin's TLS, verified (chain + set1_host + SNI,
              TLS ≥ 1.2) with the hardened context of tls/contexts.py; started during the client
              handshake, awaited before the first request is forwarded
              (when the client offers h2: the origin's handshake first, offered the client's ALPN
              list; the client is given what the origin selected: ALPN mirroring)
          ──▶ http1.py: sans-IO HTTP/1.1 framing (httptools) on both sides; relay.py streams
              bodies with backpressure, one request at a time per connection
              or, h2 on both sides: http2.py joins two `h2` connections stream by stream (flow
              control end to end), relay_h2.py is its asyncio shell
          ──▶ flow.py records ──▶ sinks/ (console, JSON Lines); decode.py renders bodies for them

Only relay.py, relay_h2.py, streams.py, upstream.py, server.py and cli.py await or touch sockets; everything else is fed bytes
and returns values or events, and is tested that way. Every failure is a ProxyError (errors.py) with
the HTTP status the client gets and the record the log keeps; the core never prints.

accel.py: the modules above that a request runs through are compiled unchanged by Cython when a build
of exactly this source exists (python -m proxy.accel_build; ./dev makes it); otherwise they run as Python.
"""

from . import accel

accel.install()  # the compiled build of the hot modules, when there is one that matches the source
