"""Fail open, whatever part of oisp dies: real faults in a real Redirector, a real
`oisp record`, real guardians, real TC filters, in namespaces the tests create.

- the reflector or DNS thread hits an unexpected error: its handles close at once
  (traffic flows straight to the server), the failure is kept, `oisp record` says what
  died and exits non-zero;
- the guardian survives SIGTERM, SIGINT and SIGHUP (it cleans up and goes), its death is
  noticed (the engine fails open), a kill while a handle opens is covered;
- filters a dead process left (its guardian killed with it) are reported by `oisp
  check` and removed by `oisp record`, and no live handle's filters are touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakeprovider import make_test_pki
from tests.netns import agent_args, stop_all
from tests.record_lab import await_recording

HERE = Path(__file__).parent
AGENTS = HERE / "agents"

pytestmark = pytest.mark.privileged


@pytest.fixture
def lab(veth_pair):
    """The pair, a second address on b (not an AI endpoint), and echo servers on b:443."""
    ifname = veth_pair.b.run("ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
    veth_pair.extra4 = veth_pair.b_ip4.rsplit(".", 1)[0] + ".3"
    veth_pair.b.run("ip", "addr", "add", f"{veth_pair.extra4}/24", "dev", ifname)
    server = veth_pair.b.popen(sys.executable, str(AGENTS / "redirect_server.py"), *agent_args("tcp", ports=443),
                               stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    yield veth_pair
    server.kill()
    server.wait()


def agent(ns, scenario: str, timeout=60, **options) -> dict:
    done = subprocess.run(ns.cmd(sys.executable, str(AGENTS / "failopen_agent.py"), *agent_args(scenario, **options)),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


# -- the reflector and DNS threads -------------------------------------------------------

@pytest.mark.parametrize("fault", ["method", "popen"])
def test_an_unexpected_error_in_the_reflector_fails_open_and_is_kept(lab, fault):
    out = agent(lab.a, "reflector-fault", server_ip=lab.b_ip4, other_ip=lab.extra4, fault=fault)
    before, after = out["before"], out["after"]
    # through the proxy
    assert before["intact"]
    assert before["server_saw"][1] != before["client_port"]
    assert out["filters_before"] == 4  # ingress and egress, on lo and the veth
    assert out["failed"], out
    assert out["failure"].startswith("the reflector died (")
    assert "injected fault" in out["failure"]
    # Straight to the server now (it saw the client's own port), and no filter is left.
    assert after["intact"]
    assert after["server_saw"] == [lab.a_ip4, after["client_port"]]
    assert out["filters_after"] == 0
    assert out["accepted"] == 1


def test_an_unexpected_error_in_the_dns_watcher_closes_its_handle(veth_pair):
    dns = veth_pair.b.popen(sys.executable, str(AGENTS / "redirect_server.py"), "dns",
                            stdout=subprocess.PIPE, text=True)
    try:
        assert dns.stdout.readline().strip() == "ready"
        out = agent(veth_pair.a, "dns-fault", dns_ip=veth_pair.b_ip4)
    finally:
        dns.kill()
        dns.wait()
    assert out["failed"]
    assert out["failure"].startswith("the DNS watcher died (RuntimeError: injected fault")
    # Answers flow at once, not after the watchdog's 5 s with the answer held meanwhile.
    assert not out["dns_handle_open"], out
    assert out["second_answer_after"] < 1.0, out


@pytest.fixture
def record_lab(veth_pair, tmp_path):
    """The fake provider on b:443 (named api.openai.com in a's hosts file) and a way to
    run `oisp record` in a, through tests/agents/faulty_record.py."""
    hosts_dir = Path("/etc/netns") / veth_pair.a.name
    hosts_dir.mkdir(parents=True, exist_ok=True)
    (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{veth_pair.b_ip4} api.openai.com\n")
    upstream_ca, cert, key = make_test_pki(tmp_path)
    provider = veth_pair.b.popen(sys.executable, str(HERE / "fakeprovider.py"), "--host", veth_pair.b_ip4,
                                 "--port", "443", "--cert", cert, "--key", key, stdout=subprocess.DEVNULL)
    processes = [provider]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}

    def start(*wrapper: str) -> subprocess.Popen:
        sensor = veth_pair.a.popen(sys.executable, *wrapper, "record", "-o", str(tmp_path / "events.jsonl"),
                                   "--upstream-ca", upstream_ca, stderr=subprocess.PIPE, text=True, env=env)
        processes.append(sensor)
        await_recording(sensor)
        return sensor

    def curl(ca: str) -> subprocess.CompletedProcess:
        return veth_pair.a.run("curl", "-sS", "--connect-timeout", "1", "-m", "3", "--cacert", ca,
                               "https://api.openai.com/plain", check=False)

    try:
        time.sleep(1.0)  # hypercorn binding
        yield {"pair": veth_pair, "tmp": tmp_path, "start": start, "curl": curl, "upstream_ca": upstream_ca,
               "our_ca": str(tmp_path / "data" / "oisp" / "oisp-ca.pem"), "env": env}
    finally:
        stop_all(processes)
        import shutil

        shutil.rmtree(hosts_dir, ignore_errors=True)


def test_oisp_record_says_what_died_and_exits_non_zero(record_lab):
    trigger = record_lab["tmp"] / "fault"
    sensor = record_lab["start"](str(AGENTS / "faulty_record.py"), "--trigger", str(trigger))
    intercepted = record_lab["curl"](record_lab["our_ca"])  # our leaf certificate: through the proxy
    assert intercepted.stdout == "plain upstream reply\n", intercepted.stderr
    trigger.touch()  # the reflector thread raises on its next periodic step
    returncode = sensor.wait(15)  # a sensor that carries on half alive times out here
    rest = sensor.stderr.read()
    assert returncode == 1, rest
    assert "the reflector died (RuntimeError: injected fault)" in rest, rest
    assert "traffic flows directly" in rest, rest
    assert rest.count("Traceback") == 1  # logged once, with where it came from
    direct = record_lab["curl"](record_lab["upstream_ca"])  # the real server's certificate: not intercepted
    assert direct.stdout == "plain upstream reply\n", direct.stderr


# -- the guardian ------------------------------------------------------------------------

GUARDIAN = str(AGENTS / "guardian_agent.py")


def bpf_filters(ns) -> list[dict]:
    """The BPF filters on every interface of `ns`, as tc lists them."""
    links = json.loads(ns.run("ip", "-j", "link", "show").stdout)
    found = []
    for link in links:
        for direction in ("ingress", "egress"):
            shown = ns.run("tc", "-j", "filter", "show", "dev", link["ifname"], direction).stdout
            found += [f for f in json.loads(shown or "[]") if "options" in f and f["kind"] == "bpf"]
    return found


def wait_for(predicate, timeout: float) -> float | None:
    """Seconds until `predicate()` held, or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def connects(ns, port: int) -> bool:
    probe = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=0.3)"
    return ns.run(sys.executable, "-c", probe, str(port), check=False).returncode == 0


