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
from tests.netns import stop_all

HERE = Path(__file__).parent
AGENTS = HERE / "agents"

pytestmark = pytest.mark.privileged


@pytest.fixture
def lab(veth_pair):
    """The pair, a second address on b (not an AI endpoint), and echo servers on b:443."""
    ifname = veth_pair.b.run("ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
    veth_pair.extra4 = veth_pair.b_ip4.rsplit(".", 1)[0] + ".3"
    veth_pair.b.run("ip", "addr", "add", f"{veth_pair.extra4}/24", "dev", ifname)
    server = veth_pair.b.popen(sys.executable, str(AGENTS / "redirect_server.py"), "tcp", "443",
                               stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    yield veth_pair
    server.kill()
    server.wait()


def agent(ns, *args, timeout=60) -> dict:
    done = subprocess.run(ns.cmd(sys.executable, str(AGENTS / "failopen_agent.py"), *args),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


# -- the reflector and DNS threads -------------------------------------------------------

@pytest.mark.parametrize("fault", ["method", "popen"])
def test_an_unexpected_error_in_the_reflector_fails_open_and_is_kept(lab, fault):
    out = agent(lab.a, "reflector-fault", lab.b_ip4, lab.extra4, fault)
    before, after = out["before"], out["after"]
    assert before["intact"] and before["server_saw"][1] != before["client_port"]  # through the proxy
    assert out["filters_before"] == 4  # ingress and egress, on lo and the veth
    assert out["failed"], out
    assert out["failure"].startswith("the reflector died (") and "injected fault" in out["failure"]
    # Straight to the server now (it saw the client's own port), and no filter is left.
    assert after["intact"] and after["server_saw"] == [lab.a_ip4, after["client_port"]]
    assert out["filters_after"] == 0 and out["accepted"] == 1


def test_an_unexpected_error_in_the_dns_watcher_closes_its_handle(veth_pair):
    dns = veth_pair.b.popen(sys.executable, str(AGENTS / "redirect_server.py"), "dns",
                            stdout=subprocess.PIPE, text=True)
    try:
        assert dns.stdout.readline().strip() == "ready"
        out = agent(veth_pair.a, "dns-fault", veth_pair.b_ip4)
    finally:
        dns.kill()
        dns.wait()
    assert out["failed"] and out["failure"].startswith("the DNS watcher died (RuntimeError: injected fault")
    # Answers flow at once, not after the watchdog's 5 s with the answer held meanwhile.
    assert not out["dns_handle_open"] and out["second_answer_after"] < 1.0, out


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
        seen = []
        for line in sensor.stderr:
            seen.append(line)
            if "recording" in line:
                return sensor
        raise AssertionError(f"the sensor did not start: {sensor.wait()} {''.join(seen)}")

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
    sensor = record_lab["start"](str(AGENTS / "faulty_record.py"), str(trigger))
    intercepted = record_lab["curl"](record_lab["our_ca"])  # our leaf certificate: through the proxy
    assert intercepted.stdout == "plain upstream reply\n", intercepted.stderr
    trigger.touch()  # the reflector thread raises on its next periodic step
    returncode = sensor.wait(15)  # a sensor that carries on half alive times out here
    rest = sensor.stderr.read()
    assert returncode == 1, rest
    assert "the reflector died (RuntimeError: injected fault)" in rest and "traffic flows directly" in rest, rest
    assert rest.count("Traceback") == 1  # logged once, with where it came from
    direct = record_lab["curl"](record_lab["upstream_ca"])  # the real server's certificate: not intercepted
    assert direct.stdout == "plain upstream reply\n", direct.stderr
