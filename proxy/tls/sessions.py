"""TLS session resumption towards origins: the sessions (tickets) an origin gave us, kept per
(context, host name, port, SNI, ALPN offer) and offered on the next connection to it.

Why: a full handshake makes OpenSSL decode and verify the origin's certificate chain again, and in
OpenSSL 3 decoding the certificates' public keys alone cost ~16% of a new proxied connection and the
signature checks another ~16% (callgrind, bench newconn). A resumed handshake proves it is the same
origin that passed verification before (it holds the session's secret), so it skips both, as
browsers and curl do.

What keeps it safe:
- Only sessions of connections whose verification succeeded are kept (`SSL_get_verify_result` is
  0 when the session arrives); with --insecure, a session of a failed verification is never reused.
- The key holds the context (trust store, client certificate), the exact name that was verified
  (set1_host), the port, whether SNI was sent and the ALPN offer: a session is never offered to a
  different name or trust configuration.
- A TLS 1.3 ticket is used once (RFC 8446 §C.4: every connection brings new ones), the newest
  first; a TLS 1.2 session is reused until it expires, as RFC 5246/5077 sessions are meant to be
  (a resumed TLS 1.2 connection usually brings no new one); at most `per_key` are kept per key and
  `max_keys` keys in all (least recently used dropped); OpenSSL ignores expired ones.
- The certificate facts of the original handshake are kept with the key, so a resumed flow's
  record still names the certificate it relies on.

Sibling sessions (first contact with a name): many names are served by one origin with one
certificate (a wildcard, or a CDN's many SANs). RFC 8446 §4.6.1 lets a client resume a TLS 1.3
session under a new SNI "if the new SNI value is valid for the server certificate presented in the
original session". So a name with no session of its own may borrow a TLS 1.3 ticket of another name
of the same *group* — the same context, the same connected address and port, SNI sent, the same
ALPN offer — when X509_check_host says the certificate that session verified is valid for the new
name (the hostname check the full handshake would make; the chain was verified by the same trust
store). The server decides: if it refuses, the handshake is a full one and verifies as usual. Never
for TLS 1.2 sessions (RFC 6066 §3: servers must refuse them under a different name), IP addresses,
or connections through an upstream proxy (the connected address is the proxy's, not the origin's).
`upstream_tls_resumption = false` (config) turns it all off: every connection then verifies in full.
"""

from __future__ import annotations

import collections

from . import openssl_ext

__all__ = ["SessionCache"]


class SessionCache:
    """Owns one reference to every session it holds; free() releases them all."""

    def __init__(self, max_keys: int = 1024, per_key: int = 4, per_group: int = 8) -> None:
        self.max_keys = max_keys
        self.per_key = per_key
        self.per_group = per_group
        self._sessions: collections.OrderedDict[tuple, collections.deque] = collections.OrderedDict()
        self._leaf: dict[tuple, bytes] = {}  # key -> the verified leaf (DER) the sessions rest on
        self._keys: dict[int, tuple] = {}  # live SSL* -> its key (for the new-session callback)
        self._group_of: dict[int, tuple] = {}  # live SSL* -> its group (sibling sessions), if any
        # group -> keys with TLS 1.3 sessions, most recent last (at most per_group; LRU over groups)
        self._groups: collections.OrderedDict[tuple, collections.OrderedDict] = collections.OrderedDict()
        self.offered = 0  # sessions handed to a handshake
        self.borrowed = 0  # of which sibling sessions (another name of the same group)
        self.stored = 0  # sessions received and kept

    def install(self, ctx) -> None:
        """Make `ctx` (an upstream SSL.Context) report its new sessions here."""
        openssl_ext.ctx_set_new_session_cb(ctx, self._on_new)

    def attach(self, ssl_ptr: int, key: tuple, group: tuple | None = None, host: str = "") -> tuple | None:
        """Before the handshake: remember the connection's key, and offer a kept session (each TLS
        1.3 ticket once): the key's own, else a sibling's (see the module docstring: `group` and
        the `host` to check the sibling's certificate for). Returns the key whose session was offered
        (its leaf is the one a resumed handshake relies on), or None."""
        self._keys[ssl_ptr] = key
        if group is not None:
            self._group_of[ssl_ptr] = group
        queue = self._sessions.get(key)
        if queue:
            return key if self._offer(ssl_ptr, key, queue) else None
        if group is None or not host:
            return None
        siblings = self._groups.get(group)
        if not siblings:
            return None
        for other in reversed(siblings):
            queue = self._sessions.get(other)
            if not queue or other == key:
                continue
            session = queue[-1]
            if (openssl_ext.session_version(session) >= openssl_ext.TLS1_3_VERSION
                    and openssl_ext.session_valid_for(session, host)):
                if self._offer(ssl_ptr, other, queue):
                    self.borrowed += 1
                    return other
                return None
        return None

    def _offer(self, ssl_ptr: int, key: tuple, queue: collections.deque) -> bool:
        self._sessions.move_to_end(key)
        session = queue[-1]  # the newest
        ok = openssl_ext.ssl_set_session(ssl_ptr, session)  # the SSL takes its own reference
        if openssl_ext.session_version(session) >= openssl_ext.TLS1_3_VERSION:
            queue.pop()  # a TLS 1.3 ticket: once only
            openssl_ext.session_free(session)
        if ok:
            self.offered += 1
        return ok

    def detach(self, ssl_ptr: int) -> None:
        """The SSL is being freed: later callbacks for its address are not about it."""
        self._keys.pop(ssl_ptr, None)
        self._group_of.pop(ssl_ptr, None)

    def remember_leaf(self, key: tuple, leaf_der: bytes | None) -> None:
        if leaf_der:
            self._leaf[key] = leaf_der

    def leaf(self, key: tuple) -> bytes | None:
        return self._leaf.get(key)

    def _on_new(self, ssl_ptr: int, session: int) -> bool:
        key = self._keys.get(ssl_ptr)
        if key is None or openssl_ext.ssl_verify_result(ssl_ptr) != 0:
            return False  # not a connection we track, or its verification failed (--insecure)
        queue = self._sessions.get(key)
        if queue is None:
            queue = self._sessions[key] = collections.deque()
            while len(self._sessions) > self.max_keys:
                old_key, old = self._sessions.popitem(last=False)
                self._leaf.pop(old_key, None)
                for s in old:
                    openssl_ext.session_free(s)
        else:
            self._sessions.move_to_end(key)
        queue.append(session)
        while len(queue) > self.per_key:
            openssl_ext.session_free(queue.popleft())
        self.stored += 1
        group = self._group_of.get(ssl_ptr)
        if group is not None and openssl_ext.session_version(session) >= openssl_ext.TLS1_3_VERSION:
            siblings = self._groups.get(group)
            if siblings is None:
                siblings = self._groups[group] = collections.OrderedDict()
                while len(self._groups) > self.max_keys:
                    self._groups.popitem(last=False)
            else:
                self._groups.move_to_end(group)
            siblings[key] = None
            siblings.move_to_end(key)
            while len(siblings) > self.per_group:
                siblings.popitem(last=False)
        return True

    def free(self) -> None:
        for queue in self._sessions.values():
            for s in queue:
                openssl_ext.session_free(s)
        self._sessions.clear()
        self._leaf.clear()
        self._groups.clear()

    def __len__(self) -> int:
        return sum(len(q) for q in self._sessions.values())
