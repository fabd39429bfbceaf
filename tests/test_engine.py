"""The capture engine on a real divert handle, with real traffic in test namespaces.

Every scenario runs in tests/agents/engine_agent.py inside a namespace the
test creates; the assertions compare what the engine counted with what the
sockets at both ends saw.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import agent_args

AGENT = str(Path(__file__).parent / "agents" / "engine_agent.py")

pytestmark = pytest.mark.privileged


def run(netns, scenario: str, timeout: float = 180, **options) -> dict:
    return json.loads(netns.python(AGENT, *agent_args(scenario, **options), timeout=timeout).stdout)


def assert_adds_up(counters: dict) -> None:
    c = counters
    assert c["received"] == c["sent"] + c["dropped"] + c["consumed"] + c["drained"] + c["held"]


def test_100k_udp_datagrams_pass_through_exactly_once(netns):
    result = run(netns, "udp", count=100_000, policy="block", slots=16)
    counters = result["counters"]
    assert result["delivered"] == result["unique"] == 100_000
    assert counters["received"] == counters["sent"] == 100_000
    assert counters["dropped"] == counters["held"] == 0
    assert counters["kernel"]["dropped"] == counters["kernel"]["queue_full"] == 0
    assert_adds_up(counters)


def test_100mb_tcp_transfer_arrives_intact(netns):
    # An Ethernet-sized MTU: Linux diverts TCP before GSO splits it, so the engine
    # must segment oversized packets on re-injection (counted in "segmented").
    netns.run("ip", "link", "set", "lo", "mtu", "1500")
    result = run(netns, "tcp", megabytes=100)
    counters = result["counters"]
    assert result["server_bytes"] == result["client_bytes"] == 100 * 1024 * 1024
    assert result["server_sha"] == result["client_sha"]
    assert counters["send_errors"] == counters["dropped"] == counters["held"] == 0
    assert counters["segmented"] > 0
    assert counters["kernel"]["too_big"] == 0  # nothing slipped past the handle
    assert_adds_up(counters)


def test_drop_policy_counts_exactly_what_is_missing(netns):
    # 4 slots, and the consumer sleeps 1 s while 25k datagrams/s arrive.
    result = run(netns, "udp", count=20_000, policy="drop", slots=4, stall_at=5000, stall_seconds=1.0)
    counters = result["counters"]
    assert counters["kernel"]["dropped"] == counters["kernel"]["queue_full"] == 0
    assert counters["dropped_overflow"] > 0
    assert counters["dropped_overflow"] == 20_000 - result["delivered"]
    assert result["unique"] == result["delivered"]
    assert counters["held"] == 0
    assert_adds_up(counters)


def test_block_policy_loses_nothing_and_stays_bounded(netns):
    # The consumer stalls 0.5 s; the kernel queue (16384) absorbs the ~12k that arrive.
    result = run(netns, "udp", count=20_000, policy="block", slots=4, stall_at=5000, stall_seconds=0.5)
    counters = result["counters"]
    assert result["delivered"] == result["unique"] == 20_000
    assert counters["dropped"] == 0
    assert counters["ring_high_water"] <= 4  # memory is the preallocated ring, nothing more
    assert_adds_up(counters)


def test_verdicts_drop_and_modify(netns):
    result = run(netns, "verdicts")
    assert result["kept"] == list(range(2, 300, 3))
    assert result["moved"] == list(range(1, 300, 3))  # port rewritten in place, checksums updated
    assert result["counters"]["dropped_verdict"] == 100
    assert result["counters"]["sent"] == 200


def test_async_iteration(netns):
    result = run(netns, "async", count=3000)
    assert result["seen"] == result["delivered"] == 3000
    assert_adds_up(result["counters"])


def test_watchdog_closes_the_handle_when_the_consumer_stalls(netns):
    result = run(netns, "watchdog")
    assert result["held_count"] == 1
    assert result["restored_after"] is not None
    assert result["restored_after"] < 1.0
    assert "closed" in result["error"]


def test_kill_9_of_the_consumer_lets_traffic_flow_within_a_second(netns):
    result = run(netns, "kill9")
    assert result["delivered_before_kill"] > 10  # it really was diverting
    assert result["first_after_kill"] is not None
    assert result["first_after_kill"] < 1.0
    assert result["delivered_after_kill"] > 10


def _run_with_cgroup2(netns, scenario: str, **options) -> dict:
    shell = f"mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec {sys.executable} \"$0\" \"$@\""
    done = subprocess.run(netns.cmd("unshare", "-m", "sh", "-c", shell, AGENT, *agent_args(scenario, **options)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_flow_events_name_the_connecting_child(netns):
    result = _run_with_cgroup2(netns, "events", layer="FLOW")
    mine = [e for e in result["events"] if e["remote_port"] == result["port"]]
    assert {e["event"] for e in mine} == {"FLOW_ESTABLISHED", "FLOW_DELETED"}
    assert all(e["pid"] == result["child"] and e["protocol"] == 6 for e in mine)
    assert all(e["local"] == e["remote"] == "127.0.0.1" for e in mine)


def test_socket_events_name_the_connecting_child(netns):
    result = _run_with_cgroup2(netns, "events", layer="SOCKET")
    connects = [e for e in result["events"] if e["event"] == "SOCKET_CONNECT"]
    assert connects
    assert all(e["pid"] == result["child"] for e in connects)
    assert all(e["remote"] == "127.0.0.1" and e["remote_port"] == result["port"] for e in connects)
