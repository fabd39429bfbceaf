"""Upstream TLS sessions, kept so the proxy's next connection to a server resumes.

Why: every intercepted connection opens its own upstream TLS connection, and a
full handshake there was the proxy's largest single cost per new connection
(the client side of it: 0.72 ms, against 0.21 ms resumed, OpenSSL 3.0 through
MemoryBIOs). A resumed handshake (TLS 1.3 PSK with a fresh key exchange, or a
TLS 1.2 ticket or session id) skips the server's certificate chain, which was
verified when the session was made. Sessions are kept per upstream context
(its trust settings and ALPN list: a session belongs to the context that made
it), server address and SNI, so one is never offered to another name. Servers
that refuse a session simply run a full handshake.

A session is taken from a connection only when the cache has none that worked:
Python's `ssl` copies a TLS 1.3 session through its DER form each time one is
read from or given to a connection (a CPython workaround for an OpenSSL bug),
~0.1-0.2 ms each with the server's certificate chain inside, which would eat
most of the gain. So one session serves until a server no longer accepts it.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict

DEFAULT_LIMIT = 1024


class UpstreamSessions:
    """The newest resumable session per (context, server, SNI); least recently used go first."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        self.limit = limit
        self._sessions: OrderedDict[tuple, ssl.SSLSession] = OrderedDict()

    def get(self, context: ssl.SSLContext, server: tuple[str, int], sni: str | None) -> ssl.SSLSession | None:
        key = (context, server, sni)
        session = self._sessions.get(key)
        if session is not None:
            self._sessions.move_to_end(key)
        return session

    def keep(self, context: ssl.SSLContext, server: tuple[str, int], sni: str | None, tls: ssl.SSLObject) -> None:
        """After a connection: unless it resumed the session kept for it, its own session,
        if a later connection could resume that (TLS 1.3: once the server's ticket is read)."""
        key = (context, server, sni)
        if key in self._sessions and tls.session_reused:
            return  # the kept one still works: no copy needed
        try:
            session = tls.session
            resumable = session is not None and (session.has_ticket or tls.version() not in (None, "TLSv1.3"))
        except (ValueError, ssl.SSLError):
            return
        if not resumable:
            return
        self._sessions[key] = session  # type: ignore[assignment]  # resumable implies a session
        self._sessions.move_to_end(key)
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)
