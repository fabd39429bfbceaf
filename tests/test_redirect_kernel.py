"""The redirector on the real kernel path: a client namespace dials a server namespace
over a veth; the reflector sends AI-bound flows into a local proxy, which dials out again
through connect_upstream. IPv4 and IPv6; non-AI traffic untouched; DNS answers learned."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import agent_args

pytestmark = pytest.mark.privileged

AGENTS = Path(__file__).parent / "agents"
CGROUP2 = "mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec \"$0\" \"$@\""


@pytest.fixture
def lab(veth_pair):
    """The pair, a second address on b (not an AI endpoint), and echo servers on b:443 and b:444."""
    ifname = veth_pair.b.run("ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
    extra4 = veth_pair.b_ip4.rsplit(".", 1)[0] + ".3"
    extra6 = veth_pair.b_ip6.rsplit(":", 1)[0] + ":3"
    veth_pair.b.run("ip", "addr", "add", f"{extra4}/24", "dev", ifname)
    veth_pair.b.run("ip", "addr", "add", f"{extra6}/64", "dev", ifname, "nodad")
    server = veth_pair.b.popen(sys.executable, str(AGENTS / "redirect_server.py"), *agent_args("tcp", ports="443,444"),
                               stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    veth_pair.extra = {4: extra4, 6: extra6}
    veth_pair.server = server
    yield veth_pair
    server.kill()
    server.wait()


def server_log(server) -> list[tuple[int, str, int]]:
    server.kill()
    lines = server.stdout.read().split("\n")
    return [(int(p), host, int(port)) for _, p, host, port in (line.split() for line in lines if line)]


def run_client(ns, scenario: str, cgroup2=False, **options):
    argv = [sys.executable, str(AGENTS / "redirect_client.py"), *agent_args(scenario, **options)]
    if cgroup2:
        argv = ["unshare", "-m", "sh", "-c", CGROUP2, *argv]
    done = subprocess.run(ns.cmd(*argv), capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def check_redirected(out, server_ip, client_ip, log):
    ai = out["ai"]
    assert out["reflector_error"] is None
    # The proxy accepted the reflected socket with the peer (server, client port) ...
    first = out["accepted"][0]
    assert first["peer"] == [server_ip, ai["client_port"]]
    # ... and the table gave back the original destination and the client's pid.
    assert first["entry"] == {"server": server_ip, "server_port": 443, "client": client_ip,
                              "client_port": ai["client_port"], "pid": out["me"]}
    assert ai["intact"]
    assert ai["echoed"] == 300_000
    # The server saw the proxy's upstream port, once, never the client's own port: no loop.
    assert ai["server_saw"] == [client_ip, first["upstream_port"]]
    assert first["upstream_port"] != ai["client_port"]
    ai_conns = [c for c in log if c[0] == 443 and c[2] in (first["upstream_port"], ai["client_port"])]
    assert ai_conns == [(443, client_ip, first["upstream_port"])]
    assert out["counters"]["own_upstream"] > 0  # the proxy's upstream packets: diverted, passed untouched
    assert out["own_ports_left"] == 0
    # FIN both ways, then RST: each flow leaves the table after its linger.
    assert out["flows_after_ai"] == 1
    assert out["flows_empty_after_fin"]
    assert out["flows_before_rst"] == 1
    assert out["flows_empty_after_rst"]
    assert out["counters"]["flow_table"]["closed"] == 2
    assert out["counters"]["engine"]["dropped"] == 0, json.dumps(out["counters"]["engine"])
    fast = out["counters"]["fast_path"]
    if fast:  # the ring reflected the established flow's packets itself, Python the rest
        assert fast["to_proxy"] > 0
        assert fast["to_client"] > 0
        assert fast["flows"] == 0  # removed with the flow table's entries
        # Without a process filter the ring opened both AI flows on their SYNs, and the
        # table adopted them (the AI connection, then the reset one).
        by_ring = not out["process_filter"]
        assert fast["opened"] == (2 if by_ring else 0)
        assert [seen["from_ring"] for seen in out["accepted"][:2]] == [by_ring, by_ring]
    else:
        assert not any(seen["from_ring"] for seen in out["accepted"])


def check_untouched(out, client_ip, log, accepted=2):
    fast = out["counters"]["fast_path"]
    if out["counters"]["filter"]["mode"] == "addresses":  # the filter names the AI address: never diverted
        assert out["diverted_other"] == 0
        assert fast.get("not_ai", 0) == 0
    else:  # diverted for the port; the ring passes it itself (not AI), or Python does
        assert out["diverted_other"] > 0
        if fast:
            assert fast["not_ai"] > 0
            assert fast["targets"] == 1
    for name, port in (("other_address", 443), ("other_port", 444)):
        conn = out[name]
        assert conn["intact"]
        assert conn["server_saw"] == [client_ip, conn["client_port"]]
        assert (port, client_ip, conn["client_port"]) in log
    assert len(out["accepted"]) == accepted  # the AI and RST connections only


@pytest.mark.parametrize("family,path,filter", [(4, "fast", "addresses"), (6, "fast", "addresses"),
                                                (4, "python", "addresses"), (6, "python", "ports"),
                                                (4, "fast", "ports")])
def test_ai_flows_reach_the_proxy_and_the_rest_is_untouched(lab, family, path, filter):
    server_ip, client_ip = (lab.b_ip4, lab.a_ip4) if family == 4 else (lab.b_ip6, lab.a_ip6)
    out = run_client(lab.a, "e2e", server_ip=server_ip, other_ip=lab.extra[family], python_path=path == "python",
                     port_filter=filter == "ports")
    assert out["counters"]["filter"]["mode"] == filter
    assert bool(out["counters"]["fast_path"]) == (path == "fast")
    log = server_log(lab.server)
    check_redirected(out, server_ip, client_ip, log)
    check_untouched(out, client_ip, log)


@pytest.mark.parametrize("family,path", [(4, "fast"), (6, "fast"), (4, "python")])
def test_a_client_bound_to_a_port_above_the_ephemeral_range_is_reflected(lab, family, path):
    """Port 61000 lies above Linux's default ephemeral range (32768-60999), which the
    filter once left to the proxy's own upstream sockets: such a client went unseen."""
    server_ip, client_ip = (lab.b_ip4, lab.a_ip4) if family == 4 else (lab.b_ip6, lab.a_ip6)
    out = run_client(lab.a, "bound", server_ip=server_ip, source_port=61000, python_path=path == "python")
    assert out["ephemeral"][1] < 61000
    assert out["reflector_error"] is None
    bound = out["bound"]
    assert bound["client_port"] == 61000
    assert bound["intact"]
    assert bound["echoed"] == 100_000
    # The proxy took it: peer (server, 61000), the table gave the client back ...
    [seen] = out["accepted"]
    assert seen["peer"] == [server_ip, 61000]
    assert seen["entry"]["client"] == client_ip
    assert seen["entry"]["client_port"] == 61000
    # ... and the server saw the proxy's registered upstream port, once: no loop.
    assert bound["server_saw"] == [client_ip, seen["upstream_port"]] != [client_ip, 61000]
    assert [c for c in server_log(lab.server) if c[0] == 443] == [(443, client_ip, seen["upstream_port"])]
    counters = out["counters"]
    assert counters["own_upstream"] > 0
    assert counters["reflected_to_proxy"] > 0
    assert out["own_ports_left"] == 0
    assert bool(counters["fast_path"]) == (path == "fast")


