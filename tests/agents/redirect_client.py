"""The client side of the redirect tests, run in the client namespace; prints one JSON object.

usage: redirect_client.py e2e --server-ip IP --other-ip IP [--exclude-child] [--events] [--python-path] [--port-filter]
    the reflector (targets = {SERVER_IP}) and a small transparent proxy on :8443 that
    looks each accepted socket up in the flow table and dials the original destination
    through connect_upstream; then: an AI connection (data round trip, clean close),
    one ended by RST, one to OTHER_IP:443 and one to SERVER_IP:444 (both not AI), and
    optionally a connection from an excluded child process; python-path turns the ring's
    fast path off, so every packet is decided in Python; port-filter makes the handle's
    filter name the server port alone, not the AI addresses.
usage: redirect_client.py bound --server-ip IP --source-port PORT [--python-path]
    the reflector and proxy as for e2e; one AI connection from a client bound to
    SOURCE_PORT
usage: redirect_client.py swap --server-ip IP --other-ip IP [--python-path]
    the reflector knows SERVER_IP; an AI connection is half way through its data when
    OTHER_IP becomes an AI address too (a new handle takes over); then a connection to
    OTHER_IP:443.
usage: redirect_client.py swap-flood --server-ip IP
    48 new AI addresses, one every 80 ms: how many handle swaps that cost
usage: redirect_client.py dns --server-ip IP
    a DnsSniffer; hand-built queries to SERVER_IP:53; which addresses were learned
usage: redirect_client.py dns-spoof --server-ip IP --silent-ip IP --client-ip IP --spoof-ns NS
    a DnsSniffer; forged answers sent from SPOOF_NS by scapy (unsolicited, wrong id,
    matching a query to SILENT_IP, where nothing answers); then a real query to SERVER_IP:53
usage: redirect_client.py overflow --server-ip IP --other-ip IP
    a reflector allowed one address in its filter, given two: it filters by port;
    a third address opens no new handle; SERVER_IP:443 is still taken
usage: redirect_client.py expire --server-ip IP --other-ip IP
    both learned (not given), address_ttl 1 s, one address fits the filter: ports first;
    an open flow to SERVER_IP keeps it while OTHER_IP is let go (back to an address
    filter); OTHER_IP:443 is then untouched; once the flow ends SERVER_IP goes too
usage: redirect_client.py swap-kill --server-ip IP --other-ip IP --result-path FILE --when mid-swap|after-swap
    a child process opens an AI connection and waits on it; OTHER_IP becomes an AI
    address (a successor handle takes over); then, at once or once the old handle is
    closed, this process SIGKILLs itself. The
    child writes to RESULT_FILE when and how its connection ended.
usage: redirect_client.py syn-kill --server-ip IP --result-path FILE
    the ring opens a child's AI connection on its SYN, but the flow table never adopts
    it (adoption is held up); then this process SIGKILLs itself. The child writes to
    RESULT_FILE when and how its connection ended.
usage: redirect_client.py learned --server-ip IP
    a whole Redirector knowing no address: a connection to SERVER_IP:443 before and after
    SERVER_IP:53 answers api.openai.com with SERVER_IP
"""

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from oisp.redirect import FlowTable, OwnPorts, ProcessFilter, ProcessResolver, Reflector, TargetSet
from oisp.redirect import connect_upstream

PROXY_PORT = 8443
CHILD = """
import socket, sys
sys.stdin.readline()
c = socket.create_connection((sys.argv[1], 443), timeout=5)
print(c.makefile().readline().strip(), c.getsockname()[1], flush=True)
c.close()
"""


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


class Proxy:
    """Accepts reflected connections, records what it saw, relays to the original server."""

    def __init__(self, flows, own_ports):
        self.flows, self.own_ports = flows, own_ports
        self.accepted = []
        self.server = socket.create_server(("::", PROXY_PORT), family=socket.AF_INET6, dualstack_ipv6=True)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            conn, peer = self.server.accept()
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, conn, peer):
        entry = self.flows.lookup(peer[0], peer[1], conn.getsockname()[1])
        seen = {"peer": [peer[0].removeprefix("::ffff:"), peer[1]], "entry": None,
                "from_ring": entry is not None and entry.from_ring}
        self.accepted.append(seen)
        if entry is None:
            conn.close()
            return
        seen["entry"] = {"server": str(entry.server_addr), "server_port": entry.server_port,
                         "client": str(entry.client_addr), "client_port": entry.client_port, "pid": entry.pid}
        upstream = connect_upstream(str(entry.server_addr), entry.server_port, self.own_ports)
        seen["upstream_port"] = upstream.getsockname()[1]
        pump = threading.Thread(target=relay, args=(upstream, conn), daemon=True)
        pump.start()
        relay(conn, upstream)
        pump.join(10)
        conn.close()
        self.own_ports.close(upstream)


