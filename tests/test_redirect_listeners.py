"""The redirector reflects only to listening sockets the connected sensor holds
(oisp.redirect.listeners): the /proc/net/tcp parse, the decision, the gate, and the
check against real sockets of this process and of another uid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from types import SimpleNamespace

import pytest

from oisp.redirect.listeners import ListenerGate, Listening, check_listeners, parse_listening, refusal

TABLE = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:20FB 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 5551 1 0000000000000000 100 0 0 10 0
   1: 0100007F:20FB 0200007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 5552 1 0000000000000000 20 4 30 10 -1
   2: 00000000:2CAA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5553 1
   3: garbage
"""


def test_the_table_gives_listening_sockets_only():
    # 0x20FB = 8443, 0x2CAA = 11434; the established row (st 01) and the garbage are left out.
    assert parse_listening(TABLE) == [Listening(8443, 1001, 5551), Listening(11434, 0, 5553)]


def test_every_listener_must_be_the_sensors_and_one_held_by_its_process():
    listening = [Listening(8443, 1001, 5551), Listening(11434, 0, 5553), Listening(9000, 1001, 7000)]
    assert refusal([8443], 1001, 42, listening, {5551}) is None
    assert "nothing listens on port 1234" in refusal([1234], 1001, 42, listening, {5551})
    assert "uid 0" in refusal([11434], 1001, 42, listening, {5553})  # a squatter of another uid got there first
    assert "not held by the sensor's process" in refusal([9000], 1001, 42, listening, {5551})
    # SO_REUSEPORT twins of the sensor's uid: one of them held by the sensor suffices
    twins = [Listening(8443, 1001, 5551), Listening(8443, 1001, 6000)]
    assert refusal([8443], 1001, 42, twins, {5551}) is None
    assert "uid 0" in refusal([8443], 1001, 42, twins + [Listening(8443, 0, 6001)], {5551})


def peer(uid=1001, pid=42):
    return SimpleNamespace(uid=uid, pid=pid)


def test_the_gate_opens_for_one_believed_sensor_and_closes_when_it_goes():
    opened: list[bool] = []
    verdicts = {"why": None}
    gate = ListenerGate({443: 8443, 11434: 40000}, opened.append, check=lambda ports, uid, pid: verdicts["why"])
    a, b = object(), object()
    with pytest.raises(ValueError, match="redirector reflects to 443→8443, 11434→40000"):
        gate.set(a, peer(), {443: 8443})  # not where the redirector reflects
    verdicts["why"] = "port 8443 has a listening socket of uid 0"
    with pytest.raises(ValueError, match="uid 0"):
        gate.set(a, peer(), {443: 8443, 11434: 40000})
    assert opened == [] and gate.owner is None
    verdicts["why"] = None
    gate.set(a, peer(), {443: 8443, 11434: 40000})
    assert opened == [True] and gate.owner is a
    with pytest.raises(ValueError, match="another sensor"):
        gate.set(b, peer(), {443: 8443, 11434: 40000})
    gate.dropped(b)  # not the owner: nothing changes
    assert opened == [True]
    gate.dropped(a)
    assert opened == [True, False] and gate.owner is None
    gate.set(b, peer(), {443: 8443, 11434: 40000})
    gate.set(b, peer(), {})  # a sensor that stops
    assert opened == [True, False, True, False] and gate.counts == {"accepted": 2, "refused": 3, "dropped": 2}


def test_the_check_against_real_sockets():
    """A socket this process listens on is ours; one another process of another uid
    listens on is not; a port nobody listens on is refused."""
    ours = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ours.bind(("::", 0))
    ours.listen()
    try:
        port = ours.getsockname()[1]
        assert check_listeners([port], os.getuid(), os.getpid()) is None
        assert "not the sensor's" in check_listeners([port], os.getuid() + 1, os.getpid())
        assert "not held by the sensor's process" in check_listeners([port], os.getuid(), os.getppid())
    finally:
        ours.close()
    assert "nothing listens" in check_listeners([port], os.getuid(), os.getpid())


@pytest.mark.privileged
def test_a_listener_of_another_user_is_refused(sensor_user):
    """The squatter: a program of another user listening on the port first."""
    squatter = subprocess.Popen(["setpriv", f"--reuid={sensor_user.pw_uid}", f"--regid={sensor_user.pw_gid}",
                                 "--clear-groups", sys.executable, "-c",
                                 "import socket, sys, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\n"
                                 "s.listen()\nprint(s.getsockname()[1], flush=True)\ntime.sleep(30)"],
                                stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        port = int(squatter.stdout.readline())
        assert f"uid {sensor_user.pw_uid}" in check_listeners([port], os.getuid(), os.getpid())
        assert check_listeners([port], sensor_user.pw_uid, squatter.pid) is None
    finally:
        squatter.kill()
        squatter.wait()