@pytest.fixture
def listeners(netns):
    """TCP listeners on 127.0.0.1:7001 and :7002 in the namespace."""
    servers = [netns.popen(sys.executable, GUARDIAN, *agent_args("listen", port=port), stdout=subprocess.PIPE, text=True)
               for port in (7001, 7002)]
    for server in servers:
        assert server.stdout.readline().strip() == "ready"
    yield netns
    stop_all(servers)


def start_holder(ns, port: int, die_in_open: bool = False) -> tuple[subprocess.Popen, int]:
    holder = ns.popen(sys.executable, GUARDIAN, *agent_args("holder", port=port, die_in_open=die_in_open),
                      stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline().split()
    assert line, line
    assert line[0] in ("ready", "opened"), line
    return holder, int(line[1]) if line[0] == "ready" else 0


@pytest.mark.parametrize("sig", ["TERM", "KILL"])
def test_the_engine_notices_its_guardian_died_and_fails_open(listeners, sig):
    """SIGTERM: the guardian removes the filters itself before it goes; SIGKILL: it cannot,
    the engine notices and closes the handle. Either way it is counted and said."""
    done = listeners.python(GUARDIAN, *agent_args("engine", port=7001, sig=sig))
    out = json.loads(done.stdout)
    # it really diverted
    assert not out["connects_while_diverted"]
    assert out["filters_before"] == 2
    assert out["noticed_after"] is not None, out
    assert out["noticed_after"] < 1.0, out
    assert out["error"] == "GuardianLost"
    assert out["guardian_deaths"] == 1
    assert out["filters_after"] == 0
    assert out["connects_after"]


def test_a_sigterm_storm_while_the_guardian_cleans_up_leaves_no_filter(listeners):
    """The holder is killed; its guardian gets SIGTERM, SIGINT and SIGHUP again and again
    while it cleans up (slowed by many interfaces, each listed twice)."""
    for i in range(6):
        listeners.run("ip", "link", "add", f"vs{i}a", "type", "veth", "peer", "name", f"vs{i}b")
    holder, guardian = start_holder(listeners, 7001)
    assert len(bpf_filters(listeners)) == 2 * 13
    assert not connects(listeners, 7001)
    holder.kill()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                os.kill(guardian, sig)
            except ProcessLookupError:
                break
        time.sleep(0.002)
    holder.wait()
    assert wait_for(lambda: not bpf_filters(listeners), 3.0) is not None, bpf_filters(listeners)
    assert connects(listeners, 7001)


def test_a_sigterm_to_the_guardian_of_a_live_holder_removes_its_filters(listeners):
    holder, guardian = start_holder(listeners, 7001)
    try:
        assert bpf_filters(listeners)
        assert not connects(listeners, 7001)
        os.kill(guardian, signal.SIGTERM)
        assert wait_for(lambda: not bpf_filters(listeners), 2.0) is not None
        assert connects(listeners, 7001)
    finally:
        holder.kill()
        holder.wait()


def test_a_process_killed_while_its_handle_opens_leaves_no_filter(listeners):
    """SIGKILLed the moment the backend attached the filters, before the handle could
    tell anyone which programs they run."""
    holder, _ = start_holder(listeners, 7001, die_in_open=True)
    assert holder.wait(10) == -signal.SIGKILL
    assert wait_for(lambda: not bpf_filters(listeners), 3.0) is not None, bpf_filters(listeners)
    assert connects(listeners, 7001)


def test_orphaned_filters_are_reported_by_check_and_removed_by_record_and_live_ones_kept(listeners, tmp_path):
    """An orphan: a holder and its guardian both SIGKILLed. A live holder beside it must keep
    its filters (the sweep judges by whether a live process holds the programs)."""
    orphan, orphan_guardian = start_holder(listeners, 7001)
    live, _ = start_holder(listeners, 7002)
    try:
        os.kill(orphan_guardian, signal.SIGKILL)
        time.sleep(0.1)
        orphan.kill()
        orphan.wait()
        assert len(bpf_filters(listeners)) == 4
        assert not connects(listeners, 7001)
        env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
        check = subprocess.run(listeners.cmd(sys.executable, "-m", "oisp", "check", "--json"),
                               capture_output=True, text=True, timeout=60, env=env)
        notes = [n for n in json.loads(check.stdout)["notes"] if n["what"] == "orphaned filters"]
        assert len(notes) == 1
        assert notes[0]["message"].startswith("2 eBPFDivert filters (lo egress, lo ingress)")
        assert "tc filter del dev lo" in notes[0]["fix"]
        assert len(bpf_filters(listeners)) == 4  # check only reports
        record = subprocess.run(listeners.cmd(sys.executable, "-m", "oisp", "record", "--duration", "1",
                                              "-o", str(tmp_path / "events.jsonl")),
                                capture_output=True, text=True, timeout=60, env=env)
        assert record.returncode == 0, record.stderr
        assert "removed 2 eBPFDivert filters a dead process had left" in record.stderr
        assert len(bpf_filters(listeners)) == 2
        assert connects(listeners, 7001)
        assert not connects(listeners, 7002)  # the live holder still diverts
    finally:
        live.kill()
        live.wait()


def test_without_iproute2_check_and_record_say_fail_open_on_kill_is_unavailable(netns, tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    without = ("/usr/bin/env", f"PATH={tmp_path}", sys.executable)  # no tc, no ss
    check = subprocess.run(netns.cmd(*without, "-m", "oisp", "check", "--json"),
                           capture_output=True, text=True, timeout=60, env=env)
    notes = [n for n in json.loads(check.stdout)["notes"] if n["what"] == "guardian"]
    assert len(notes) == 1
    assert "fail-open on kill -9 is unavailable: tc and ss (iproute2) missing" in notes[0]["message"]
    assert "apt-get install iproute2" in notes[0]["fix"]
    record = subprocess.run(netns.cmd(*without, "-m", "oisp", "record", "--duration", "1",
                                      "-o", str(tmp_path / "events.jsonl")),
                            capture_output=True, text=True, timeout=60, env=env)
    assert record.returncode == 0, record.stderr
    assert "oisp record: note: fail-open on kill -9 is unavailable" in record.stderr


def test_oisp_record_fails_open_when_a_guardian_is_killed(record_lab):
    """A real fault, no monkeypatching: kill -9 the sensor's guardians."""
    sensor = record_lab["start"]("-m", "oisp")
    children = subprocess.run(["pgrep", "-f", "oisp/divert/guardian.py"], capture_output=True, text=True).stdout.split()
    guardians = [int(pid) for pid in children if Path(f"/proc/{pid}/stat").read_text().split()[3] == str(sensor.pid)]
    assert len(guardians) == 3  # the reflector's handle, the DNS watcher's and the QUIC refuser's
    for pid in guardians:
        os.kill(pid, signal.SIGKILL)
    returncode = sensor.wait(15)
    rest = sensor.stderr.read()
    assert returncode == 1, rest
    assert "GuardianLost" in rest, rest
    assert "traffic flows directly" in rest, rest
    direct = record_lab["curl"](record_lab["upstream_ca"])
    assert direct.stdout == "plain upstream reply\n", direct.stderr
    assert not bpf_filters(record_lab["pair"].a)
