"""The dashboard's HTTP server: the page, its script and style, and one SSE stream of events.

Runs in its own threads (stdlib ThreadingHTTPServer), never on the recording path.
Every request must carry the access token (in the URL once, then in an HttpOnly
SameSite=Strict cookie) and a Host header naming this server, so neither another
site in the browser nor a DNS-rebinding page can read it. No CORS headers; a
strict Content-Security-Policy; the page renders event text with textContent only.
"""

from __future__ import annotations

import hmac
import json
import secrets
import socket
import threading
import time
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from oisp.sinks.ui.store import EventStore

DEFAULT_PORT = 7878
MAX_STREAMS = 16  # pages open at once; each holds one thread
BATCH_BYTES = 1024 * 1024  # one SSE message: a JSON array of up to about this many bytes of events
HEALTH_INTERVAL = 1.0
# A page that has caught up gets a batch at most this often: under load it parses a few large batches a second
# rather than one per pump move (the page's work competes for the recorder's CPU), and calls
# still appear well within a second.
PUSH_INTERVAL = 0.25
SOCKET_TIMEOUT = 30.0  # a page that stops reading for this long is disconnected

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}


def allowed_hosts(host: str, port: int) -> set[str]:
    """Host header values this server answers: loopback names, and the bound host if it is another."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    if host not in ("", "0.0.0.0", "::"):
        names.add(f"[{host}]" if ":" in host else host)
    return {f"{name}:{port}".lower() for name in names}


def token_ok(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class UIServer:
    """Serves `store` at http://host:port/. `health()` returns the dict the health panel shows."""

    def __init__(self, store: EventStore, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 health: Callable[[], dict[str, Any]] | None = None, token: str | None = None) -> None:
        self.store = store
        self.host = host
        self.health = health or dict
        self.token = token or secrets.token_urlsafe(24)
        self.counts = {"streams_open": 0, "skipped": 0, "refused_token": 0, "refused_host": 0, "refused_busy": 0}
        self._lock = threading.Lock()
        self._static = {path: resources.files("oisp.sinks.ui").joinpath(name).read_bytes()
                        for path, (name, _) in STATIC.items()}
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
        self._httpd = server_class((host, port), _handler(self))
        self.port = self._httpd.server_address[1]
        self.hosts = allowed_hosts(host, self.port)
        self.cookie = f"oisp_ui_{self.port}"  # cookies ignore the port: two dashboards must not share one
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="oisp-ui-http", daemon=True)

    @property
    def url(self) -> str:
        name = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{f'[{name}]' if ':' in name else name}:{self.port}/?token={self.token}"

    def start(self) -> "UIServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.store.close()  # ends the streams' waits
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def stream_slot(self) -> bool:
        with self._lock:
            if self.counts["streams_open"] >= MAX_STREAMS:
                self.counts["refused_busy"] += 1
                return False
            self.counts["streams_open"] += 1
            return True

    def release_slot(self) -> None:
        with self._lock:
            self.counts["streams_open"] -= 1

    def health_message(self) -> dict[str, Any]:
        try:
            health = dict(self.health())
        except Exception as e:  # noqa: BLE001 - a broken status source must not take the page down
            health = {"error": f"{type(e).__name__}: {e}"}
        with self._lock:
            health["ui"] = {**health.get("ui", {}), **self.counts, "stored": len(self.store),
                            "evicted": self.store.evicted}
        return health


def _handler(ui: UIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "oisp-ui"
        sys_version = ""
        timeout = SOCKET_TIMEOUT

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Silent: the request line carries the token."""

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, *, body: bool) -> None:
            if (self.headers.get("Host") or "").lower() not in ui.hosts:
                ui.count("refused_host")
                return self._plain(403, "wrong Host header\n")
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            from_query = (query.get("token") or [None])[0]  # type: ignore[list-item]  # None: no token given
            if not (token_ok(from_query, ui.token) or token_ok(self._cookie(), ui.token)):
                ui.count("refused_token")
                return self._plain(403, "open the URL oisp printed (it carries the access token)\n")
            if url.path in STATIC:
                return self._static(url.path, body, set_cookie=from_query is not None)
            if url.path == "/api/stream" and body:
                return self._stream(query)
            return self._plain(404, "not found\n")

        def _cookie(self) -> str | None:
            try:
                morsel = SimpleCookie(self.headers.get("Cookie") or "").get(ui.cookie)
            except CookieError:
                return None
            return morsel.value if morsel else None

        def _common_headers(self) -> None:
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")

        def _plain(self, status: int, text: str) -> None:
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self._common_headers()
            self.end_headers()
            self.wfile.write(data)

        def _static(self, path: str, body: bool, *, set_cookie: bool) -> None:
            data = ui._static[path]
            self.send_response(200)
            self.send_header("Content-Type", STATIC[path][1])
            self.send_header("Content-Length", str(len(data)))
            if set_cookie:
                self.send_header("Set-Cookie", f"{ui.cookie}={ui.token}; HttpOnly; SameSite=Strict; Path=/")
            self._common_headers()
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _stream(self, query: dict[str, list[str]]) -> None:
            if not ui.stream_slot():
                return self._plain(503, "too many pages open\n")
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self._common_headers()
                self.end_headers()
                self._pump(_resume_point(self.headers.get("Last-Event-ID"), query))
            except OSError:
                pass  # the page went away or stopped reading
            finally:
                ui.release_slot()

        def _pump(self, seq: int) -> None:
            out = self.wfile
            out.write(b"retry: 1000\n\n")
            next_health = 0.0
            while not ui.store.closed:
                lines, last, skipped = ui.store.since(seq, max_bytes=BATCH_BYTES)
                if skipped:
                    ui.count("skipped", skipped)
                if lines:
                    out.write(b"id: %d\nevent: events\ndata: [%s]\n\n" % (last, b",".join(lines)))
                    seq = last
                now = time.monotonic()
                if now >= next_health:
                    out.write(b"event: health\ndata: %s\n\n" % json.dumps(ui.health_message()).encode())
                    next_health = now + HEALTH_INTERVAL
                out.flush()
                if lines and seq >= ui.store.last_seq:  # caught up: let the next batch gather (a backlog goes at once)
                    time.sleep(PUSH_INTERVAL)
                elif not lines:
                    ui.store.wait(seq, max(0.05, next_health - time.monotonic()))

    return Handler


def _resume_point(last_event_id: str | None, query: dict[str, list[str]]) -> int:
    """A reconnecting EventSource says where it was; a fresh page starts from the oldest event kept."""
    for value in (last_event_id, (query.get("since") or [None])[0]):  # type: ignore[list-item]  # None: none given
        if value and value.isdigit():
            return int(value)
    return 0