@pytest.mark.parametrize("family,events", [(4, False), (6, True)])
def test_an_excluded_process_is_never_reflected(lab, family, events):
    """/proc names the child without SOCKET events; with cgroup2 the events feed runs too."""
    server_ip, client_ip = (lab.b_ip4, lab.a_ip4) if family == 4 else (lab.b_ip6, lab.a_ip6)
    out = run_client(lab.a, "e2e", server_ip=server_ip, other_ip=lab.extra[family], exclude_child=True,
                     events=events, cgroup2=events)
    assert out["events"] == events
    log = server_log(lab.server)
    check_redirected(out, server_ip, client_ip, log)
    child = out["child"]
    assert child["server_saw"] == [client_ip, child["client_port"]]  # straight to the server
    assert (443, client_ip, child["client_port"]) in log
    assert out["counters"]["excluded"] >= 1
    check_untouched(out, client_ip, log)


@pytest.mark.parametrize("family,path", [(4, "fast"), (6, "python")])
def test_a_new_ai_address_swaps_in_a_handle_without_breaking_a_flow(lab, family, path):
    server_ip, client_ip = (lab.b_ip4, lab.a_ip4) if family == 4 else (lab.b_ip6, lab.a_ip6)
    other_ip = lab.extra[family]
    out = run_client(lab.a, "swap", server_ip=server_ip, other_ip=other_ip, python_path=path == "python")
    assert out["reflector_error"] is None
    assert out["covered"]
    assert out["sending_at_swap"]  # the swap came mid-stream ...
    assert out["first"]["intact"], out["first"]  # ... and the flow carried on, byte for byte
    counters = out["counters"]
    assert counters["filter"] == {"mode": "addresses", "addresses": 2, "handles": 2, "why_ports": None, "live": 1}
    other = out["other"]
    # The new address is taken now: the proxy accepted it and dialled the server itself.
    assert [a["peer"] for a in out["accepted"]] == [[server_ip, a["peer"][1]] for a in out["accepted"][:1]] + \
        [[other_ip, other["client_port"]]]
    assert other["intact"]
    assert other["server_saw"] == [client_ip, out["accepted"][1]["upstream_port"]]
    # Nothing the old handle held was passed untouched (a stop's drain) or dropped.
    assert counters["engine"]["drained"] == 0, counters["engine"]
    assert counters["engine"]["dropped"] == 0, counters["engine"]
    log = server_log(lab.server)
    assert (443, client_ip, other["client_port"]) not in log


