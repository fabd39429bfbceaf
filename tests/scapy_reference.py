"""Reference results computed with scapy, for the packet tests to compare against."""

from __future__ import annotations

from scapy.packet import raw
from scapy.layers.inet import TCP, UDP


def scapy_rewritten(pkt, spec: dict) -> bytes:
    """The same rewrite done on the scapy object; scapy then computes every checksum in full."""
    ref = pkt.copy()
    if spec.get("swap_addresses"):
        ref.src, ref.dst = ref.dst, ref.src
    if spec.get("src_addr") is not None:
        ref.src = spec["src_addr"]
    if spec.get("dst_addr") is not None:
        ref.dst = spec["dst_addr"]
    upper = ref.getlayer(TCP) or ref.getlayer(UDP)
    if upper is not None:
        if spec.get("src_port", -1) >= 0:
            upper.sport = spec["src_port"]
        if spec.get("dst_port", -1) >= 0:
            upper.dport = spec["dst_port"]
    return raw(ref)
