"""The reflector's row-by-row path for small batches decides exactly as its vectorized path."""

from __future__ import annotations

import random
import socket

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from oisp.redirect import FlowTable, OwnPorts, TargetSet
from oisp.redirect import batch_decision
from oisp.redirect.reflector import Reflector
from tests.reflector_batch import SERVERS, Batch


def random_packets(rng: random.Random, count: int) -> tuple[list[bytes], list[bool]]:
    """At most one packet per connection in a batch: the vectorized path ORs
    the flags of a flow's packets in one batch, the row path applies them in order, and
    only with one packet per flow are both exact."""
    packets, outbound, seen = [], [], set()
    while len(packets) < count:
        family = rng.choice((4, 6))
        layer = IP if family == 4 else IPv6
        client = "10.200.1.1" if family == 4 else "fd00:1::1"
        server = rng.choice(SERVERS[family])
        flags = rng.choice(("S", "A", "PA", "FA", "R", "SA"))
        client_port = rng.choice((40000, 40001, 40002, 50000))  # 50000 is one of our own upstream ports
        to_server = rng.random() < 0.6
        flow = (server, client_port)
        if flow in seen:
            continue
        seen.add(flow)
        if to_server:  # client → server:443 (or another port)
            packet = layer(src=client, dst=server) / TCP(sport=client_port, dport=rng.choice((443, 443, 80)), flags=flags)
        else:  # the proxy's reply, from :8443 to the reflected peer
            packet = layer(src=client, dst=server) / TCP(sport=8443, dport=client_port, flags=flags)
        packets.append(bytes(packet / (b"x" * rng.randrange(0, 40))))
        outbound.append(rng.random() < 0.9)
    return packets, outbound


def run(packets, outbound, small: bool, monkeypatch) -> tuple:
    monkeypatch.setattr(batch_decision, "SMALL_BATCH", 10**6 if small else 0)
    own = OwnPorts()
    own.register(50000, socket.AF_INET)  # IPv4 alone: IPv6 packets from it are a client's
    reflector = Reflector(TargetSet([SERVERS[4][0], SERVERS[6][0]]), FlowTable(), own)
    results = []
    for batch_packets, batch_outbound in zip(packets, outbound):
        batch = Batch(batch_packets, batch_outbound)
        reflector.process(batch)
        results.append((batch.data.tobytes(), batch.verdicts.tolist(), batch.addresses["bits"].tolist()))
    flows = sorted((e.key, e.fin_from_client, e.fin_from_proxy, e.closed_at is not None)
                   for e in reflector.flows.entries())
    counts = {k: v for k, v in reflector.counts.items() if k != "batch_errors"}
    return results, flows, counts


@pytest.mark.parametrize("seed", range(20))
def test_small_path_equals_vectorized_path(seed, monkeypatch):
    rng = random.Random(seed)
    batches = [random_packets(rng, rng.randrange(1, 9)) for _ in range(40)]
    packets = [b[0] for b in batches]
    outbound = [b[1] for b in batches]
    small = run(packets, outbound, True, monkeypatch)
    vectorized = run(packets, outbound, False, monkeypatch)
    assert small[0] == vectorized[0]  # same bytes rewritten, same verdicts, same direction bits
    assert small[1] == vectorized[1]  # the same flows, in the same state
    assert small[2] == vectorized[2]
    assert small[2]["reflected_to_proxy"] + small[2]["reflected_to_client"] > 0  # the test exercises reflection