def test_a_stream_of_new_addresses_swaps_handles_within_the_budget(lab):
    """Each new address asks for a handle swap; a burst of four, then one per 2 s, each
    taking every address learned meanwhile (on main: one swap per address)."""
    out = run_client(lab.a, "swap-flood", server_ip=lab.b_ip4)
    assert out["reflector_error"] is None
    assert out["covered"]
    filter = out["counters"]["filter"]
    assert filter["addresses"] == 49
    assert filter["mode"] == "addresses"
    # The first handle, a burst of 4, and one more per 2 s from the start.
    assert filter["handles"] <= 1 + 4 + int(out["seconds"] / 2.0) + 1, (filter, out["seconds"])
    assert filter["swaps_deferred"] >= 1
    assert out["ai"]["intact"]
    assert out["accepted"] == 1


PROBE = """
import socket, sys
c = socket.create_connection((sys.argv[1], 443), timeout=0.3)
print(c.makefile().readline().split()[2], c.getsockname()[1])
"""


@pytest.mark.parametrize("when", ["mid-swap", "after-swap"])
def test_a_sensor_killed_at_a_swap_fails_open_and_aborts_what_it_carried(lab, tmp_path, when):
    """Killed while both handles live (either guardian may act), or once the old one is
    closed (only the successor's guardian can abort the flow it inherited)."""
    result = tmp_path / "waiter.json"
    out = run_and_die(lab, "swap-kill", server_ip=lab.b_ip4, other_ip=lab.extra[4], result_path=result, when=when)
    assert out == {"connected": True, "covered": True, "handles": 2, "accepted": 1,
                   **({"live": 1} if when == "after-swap" else {})}
    check_failed_open(lab, result)


