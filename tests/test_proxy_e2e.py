"""The transparent proxy with real clients and a real HTTPS upstream, in a namespace.

No redirector here: the clients resolve api.openai.com etc. to 127.0.0.1 (the
namespace's own hosts file) and reach the proxy port directly; the proxy's
flow lookup names the fake provider as the original destination. What is
checked: every real client gets exactly the upstream's answer through the
proxy, the decrypted exchange becomes OISP events, non-AI TLS passes through
with the upstream's own certificate, and a pinning client's host is
remembered.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakeprovider import make_test_pki
from tests.netns import NetNS, agent_args, stop_all

HERE = Path(__file__).parent
PROXY_PORT, UPSTREAM_PORT = 8443, 9443
KEY = "sk-proj-TESTKEY0123456789abcdefghijklmnopqrstuv"

pytestmark = pytest.mark.privileged


def _wait_port(ns: NetNS, port: int, timeout: float = 15) -> None:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1).close()"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ns.run(sys.executable, "-c", probe, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy-lab")
    ns = NetNS.create()
    hosts_dir = Path("/etc/netns") / ns.name
    hosts_dir.mkdir(parents=True, exist_ok=True)
    (hosts_dir / "hosts").write_text("127.0.0.1 localhost api.openai.com api.anthropic.com api.mistral.ai example.test\n")
    processes = []
    try:
        upstream_ca, cert, key = make_test_pki(tmp)
        processes.append(ns.popen(sys.executable, str(HERE / "fakeprovider.py"), "--port", str(UPSTREAM_PORT),
                                  "--cert", cert, "--key", key, stdout=subprocess.DEVNULL))
        events = tmp / "events.jsonl"
        argv = agent_args(data_dir=tmp / "data", port=PROXY_PORT, upstream_host="127.0.0.1", upstream_port=UPSTREAM_PORT,
                          upstream_ca=upstream_ca, events_path=events)
        proxy = ns.popen(sys.executable, str(HERE / "agents" / "proxy_agent.py"), *argv, stdout=subprocess.PIPE, text=True)
        processes.append(proxy)
        assert proxy.stdout.readline().split()[0] == "ready"
        _wait_port(ns, UPSTREAM_PORT)
        our_ca = tmp / "data" / "oisp" / "oisp-ca.pem"
        yield {"ns": ns, "tmp": tmp, "events": events, "upstream_ca": upstream_ca, "our_ca": str(our_ca),
               "base": f"https://api.openai.com:{PROXY_PORT}", "proxy": proxy}
    finally:
        stop_all(processes)
        ns.delete()
        shutil.rmtree(hosts_dir, ignore_errors=True)


def client(lab, name: str, n: int = 0, base: str | None = None) -> dict:
    env = {**os.environ, "SSL_CERT_FILE": lab["our_ca"]}
    done = subprocess.run(lab["ns"].cmd(sys.executable, str(HERE / "agents" / "ai_clients.py"), name,
                                        base or lab["base"], str(n)),
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def events(lab) -> list[dict]:
    time.sleep(0.3)  # the proxy writes a response's events when the exchange ends
    return [json.loads(line) for line in lab["events"].read_text().splitlines()]


def test_openai_sdk_non_streaming(lab):
    assert client(lab, "openai_sync") == {"text": "echo: hello there", "usage": 18}


@pytest.mark.parametrize("name", ["openai_stream", "openai_async_stream"])
def test_openai_sdk_streaming(lab, name):
    expected = "echo: hello there" + "".join(f"w{i} " for i in range(30))
    assert client(lab, name, 30)["text"] == expected


def test_anthropic_sdk(lab):
    base = f"https://api.anthropic.com:{PROXY_PORT}"
    assert client(lab, "anthropic", base=base) == {"text": "echo: hello there", "usage": 5}
    expected = "echo: hello there" + "".join(f"w{i} " for i in range(10))
    assert client(lab, "anthropic_stream", 10, base=base)["text"] == expected


def test_httpx_http2(lab):
    assert client(lab, "httpx_h2") == {"text": "echo: hello there", "http_version": "HTTP/2"}


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_curl(lab, version):
    done = lab["ns"].run("curl", "-sS", version, "--cacert", lab["our_ca"], "-w", "\n%{http_version}",
                         f"{lab['base']}/v1/chat/completions", "-H", "content-type: application/json",
                         "-H", f"authorization: Bearer {KEY}",
                         "-d", '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"curl"}]}')
    body, http_version = done.stdout.rsplit("\n", 1)
    assert json.loads(body)["choices"][0]["message"]["content"] == "echo: curl"
    assert http_version == ("1.1" if version == "--http1.1" else "2")


def test_sdk_calls_become_events(lab):
    before = len(events(lab))
    client(lab, "openai_sync")
    new = events(lab)[before:]
    requests = [e for e in new if e["event_type"] == "ai.request"]
    responses = [e for e in new if e["event_type"] == "ai.response"]
    assert len(requests) == len(responses) == 1
    assert requests[0]["data"]["model"]["id"] == "gpt-4o-mini"
    assert requests[0]["data"]["messages"][0]["content"] == "hello there"
    assert responses[0]["data"]["usage"]["total_tokens"] == 18
    assert requests[0]["data"]["auth"]["key_prefix"]
    assert KEY not in lab["events"].read_text()


def test_non_ai_tls_passes_through_with_the_upstreams_certificate(lab):
    url = f"https://example.test:{PROXY_PORT}/plain"
    ok = lab["ns"].run("curl", "-sS", "--cacert", lab["upstream_ca"], url)
    assert ok.stdout == "plain upstream reply\n"
    refused = lab["ns"].run("curl", "-sS", "--cacert", lab["our_ca"], url, check=False)
    assert refused.returncode != 0  # the certificate is the real upstream's, not ours


def test_pinning_client_fails_twice_then_passes_through(lab):
    # A client that trusts only the upstream's CA behaves like one that pins it: its TLS
    # alert (unknown CA) is a refusal of our certificate; the second one pins.
    url = f"https://api.mistral.ai:{PROXY_PORT}/plain"
    for _ in range(2):
        refused = lab["ns"].run("curl", "-sS", "--cacert", lab["upstream_ca"], url, check=False)
        assert refused.returncode != 0
    third = lab["ns"].run("curl", "-sS", "--cacert", lab["upstream_ca"], url)
    assert third.stdout == "plain upstream reply\n"
    rejected = [e for e in events(lab) if e["event_type"] == "network.connect" and not e["data"].get("success", True)
                and e["data"]["tls"]["sni"] == "api.mistral.ai"]
    assert len(rejected) == 2
    assert "pass through undecrypted" in rejected[1]["confidence"]["reasons"][0]


CLOSE_AFTER_HELLO = """
import socket, ssl, sys
tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="api.openai.com")
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
hello = out.read()
for i in range(6):
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as sock:
        sock.sendall(hello)
        if i % 2:  # half wait for our certificate first, then close without a word
            sock.recv(65536)
"""


def test_clients_that_close_mid_handshake_never_pin_a_host(lab):
    """Closing after the ClientHello (or after our certificate) without a TLS alert is no
    refusal: a trusting client to the same name is still decrypted afterwards."""
    lab["ns"].python("-c", CLOSE_AFTER_HELLO, str(PROXY_PORT))
    before = len(events(lab))
    assert client(lab, "openai_sync") == {"text": "echo: hello there", "usage": 18}  # trusts our CA alone
    assert [e["event_type"] for e in events(lab)[before:]].count("ai.request") == 1


def test_200_concurrent_streams_are_byte_exact(lab):
    bodies = client(lab, "concurrent", 200)["bodies"]
    assert len(bodies) == 200
    for i, body in enumerate(bodies):
        frames = [line for line in body.split("\n\n") if line]
        assert frames[-1] == "data: [DONE]"
        contents = [json.loads(f[6:])["choices"][0]["delta"].get("content", "") for f in frames[1:-2]]
        assert "".join(contents) == f"echo: n{i}" + "".join(f"w{k} " for k in range(50))
