"""The reflector's per-batch decision (oisp/redirect/batch_decision.py) on its own: rows
and tables in, verdicts out, no handle and no Reflector; the rewrite checked by scapy."""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, TCP

from oisp.divert.address import OUTBOUND
from oisp.divert.engine import Verdict
from oisp.redirect import FlowTable, OwnPorts, TargetSet
from oisp.redirect import batch_decision
from oisp.redirect.batch_decision import BatchDecider, PortMap, apply
from oisp.redirect.flows import FlowEntry, key_address
from tests.reflector_batch import SERVERS, Batch

AI, OTHER = SERVERS[4]
CLIENT, OWN_PORT = "10.200.1.1", 50000


def decider() -> BatchDecider:
    own = OwnPorts()
    own.register(OWN_PORT, socket.AF_INET)
    return BatchDecider(PortMap({443: 8443}), own, TargetSet([AI]))


def opener(flows: FlowTable, asked: list, take: bool):
    """The reflector's part: open a client's SYN's flow, or refuse it."""
    def syn(rows, row, key):
        asked.append(key)
        if take:
            flows.open(FlowEntry(key_address(rows["src_addr"][row].tobytes(), 4), key[1], key_address(key[0], 4),
                                 443, key[2]))
        return take
    return syn


@pytest.fixture(params=[True, False], ids=["row by row", "vectorised"])
def small(request, monkeypatch):
    monkeypatch.setattr(batch_decision, "SMALL_BATCH", 10**6 if request.param else 0)


def packets(*specs) -> Batch:
    built = [bytes(IP(src=CLIENT, dst=dst) / TCP(sport=sport, dport=dport, flags=flags) / b"x")
             for dst, sport, dport, flags in specs]
    return Batch(built, [True] * len(built))


def test_a_taken_syn_and_the_proxys_reply_are_reflected(small):
    flows = FlowTable()
    decide, asked = decider(), []
    batch = packets((AI, 40000, 443, "S"), (OTHER, 40001, 443, "S"), (CLIENT, OWN_PORT, 443, "S"))
    verdicts = decide.decide(batch.rows, batch.outbound(), flows.seen, opener(flows, asked, True))
    assert verdicts.own_upstream == 1  # the proxy's own upstream passes, and is counted
    assert asked == [(bytes(batch.rows["dst_addr"][0]), 40000, 8443)]  # not asked for a non-AI address
    assert apply(batch, verdicts) == (1, 0)
    assert batch.verdicts.tolist() == [Verdict.MODIFIED, 0, 0]
    assert batch.addresses["bits"].tolist()[0] & OUTBOUND == 0  # re-injected as arriving
    got = IP(batch.data.tobytes()[:len(bytes(IP(src=CLIENT, dst=AI) / TCP() / b"x"))])
    assert (got.src, got.dst, got[TCP].sport, got[TCP].dport) == (AI, CLIENT, 40000, 8443)

    reply = Batch([bytes(IP(src=CLIENT, dst=AI) / TCP(sport=8443, dport=40000, flags="SA"))], [True])
    verdicts = decide.decide(reply.rows, reply.outbound(), flows.seen, opener(flows, asked, True))
    assert apply(reply, verdicts) == (0, 1)
    got = IP(reply.data.tobytes())
    assert (got.src, got.dst, got[TCP].sport, got[TCP].dport) == (AI, CLIENT, 443, 40000)


def test_a_refused_syn_and_an_unknown_flow_are_left_alone(small):
    flows = FlowTable()
    decide, asked = decider(), []
    batch = packets((AI, 40000, 443, "S"), (AI, 40002, 443, "PA"))
    original = batch.data.tobytes()
    verdicts = decide.decide(batch.rows, batch.outbound(), flows.seen, opener(flows, asked, False))
    assert len(asked) == 1 and verdicts.taken is None and apply(batch, verdicts) == (0, 0)
    assert batch.data.tobytes() == original and batch.verdicts.tolist() == [0, 0]
    assert len(flows) == 0