def test_a_sensor_killed_before_it_adopts_a_flow_the_ring_opened_aborts_it(lab, tmp_path):
    """The ring opened the flow on its SYN and the handshake completed, but the flow
    table never heard of it: the ring itself told the guardian."""
    result = tmp_path / "waiter.json"
    out = run_and_die(lab, "syn-kill", server_ip=lab.b_ip4, result_path=result)
    assert out == {"connected": True, "opened": [1, 1], "flows": 0}
    check_failed_open(lab, result)


def run_and_die(lab, scenario: str, **options) -> dict:
    argv = [sys.executable, str(AGENTS / "redirect_client.py"), *agent_args(scenario, **options)]
    done = subprocess.run(lab.a.cmd(*argv),
                          capture_output=True, text=True, timeout=60)
    lab.killed = time.time()
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def check_failed_open(lab, result: Path) -> None:
    """Traffic flows again at once, and the child's redirected connection was aborted by
    a guardian at once (had none been told of it, it would wait for 30 s)."""
    recovered = None
    while time.time() - lab.killed < 5:
        probe = lab.a.run(sys.executable, "-c", PROBE, lab.b_ip4, check=False)
        if probe.returncode == 0:
            saw_port, own_port = probe.stdout.split()
            assert saw_port == own_port  # not through a proxy
            recovered = time.time() - lab.killed
            break
        time.sleep(0.02)
    assert recovered is not None, recovered
    assert recovered < 1.0, recovered
    deadline = time.time() + 10
    while not result.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert result.exists(), "the carried connection was not aborted: it still waits"
    ended = json.loads(result.read_text())
    assert ended["outcome"] != "data", ended
    assert ended["ended_at"] - lab.killed < 3, ended


def test_more_addresses_than_a_filter_holds_fall_back_to_the_port(lab):
    out = run_client(lab.a, "overflow", server_ip=lab.b_ip4, other_ip=lab.extra[4])
    start = out["filter_at_start"]
    assert start["mode"] == "ports"
    assert start["why_ports"].startswith("2 AI addresses")
    assert start["handles"] == 1
    # no swap in port mode
    assert out["covered"]
    assert out["counters"]["filter"]["handles"] == 1
    assert out["ai"]["intact"]
    assert [a["peer"][0] for a in out["accepted"]] == [lab.b_ip4]
    assert out["other"]["intact"]
    assert out["diverted_other"] > 0
    assert out["counters"]["fast_path"]["not_ai"] > 0


def test_addresses_nobody_names_any_more_are_let_go_but_not_under_an_open_flow(lab):
    client_ip = lab.a_ip4
    out = run_client(lab.a, "expire", server_ip=lab.b_ip4, other_ip=lab.extra[4])
    assert out["reflector_error"] is None
    assert out["mode_at_start"] == "ports"  # two addresses, room for one
    assert out["kept_while_open"]
    # The other one went, and with one address left the filter names it again.
    first = out["filter_after_first"]
    assert first["mode"] == "addresses"
    assert first["addresses"] == 1
    assert first["handles"] == 2
    assert out["echo"] == "still carried after the swap"
    other = out["other"]
    assert other["intact"]
    assert other["server_saw"] == [client_ip, other["client_port"]]
    assert out["diverted_other"] == 0
    assert out["all_gone"]
    assert out["filter_at_end"]["addresses"] == 0
    assert out["counts"]["expired"] == 2
    assert [a["peer"][0] for a in out["accepted"]] == [lab.b_ip4]


