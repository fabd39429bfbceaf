"""Owners are found through the socket inode: among recent owners, else among all
processes newest first; never by psutil's full scan on Linux."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from oisp.redirect.processes import ProcessResolver


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_recent_owner_is_found_through_the_socket_inode():
    server = socket.create_server(("127.0.0.1", 0))
    resolver = ProcessResolver()
    first = socket.create_connection(server.getsockname())
    assert resolver.owner("127.0.0.1", first.getsockname()[1])[0] == os.getpid()
    assert resolver.counts["by_proc_scan"] == 1
    second = socket.create_connection(server.getsockname())
    assert resolver.owner("127.0.0.1", second.getsockname()[1])[0] == os.getpid()
    assert resolver.counts["by_recent_owner"] == 1
    assert resolver.counts["by_proc_scan"] == 1
    # Another process's socket is not pinned on a recent owner: the scan finds the real one.
    child = subprocess.Popen([sys.executable, "-c", "import socket,sys,time; s=socket.create_connection("
                              f"('127.0.0.1',{server.getsockname()[1]})); print(s.getsockname()[1], flush=True); "
                              "time.sleep(5)"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        assert resolver.owner("127.0.0.1", port)[0] == child.pid
        assert resolver.counts["by_proc_scan"] == 2
    finally:
        child.kill()
        child.wait()
    for sock in (first, second, server):
        sock.close()
