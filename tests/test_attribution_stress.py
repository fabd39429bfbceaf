"""Attribution under churn: many short-lived client processes in a row, each making one
AI call through `oisp record`, each event carrying exactly the pid of the process that
made the call.

The client namespace's ephemeral range is sixteen ports wide and keeps no TIME_WAIT
sockets, so successive clients connect from the ports their predecessors just used,
to the same server (the proxy's upstream sockets take their ports from the same
range, binding the odd ones first while connects take the even ones): a cache, flow-table entry or guess keyed by anything
a new connection can share with the last one names the previous (exited) client.
Every client prints its own pid and local port; every ai.request and ai.response is
matched to its client by the message it sent. Run with psutil alone (the default on
a host without cgroup v2 at /sys/fs/cgroup) and with SOCKET/FLOW events (cgroup v2
mounted in the sensor's own mount namespace), over IPv4 and IPv6. On main (66d932d)
every run named another client's pid: for 32 and 32 of 40 calls with psutil alone
(IPv4, IPv6), 23 and 17 with events.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fakeprovider import make_test_pki
from tests.netns import VethPair, stop_all, with_cgroup2
from tests.record_lab import await_recording

HERE = Path(__file__).parent
KEY = "sk-proj-TESTKEY0123456789abcdefghijklmnopqrstuv"
PORTS = (40000, 40015)  # the client namespace's ephemeral range
BUDGET = 40.0  # seconds of clients per run; the run stops early rather than overrun
CLIENTS = 40  # per run: five times round the eight even ports

pytestmark = pytest.mark.privileged

HTTPX_CLIENT = """
import httpx, json, os, sys
with httpx.Client(timeout=15) as client:
    r = client.post("https://api.openai.com/v1/chat/completions",
                    headers={"authorization": "Bearer %s"},
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": sys.argv[1]}]})
    port = r.extensions["network_stream"].get_extra_info("client_addr")[1]
    assert r.json()["choices"][0]["message"]["content"] == "echo: " + sys.argv[1]
print(json.dumps({"pid": os.getpid(), "port": port}))
""" % KEY

OPENAI_CLIENT = """
import json, os, sys, openai
reply = openai.OpenAI(api_key="%s", base_url="https://api.openai.com/v1", max_retries=0, timeout=15) \\
    .chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": sys.argv[1]}])
assert reply.choices[0].message.content == "echo: " + sys.argv[1]
print(json.dumps({"pid": os.getpid(), "port": None}))
""" % KEY

# `exec` keeps the shell's pid: the pid printed is curl's own.
CURL_CLIENT = ("echo $$; exec curl -sS -m 15 -o /dev/null -w '%{local_port}' https://api.openai.com/v1/chat/completions "
               f"-H 'authorization: Bearer {KEY}' -H 'content-type: application/json' "
               "-d '{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", \"content\": \"'$1'\"}]}'")


def _sysctl(ns, name: str, value: str) -> None:
    ns.run("sysctl", "-qw", f"{name}={value}")


@pytest.fixture(params=[("psutil", 4), ("events", 4), ("psutil", 6), ("events", 6)],
                ids=["psutil-ipv4", "events-ipv4", "psutil-ipv6", "events-ipv6"])
def lab(tmp_path, request):
    mode, family = request.param
    pair = VethPair.create()
    server_ip = pair.b_ip4 if family == 4 else pair.b_ip6
    hosts_dir = Path("/etc/netns") / pair.a.name
    hosts_dir.mkdir(parents=True, exist_ok=True)
    (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{server_ip} api.openai.com\n")
    _sysctl(pair.a, "net.ipv4.ip_local_port_range", f"{PORTS[0]} {PORTS[1]}")
    # No TIME_WAIT: a closed connection's port is free at once, for the next client and
    # for the proxy's upstream binds alike (a TIME_WAIT socket holds its port for bind()).
    _sysctl(pair.a, "net.ipv4.tcp_max_tw_buckets", "0")
    upstream_ca, cert, key = make_test_pki(tmp_path)
    processes = [pair.b.popen(sys.executable, str(HERE / "fakeprovider.py"), "--host", server_ip, "--port", "443",
                              "--cert", cert, "--key", key, stdout=subprocess.DEVNULL)]
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    argv = [sys.executable, "-m", "oisp", "record", "-o", str(tmp_path / "events.jsonl"), "--upstream-ca", upstream_ca]
    try:
        time.sleep(1.0)  # hypercorn binding
        if mode == "events":
            argv = with_cgroup2(*[f"'{a}'" for a in argv])
        sensor = pair.a.popen(*argv, stderr=subprocess.PIPE, text=True, env=env)
        processes.append(sensor)
        said = await_recording(sensor)
        if mode == "events":
            assert not any("named by psutil only" in line for line in said), said
        yield {"pair": pair, "sensor": sensor, "events": tmp_path / "events.jsonl",
               "ca": str(tmp_path / "data" / "oisp" / "oisp-ca.pem")}
    finally:
        stop_all(processes)
        pair.delete()
        shutil.rmtree(hosts_dir, ignore_errors=True)


def _run_client(lab, kind: str, message: str) -> tuple[int, int | None]:
    ns = lab["pair"].a
    argv = {"httpx": [sys.executable, "-c", HTTPX_CLIENT, message],
            "openai": [sys.executable, "-c", OPENAI_CLIENT, message],
            "curl": ["sh", "-c", CURL_CLIENT, "sh", message]}[kind]
    done = subprocess.run(ns.cmd(*argv), capture_output=True, text=True, timeout=30, check=False,
                          env={**os.environ, "SSL_CERT_FILE": lab["ca"], "CURL_CA_BUNDLE": lab["ca"]})
    assert done.returncode == 0, (kind, done.stdout, done.stderr[-2000:])
    if kind == "curl":
        pid, port = done.stdout.split()
        return int(pid), int(port)
    said = json.loads(done.stdout)
    return said["pid"], said["port"]


def test_every_event_names_the_process_that_made_the_call(lab):
    kinds = ["curl", "httpx", "curl", "curl", "httpx", "openai"]
    clients: dict[str, tuple[int, int | None, str]] = {}  # message → (pid, port, kind)
    started = time.monotonic()
    while time.monotonic() - started < BUDGET and len(clients) < CLIENTS:
        kind = kinds[len(clients) % len(kinds)]
        message = f"call-{len(clients)}"
        pid, port = _run_client(lab, kind, message)
        clients[message] = (pid, port, kind)
    ports = Counter(port for _, port, _ in clients.values() if port is not None)
    # ports were reused
    assert len(clients) >= 12, (len(clients), ports)
    assert max(ports.values()) >= 3, (len(clients), ports)
    lab["sensor"].send_signal(signal.SIGINT)
    assert lab["sensor"].wait(15) == 0
    events = [json.loads(line) for line in lab["events"].read_text().splitlines()]
    requests = {e["data"]["request_id"]: e for e in events if e["event_type"] == "ai.request"}
    by_message = {r["data"]["messages"][-1]["content"]: r for r in requests.values()}
    assert set(by_message) == set(clients)
    wrong = []
    for event in events:
        if event["event_type"] not in ("ai.request", "ai.response"):
            continue
        request = requests[event["data"]["request_id"]]
        message = request["data"]["messages"][-1]["content"]
        pid, port, kind = clients[message]
        got = (event.get("process") or {}).get("pid")
        if got != pid:
            wrong.append((message, kind, port, event["event_type"], pid, got))
    assert not wrong, f"{len(wrong)} events with another pid (message, client, port, type, pid, got): {wrong}"
