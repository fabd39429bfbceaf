"""Faults injected into a real Redirector, run in the client namespace; prints one JSON object.

usage: failopen_agent.py reflector-fault --server-ip IP --other-ip IP --fault method|popen
    a Redirector (targets = {SERVER_IP}) and the small proxy of redirect_client.py; an AI
    connection goes through the proxy; then a fault inside the reflector thread: `method`
    makes one of its periodic steps raise, `popen` makes the guardian's Popen fail at the
    handle swap that OTHER_IP becoming an AI address asks for. Then a connection to
    SERVER_IP:443 again, and the eBPFDivert filters left in this namespace.
usage: failopen_agent.py dns-fault --dns-ip IP
    a Redirector watching DNS (answers held until diverted); learning raises on the
    first answer; how long the next answer takes, and whether the DNS handle is closed.
"""

import argparse
import json
import socket
import subprocess
import sys
import time

from redirect_client import PROXY_PORT, Proxy, exchange, wait_until

from oisp.redirect import Redirector
from oisp.redirect.dns import TYPE_A, build_query


def divert_filters():
    """The BPF filters on every interface here, as tc itself lists them."""
    found = []
    for _, name in socket.if_nameindex():
        for direction in ("ingress", "egress"):
            shown = subprocess.run(["tc", "-j", "filter", "show", "dev", name, direction],
                                   capture_output=True, text=True, check=True)
            found += [f for f in json.loads(shown.stdout or "[]") if "options" in f and f["kind"] == "bpf"]
    return found


def injected(*args, **kwargs):
    raise RuntimeError("injected fault")


def failure_of(redirector):
    return getattr(redirector, "failure", None)  # None on a tree that has no such record


def scenario_reflector_fault(server_ip, other_ip, fault):
    with Redirector(proxy_ports={443: PROXY_PORT}, addresses=[server_ip], resolve=False, sniff_dns=False,
                    process_events=False) as redirector:
        proxy = Proxy(redirector.flows, redirector.own_ports)
        out = {"before": exchange(server_ip, 443, b"through the proxy"), "filters_before": len(divert_filters())}
        if fault == "method":
            redirector.reflector.mirror.take_touched = injected  # it runs once a second in the reflector thread
        else:
            popen, subprocess.Popen = subprocess.Popen, injected
            redirector.targets.add([other_ip])  # the reflector thread swaps in a handle: a new guardian
        out["failed"] = wait_until(lambda: failure_of(redirector) is not None, 5.0)
        if fault == "popen":
            subprocess.Popen = popen
        out["failure"] = failure_of(redirector)
        out["after"] = exchange(server_ip, 443, b"straight to the server")
        out["filters_after"] = len(divert_filters())
        out["accepted"] = len(proxy.accepted)
    json.dump(out, sys.stdout)


def scenario_dns_fault(dns_ip):
    with Redirector(proxy_ports={443: PROXY_PORT}, resolve=False, process_events=False) as redirector:
        redirector.dns.learn = injected
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(3)
        sock.sendto(build_query("api.openai.com", TYPE_A, query_id=1), (dns_ip, 53))
        sock.recvfrom(2048)
        out = {"failed": wait_until(lambda: failure_of(redirector) is not None, 3.0)}
        start = time.monotonic()
        sock.sendto(build_query("api.openai.com", TYPE_A, query_id=2), (dns_ip, 53))
        sock.recvfrom(2048)
        out["second_answer_after"] = time.monotonic() - start
        out["failure"] = failure_of(redirector)
        out["dns_handle_open"] = redirector.dns.engine.handle.is_open
    json.dump(out, sys.stdout)


def parse(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Faults injected into a real Redirector; prints one JSON object.")
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    reflector = scenarios.add_parser("reflector-fault", help="a fault inside the reflector thread")
    reflector.add_argument("--server-ip", required=True, help="the AI server's address")
    reflector.add_argument("--other-ip", required=True, help="an address that becomes an AI endpoint")
    reflector.add_argument("--fault", choices=["method", "popen"], required=True)
    dns = scenarios.add_parser("dns-fault", help="learning from a DNS answer raises")
    dns.add_argument("--dns-ip", required=True, help="the DNS server's address")
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    options = parse()
    (scenario_reflector_fault if options.pop("scenario") == "reflector-fault" else scenario_dns_fault)(**options)