def relay(src, dst):
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass  # a reset: pass the end on all the same
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def exchange(host, port, payload=b"", source_port=0):
    c = socket.create_connection((host, port), timeout=5, source_address=("", source_port) if source_port else None)
    client_port = c.getsockname()[1]
    reader = c.makefile("rb")
    peer_line = reader.readline().decode().split()
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    echoed = reader.read()
    reader.close()
    c.close()
    return {"client_port": client_port, "server_saw": [peer_line[1], int(peer_line[2])],
            "intact": echoed == payload, "echoed": len(echoed)}


def scenario_e2e(server_ip, other_ip, exclude_child=False, events=False, python_path=False, port_filter=False):
    targets = TargetSet([server_ip])
    resolver = ProcessResolver()
    events = events and resolver.start_events()
    flows = FlowTable(linger=0.3, owner=resolver.owner)
    own_ports = OwnPorts()
    child = None
    exclude = []
    if exclude_child:
        child = subprocess.Popen([sys.executable, "-c", CHILD, server_ip], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        exclude = [child.pid]
    proxy = Proxy(flows, own_ports)
    out = {"me": os.getpid(), "events": events, "events_error": resolver.events_error,
           "process_filter": bool(exclude)}
    with Reflector(targets, flows, own_ports, ports={443: PROXY_PORT}, processes=resolver,
                   process_filter=ProcessFilter(exclude=exclude), fast_path=not python_path,
                   address_filter=not port_filter) as reflector:
        payload = os.urandom(300_000)
        out["ai"] = exchange(server_ip, 443, payload)
        out["flows_after_ai"] = len(flows)
        out["flows_empty_after_fin"] = wait_until(lambda: len(flows) == 0, 3.0)

        c = socket.create_connection((server_ip, 443), timeout=5)
        c.makefile("rb").readline()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        out["rst_client_port"] = c.getsockname()[1]
        out["flows_before_rst"] = len(flows)
        c.close()  # SO_LINGER 0: an RST, not a FIN
        out["flows_empty_after_rst"] = wait_until(lambda: len(flows) == 0, 3.0)

        received = reflector.counters()["engine"]["received"]
        out["other_address"] = exchange(other_ip, 443, b"hello other")
        out["diverted_other"] = reflector.counters()["engine"]["received"] - received
        out["other_port"] = exchange(server_ip, 444, b"hello 444")
        if child is not None:
            line, _ = child.communicate("go\n", timeout=10)
            saw_host, saw_port, child_port = line.split()[1:]
            out["child"] = {"pid": child.pid, "server_saw": [saw_host, int(saw_port)], "client_port": int(child_port)}
        time.sleep(0.3)
        out["accepted"] = proxy.accepted
        out["counters"] = reflector.counters()
        out["own_ports_left"] = len(own_ports)
        out["named_by"] = dict(resolver.counts)
        out["reflector_error"] = repr(reflector.error) if reflector.error else None
    resolver.stop()
    json.dump(out, sys.stdout)


def scenario_bound(server_ip, source_port, python_path=False):
    """A client that binds its own source port (one above the ephemeral range, which the
    filter once left to the proxy's upstream sockets) is reflected like any other."""
    targets = TargetSet([server_ip])
    flows = FlowTable(linger=0.3)
    own_ports = OwnPorts()
    proxy = Proxy(flows, own_ports)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        out = {"ephemeral": [int(v) for v in f.read().split()]}
    with Reflector(targets, flows, own_ports, ports={443: PROXY_PORT},
                   fast_path=not python_path) as reflector:
        out["bound"] = exchange(server_ip, 443, os.urandom(100_000), source_port=source_port)
        wait_until(lambda: len(flows) == 0, 3.0)
        out["accepted"] = proxy.accepted
        out["counters"] = reflector.counters()
        out["own_ports_left"] = len(own_ports)
        out["reflector_error"] = repr(reflector.error) if reflector.error else None
    json.dump(out, sys.stdout)


def scenario_swap_flood(server_ip):
    """New AI addresses one every 80 ms for about 4 s (as a stream of DNS answers
    could bring them): the reflector swaps handles within its budget, covers them all
    in the end, and a connection to SERVER_IP is still taken."""
    targets = TargetSet([server_ip])
    flows = FlowTable(linger=0.3)
    own_ports = OwnPorts()
    proxy = Proxy(flows, own_ports)
    with Reflector(targets, flows, own_ports, ports={443: PROXY_PORT}) as reflector:
        start = time.monotonic()
        for i in range(48):
            targets.add([f"192.0.2.{i + 1}"])
            time.sleep(0.08)
        out = {"flood_seconds": time.monotonic() - start}
        out["covered"] = reflector.wait_covered(timeout=5.0)
        out["seconds"] = time.monotonic() - start
        out["ai"] = exchange(server_ip, 443, b"taken after the flood")
        time.sleep(0.2)
        out["accepted"] = len(proxy.accepted)
        out["counters"] = reflector.counters()
        out["reflector_error"] = repr(reflector.error) if reflector.error else None
    json.dump(out, sys.stdout)


def scenario_swap(server_ip, other_ip, python_path=False):
    targets = TargetSet([server_ip])
    flows = FlowTable(linger=0.3)
    own_ports = OwnPorts()
    proxy = Proxy(flows, own_ports)
    out = {}
    with Reflector(targets, flows, own_ports, ports={443: PROXY_PORT},
                   fast_path=not python_path) as reflector:
        payload = os.urandom(4_000_000)
        c = socket.create_connection((server_ip, 443), timeout=5)
        reader = c.makefile("rb")
        reader.readline()
        echoed = []
        echo = threading.Thread(target=lambda: echoed.append(reader.read()), daemon=True)
        echo.start()

        def send():  # paced, so packets are in flight in the old handle when it hands over
            for i in range(0, len(payload), 16_384):
                c.sendall(payload[i:i + 16_384])
                time.sleep(0.004)  # about 1 s in all
            c.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(0.2)
        targets.add([other_ip])
        out["covered"] = reflector.wait_covered(timeout=3.0)
        out["sending_at_swap"] = sender.is_alive()
        sender.join(30)
        echo.join(30)
        c.close()
        out["first"] = {"intact": echoed == [payload], "echoed": len(echoed[0]) if echoed else None}
        out["other"] = exchange(other_ip, 443, b"hello, now an AI endpoint")
        time.sleep(0.3)
        out["accepted"] = proxy.accepted
        out["counters"] = reflector.counters()
        out["reflector_error"] = repr(reflector.error) if reflector.error else None
    json.dump(out, sys.stdout)


def scenario_overflow(server_ip, other_ip):
    targets = TargetSet([server_ip, "192.0.2.1"])
    flows = FlowTable(linger=0.3)
    own_ports = OwnPorts()
    proxy = Proxy(flows, own_ports)
    with Reflector(targets, flows, own_ports, ports={443: PROXY_PORT}, max_filter_addresses=1) as reflector:
        out = {"filter_at_start": dict(reflector.counters()["filter"])}
        targets.add(["192.0.2.2"])
        out["covered"] = reflector.wait_covered(timeout=1.0)
        out["ai"] = exchange(server_ip, 443, b"through the port filter")
        received = reflector.counters()["engine"]["received"]
        out["other"] = exchange(other_ip, 443, b"diverted, passed in the ring")
        out["diverted_other"] = reflector.counters()["engine"]["received"] - received
        time.sleep(0.2)
        out["accepted"] = proxy.accepted
        out["counters"] = reflector.counters()
    json.dump(out, sys.stdout)


def scenario_expire(server_ip, other_ip):
    targets = TargetSet()
    targets.add([server_ip, other_ip])
    flows = FlowTable(linger=0.3)
    own_ports = OwnPorts()
    proxy = Proxy(flows, own_ports)
    with Reflector(targets, flows, own_ports, ports={443: PROXY_PORT}, max_filter_addresses=1,
                   address_ttl=1.0) as reflector:
        out = {"mode_at_start": reflector.counters()["filter"]["mode"]}
        c = socket.create_connection((server_ip, 443), timeout=5)
        reader = c.makefile("rb")
        reader.readline()
        out["kept_while_open"] = wait_until(lambda: reflector.filter["handles"] == 2, 5.0) and \
            list(map(str, targets.addresses())) == [server_ip]
        out["filter_after_first"] = dict(reflector.counters()["filter"])
        c.sendall(b"still carried after the swap")
        c.shutdown(socket.SHUT_WR)
        out["echo"] = reader.read().decode()
        c.close()
        wait_until(lambda: len(flows) == 0, 3.0)  # its last packets are not counted below
        received = reflector.counters()["engine"]["received"]
        out["other"] = exchange(other_ip, 443, b"no longer an AI address")
        out["diverted_other"] = reflector.counters()["engine"]["received"] - received
        out["all_gone"] = wait_until(lambda: reflector.filter["handles"] == 3, 6.0) and len(targets) == 0
        out["filter_at_end"] = dict(reflector.counters()["filter"])
        out["accepted"] = proxy.accepted
        out["counts"] = dict(targets.counts)
        out["reflector_error"] = repr(reflector.error) if reflector.error else None
    json.dump(out, sys.stdout)


WAITER = """
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], 443), timeout=30)
if sys.argv[3:] != ["no-greeting"]:
    c.makefile("rb").readline()
print("connected", flush=True)
try:
    outcome = "data" if c.recv(100) else "eof"
except OSError as e:
    outcome = type(e).__name__
json.dump({"ended_at": time.time(), "outcome": outcome}, open(sys.argv[2], "w"))
"""


def scenario_swap_kill(server_ip, other_ip, result_path, when):
    targets = TargetSet([server_ip])
    flows = FlowTable()
    own_ports = OwnPorts()
    proxy = Proxy(flows, own_ports)
    reflector = Reflector(targets, flows, own_ports, ports={443: PROXY_PORT}).start()
    # Its own session, so it outlives us; it waits on a connection our proxy carries.
    # (stderr too: an inherited pipe would keep the test waiting for this child, not for us.)
    child = subprocess.Popen([sys.executable, "-c", WAITER, server_ip, result_path], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    connected = child.stdout.readline().strip() == "connected"
    targets.add([other_ip])
    covered = reflector.wait_covered(timeout=3.0)  # the successor is current; the old one hands over
    out = {"connected": connected, "covered": covered, "handles": reflector.filter["handles"],
           "accepted": len(proxy.accepted)}
    if when == "after-swap":
        wait_until(lambda: reflector.counters()["filter"]["live"] == 1, 3.0)
        out["live"] = reflector.counters()["filter"]["live"]
    print(json.dumps(out), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def scenario_syn_kill(server_ip, result_path):
    targets = TargetSet([server_ip])
    flows = FlowTable()
    own_ports = OwnPorts()
    Proxy(flows, own_ports)  # listens on PROXY_PORT from its own thread, for the whole scenario
    reflector = Reflector(targets, flows, own_ports, ports={443: PROXY_PORT}).start()
    reflector.mirror.lock.acquire()  # nothing the ring opens is adopted: only the ring knows the flow
    child = subprocess.Popen([sys.executable, "-c", WAITER, server_ip, result_path, "no-greeting"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    connected = child.stdout.readline().strip() == "connected"  # the handshake went through the ring
    out = {"connected": connected, "opened": reflector.engine.ring.fast.opened, "flows": len(flows)}
    print(json.dumps(out), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def scenario_learned(server_ip):
    from oisp.redirect import Redirector
    from oisp.redirect.dns import TYPE_A, TYPE_AAAA, build_query

    with Redirector(proxy_ports={443: PROXY_PORT}, resolve=False) as redirector:
        proxy = Proxy(redirector.flows, redirector.own_ports)
        before = exchange(server_ip, 443, b"before")
        sock = socket.socket(socket.AF_INET6 if ":" in server_ip else socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(3)
        sock.sendto(build_query("api.openai.com", TYPE_AAAA if ":" in server_ip else TYPE_A), (server_ip, 53))
        sock.recvfrom(2048)
        # No waiting: the answer was held until the reflector's filter named the address.
        learned = server_ip in redirector.targets and redirector.reflector.covers(redirector.targets.generation)
        after = exchange(server_ip, 443, b"after")
        time.sleep(0.2)
        json.dump({"before": before, "learned": learned, "after": after, "accepted": proxy.accepted,
                   "notes": redirector.notes, "counters": redirector.counters()}, sys.stdout, default=str)


def scenario_dns(server_ip):
    from oisp.redirect import DnsSniffer
    from oisp.redirect.dns import TYPE_A, TYPE_AAAA, build_query
    from oisp.spec import default_spec

    targets = TargetSet()
    sniffer = DnsSniffer(targets, default_spec().matches_host)
    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(3)
    replies = 0
    for i, (name, qtype) in enumerate([("api.openai.com", TYPE_A), ("api.openai.com", TYPE_AAAA),
                                       ("example.com", TYPE_A), ("bad.test", TYPE_A)]):
        sock.sendto(build_query(name, qtype, query_id=i + 1), (server_ip, 53))
        sock.recvfrom(2048)
        replies += 1
    wait_until(lambda: sniffer.counts["responses"] >= 4, 3.0)
    sniffer.stop()
    json.dump({"replies": replies, "learned": sorted(map(str, targets.addresses())), "counts": sniffer.counters()},
              sys.stdout)


def scenario_dns_spoof(server_ip, silent_ip, client_ip, spoof_ns):
    """Forged answers from SPOOF_NS (scapy): one nobody asked for; one to a query in
    flight with the wrong id; one with the right id (on the path, a forger can match
    a query: that is believed). Then a real query and answer from SERVER_IP."""
    from oisp.redirect import DnsSniffer
    from oisp.redirect.dns import TYPE_A, TYPE_AAAA, build_query
    from oisp.spec import default_spec

    v6 = ":" in server_ip
    spoofed = ["fd66::1", "fd66::2", "fd66::3"] if v6 else ["10.66.0.1", "10.66.0.2", "10.66.0.3"]
    targets = TargetSet()
    sniffer = DnsSniffer(targets, default_spec().matches_host)
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("::" if v6 else "0.0.0.0", 0))
    sock.settimeout(3)
    port = sock.getsockname()[1]
    agents = os.path.dirname(os.path.abspath(__file__))

    def spoof(src, query_id, address, seen):
        subprocess.run(["ip", "netns", "exec", spoof_ns, sys.executable, os.path.join(agents, "dns_spoof.py"),
                        "--src", src, "--dst", client_ip, "--port", str(port), "--query-id", str(query_id),
                        "--address", address], check=True, timeout=60)
        sock.recvfrom(2048)  # it reached the client, as a forged answer would
        wait_until(lambda: sniffer.counts["responses"] >= seen, 3.0)  # and the watcher saw it
        return sorted(map(str, targets.addresses()))

    qtype = TYPE_AAAA if v6 else TYPE_A
    out = {"after_unsolicited": spoof(server_ip, 7, spoofed[0], 1)}  # no query at all
    sock.sendto(build_query("api.openai.com", qtype, query_id=8), (silent_ip, 53))  # nothing answers there
    out["after_wrong_id"] = spoof(silent_ip, 9, spoofed[1], 2)
    out["after_matching"] = spoof(silent_ip, 8, spoofed[2], 3)  # the query's id, endpoints and question
    sock.sendto(build_query("api.openai.com", qtype, query_id=10), (server_ip, 53))
    sock.recvfrom(2048)
    wait_until(lambda: sniffer.counts["responses"] >= 4, 3.0)
    sniffer.stop()
    out.update(learned=sorted(map(str, targets.addresses())), counts=sniffer.counters())
    json.dump(out, sys.stdout)


SCENARIOS = {"e2e": scenario_e2e, "bound": scenario_bound, "swap": scenario_swap, "swap-flood": scenario_swap_flood,
             "dns": scenario_dns, "dns-spoof": scenario_dns_spoof, "overflow": scenario_overflow,
             "expire": scenario_expire, "swap-kill": scenario_swap_kill, "syn-kill": scenario_syn_kill,
             "learned": scenario_learned}


def parse(argv=None) -> dict:
    """The scenario and its options (this module's docstring says what each does)."""
    parser = argparse.ArgumentParser(description="The client side of the redirect tests; prints one JSON object.")
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    for name in SCENARIOS:
        scenario = scenarios.add_parser(name)
        scenario.add_argument("--server-ip", required=True, help="the AI server's address")
        if name in ("e2e", "swap", "overflow", "expire", "swap-kill"):
            scenario.add_argument("--other-ip", required=True, help="an address that is not (yet) an AI endpoint")
        if name in ("e2e", "bound", "swap"):
            scenario.add_argument("--python-path", action="store_true", help="the ring's fast path off")
    e2e = scenarios.choices["e2e"]
    e2e.add_argument("--exclude-child", action="store_true", help="a child process the reflector must not take")
    e2e.add_argument("--events", action="store_true", help="the SOCKET/FLOW events feed too (needs cgroup2)")
    e2e.add_argument("--port-filter", action="store_true", help="the handle's filter names the port alone")
    scenarios.choices["bound"].add_argument("--source-port", type=int, required=True)
    for name in ("swap-kill", "syn-kill"):
        scenarios.choices[name].add_argument("--result-path", required=True, help="where the child writes its end")
    scenarios.choices["swap-kill"].add_argument("--when", choices=["mid-swap", "after-swap"], required=True)
    spoof = scenarios.choices["dns-spoof"]
    spoof.add_argument("--silent-ip", required=True, help="where nothing answers")
    spoof.add_argument("--client-ip", required=True)
    spoof.add_argument("--spoof-ns", required=True, help="the namespace the forged answers come from")
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    options = parse()
    SCENARIOS[options.pop("scenario")](**options)
