"""A real divert handle in a test namespace: batched receive, re-inject, addresses.

The packets the handle returns are checked with scapy, the batch boundaries
with each IP header's length, and delivery at the receiving socket.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6

from oisp.divert.address import IMPOSTOR, IP_CHECKSUM, IPV6, LOOPBACK, OUTBOUND, SNIFFED, layer_of
from tests.netns import agent_args

AGENT = str(Path(__file__).parent / "agents" / "divert_roundtrip.py")

pytestmark = pytest.mark.privileged


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("max_packets", [1, 7, 255])
def test_batches_roundtrip_every_datagram(netns, family, max_packets):
    count = 60
    result = json.loads(netns.python(AGENT, *agent_args(family=family, count=count, max_packets=max_packets)).stdout)

    # Every datagram was diverted, re-injected, and delivered exactly once, in order.
    assert result["delivered"] == result["sent"]
    assert len(result["packets"]) == count
    for nbytes, n, split_end in result["batches"]:
        assert 1 <= n <= max_packets
        assert split_end == nbytes  # the IP lengths tile the batch exactly

    layer_cls = IP if family == 4 else IPv6
    for raw_hex, sent_hex in zip(result["packets"], result["sent"]):
        raw = bytes.fromhex(raw_hex)
        packet = layer_cls(raw)
        assert packet[UDP].dport == 40000
        assert bytes(packet[UDP].payload) == bytes.fromhex(sent_hex)
        assert len(raw) == (packet.len if family == 4 else 40 + packet.plen)

    for bits in result["bits"]:
        assert layer_of(bits) == 0
        # loopback traffic is seen as outbound
        assert bits & OUTBOUND
        assert bits & LOOPBACK
        assert not bits & (SNIFFED | IMPOSTOR)
        assert bool(bits & IPV6) == (family == 6)
        if family == 6:
            assert not bits & IP_CHECKSUM