@pytest.mark.parametrize("family", [4, 6])
def test_dns_answers_on_the_wire_teach_the_address_set(veth_pair, family):
    server = veth_pair.b.popen(sys.executable, str(AGENTS / "redirect_server.py"), "dns",
                               stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        out = run_client(veth_pair.a, "dns", server_ip=veth_pair.b_ip4 if family == 4 else veth_pair.b_ip6)
    finally:
        server.kill()
        server.wait()
    assert out["replies"] == 4
    # api.openai.com (through a CNAME) is learned in both families; example.com is not,
    # and neither it nor bad.test (an answer cut short) is an AI name, so no query is kept.
    assert out["learned"] == ["10.77.0.1", "fd77::1"], out
    counts = out["counts"]
    assert counts["responses"] == 4, counts
    assert counts["queries"] == 2, counts
    assert counts["matched"] == 2, counts
    assert counts["unsolicited"] == counts["wrong_question"] == counts["pending"] == 0


@pytest.mark.parametrize("family", [4, 6])
def test_a_forged_dns_answer_without_a_query_teaches_nothing(veth_pair, family):
    lab = veth_pair
    """Forged with scapy in the server namespace: an answer nobody asked for and one with
    the wrong id are refused; one matching a query in flight (a forger on the path could
    send it) is believed, as is the real server's answer to a real query."""
    dns = lab.b.popen(sys.executable, str(AGENTS / "redirect_server.py"), "dns", stdout=subprocess.PIPE, text=True)
    server_ip, client_ip = (lab.b_ip4, lab.a_ip4) if family == 4 else (lab.b_ip6, lab.a_ip6)
    try:
        assert dns.stdout.readline().strip() == "ready"
        # An address the server namespace takes after its DNS server bound its own: a
        # query to it arrives there and goes unanswered.
        silent_ip = server_ip.rsplit(".", 1)[0] + ".9" if family == 4 else server_ip.rsplit(":", 1)[0] + ":9"
        ifname = lab.b.run("ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        lab.b.run("ip", "addr", "add", f"{silent_ip}/{24 if family == 4 else 64}", "dev", ifname,
                  *(["nodad"] if family == 6 else []))
        out = run_client(lab.a, "dns-spoof", server_ip=server_ip, silent_ip=silent_ip, client_ip=client_ip,
                         spoof_ns=lab.b.name)
    finally:
        dns.kill()
        dns.wait()
    spoofed = ["fd66::1", "fd66::2", "fd66::3"] if family == 6 else ["10.66.0.1", "10.66.0.2", "10.66.0.3"]
    real = "fd77::1" if family == 6 else "10.77.0.1"
    assert out["after_unsolicited"] == [], out
    assert out["after_wrong_id"] == [], out
    assert out["after_matching"] == [spoofed[2]]
    assert out["learned"] == sorted([spoofed[2], real])
    counts = out["counts"]
    assert counts["unsolicited"] == 2, counts
    assert counts["matched"] == 2, counts
    assert counts["responses"] == 4, counts


@pytest.mark.parametrize("family", [4, 6])
def test_a_whole_redirector_takes_a_server_once_dns_names_it_an_ai_endpoint(lab, family):
    server_ip, client_ip = (lab.b_ip4, lab.a_ip4) if family == 4 else (lab.b_ip6, lab.a_ip6)
    dns = lab.b.popen(sys.executable, str(AGENTS / "redirect_server.py"),
                      *agent_args("dns", answer_a=lab.b_ip4, answer_aaaa=lab.b_ip6),
                      stdout=subprocess.PIPE, text=True)
    try:
        assert dns.stdout.readline().strip() == "ready"
        out = run_client(lab.a, "learned", server_ip=server_ip)
    finally:
        dns.kill()
        dns.wait()
    before, after = out["before"], out["after"]
    assert before["server_saw"] == [client_ip, before["client_port"]]  # not known yet: untouched
    # Covered the moment the client had the answer: it was held until the filter named it.
    assert out["learned"], json.dumps(out["counters"]["dns"])  # the counters say what the watcher saw
    assert out["counters"]["dns"]["held"] >= 1
    assert [a["peer"] for a in out["accepted"]] == [[server_ip, after["client_port"]]]
    assert after["intact"]
    assert after["server_saw"] == [client_ip, out["accepted"][0]["upstream_port"]]
    assert out["counters"]["dns"]["learned"] >= 1
