"""Hardening of the proxy and `oisp record` against faults and hostile clients (issue 11)."""

from __future__ import annotations

import pytest

from oisp.cli import main
from tests.fixed_flows import FixedFlows
from tests.netns import agent_args


@pytest.mark.parametrize("port", ["0", "-1", "65536", "99999", "http"])
def test_record_rejects_a_proxy_port_outside_1_to_65535(port, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["record", "--proxy-port", port])
    assert exit.value.code == 2  # argparse's usage error, before anything is diverted
    assert "--proxy-port" in capsys.readouterr().err


def test_distinct_client_alpn_lists_share_a_handful_of_upstream_contexts():
    """Each upstream context holds the trust store (~840 KiB): one per distinct client ALPN
    list, as any local program can vary it, would grow without bound."""
    import random

    from oisp.proxy.server import TransparentProxy

    proxy = TransparentProxy(flows=FixedFlows(lambda addr, port: None), issuer=None)
    rng = random.Random(11)
    offered_seen = set()
    for _ in range(1000):
        offered = [rng.choice(["h2", "http/1.1"]) if rng.random() < 0.3 else f"x-{rng.getrandbits(32):08x}"
                   for _ in range(rng.randint(1, 5))]
        offered_seen.add(tuple(offered))
        alpn, context = proxy._with_alpn(offered)
        assert alpn == list(dict.fromkeys(p for p in offered if p in ("h2", "http/1.1")))
        assert context is (proxy._with_alpn(alpn)[1] if alpn else proxy.upstream_context)
    assert len(offered_seen) > 900
    assert len(proxy._alpn_contexts) <= 4  # (h2), (http/1.1), (h2, http/1.1), (http/1.1, h2)


# -- the accept loop outlives accept() errors ---------------------------------------------

class _EchoServer:
    """A plain TCP upstream on loopback that echoes what it reads."""

    def __init__(self):
        import socketserver
        import threading

        class Echo(socketserver.BaseRequestHandler):
            def handle(self):
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def low_fd_proxy():
    """The proxy in a subprocess whose open-file limit is 64, in front of an echo server."""
    import subprocess
    import sys
    from pathlib import Path

    echo = _EchoServer()
    agent = Path(__file__).parent / "agents" / "plain_proxy.py"
    argv = agent_args(upstream_host="127.0.0.1", upstream_port=echo.port, nofile=64, give_up=1.5)
    proxy = subprocess.Popen([sys.executable, str(agent), *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = proxy.stdout.readline().split()
        assert ready[:1] == ["ready"], ready
        yield proxy, int(ready[1])
    finally:
        proxy.stdin.close()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        echo.close()


def _stats(proxy) -> dict:
    import json

    proxy.stdin.write("\n")
    proxy.stdin.flush()
    line = proxy.stdout.readline()
    assert line, "the proxy exited"
    return json.loads(line)


def _flood(port: int, n: int = 120) -> list:
    import socket

    flood = []
    for _ in range(n):  # the kernel completes each handshake; they wait in the listen backlog
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"held\n")
        flood.append(sock)
    return flood


def _served(port: int, within: float = 10.0) -> bool:
    """Whether a new connection is relayed to the echo server within `within` seconds.
    Tries again on a reset: while the backlog of closed connections is worked off,
    descriptors may still run short for a moment."""
    import socket
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"ping\n")
                if sock.recv(100) == b"ping\n":
                    return True
        except OSError:  # reset, or no answer in 2 s
            time.sleep(0.1)
    return False


def _until(predicate, timeout: float = 10.0):
    import time

    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_the_proxy_accepts_again_once_descriptors_free_up(low_fd_proxy):
    """Out of descriptors, accept() fails (EMFILE); once connections close, a new one is
    served. (The accept loop used to end at the first error: nothing was accepted again.)"""
    proxy, port = low_fd_proxy
    flood = _flood(port)
    _until(lambda: _stats(proxy)["accept_errors"] > 0)
    for sock in flood:
        sock.close()
    assert _served(port)
    stats = _stats(proxy)
    assert stats["serving"]
    assert stats["accept_errors"] > 0


def test_a_proxy_that_cannot_accept_for_long_says_so(low_fd_proxy):
    """accept() (or the upstream socket) failing for the give-up time (1.5 s here):
    `serving` turns false and on_failure is told; serving again turns it back."""
    proxy, port = low_fd_proxy
    flood = _flood(port)
    _until(lambda: _stats(proxy)["accept_errors"] > 0)
    told = _until(lambda: _stats(proxy)["told"])
    assert len(told) == 1
    assert "no connection served" in told[0]
    assert "Too many open files" in told[0]
    assert _stats(proxy)["serving"] is False
    for sock in flood:
        sock.close()
    assert _served(port)
    _until(lambda: _stats(proxy)["serving"])  # once ACCEPT_RECOVERED has passed without trouble
