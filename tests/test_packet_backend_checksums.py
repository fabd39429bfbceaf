"""Our full checksum computation against the divert backend's own helper
(WinDivertHelperCalcChecksums / ebpfdivert_helper_calc_checksums).

One known difference is excluded: the backend treats any IPv6 fragment header
as a fragment and leaves the L4 checksum alone, even for an atomic fragment
(offset 0, M=0). RFC 6946 says an atomic fragment is a whole packet; we (and
scapy) compute its checksum.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from scapy.layers.inet6 import IPv6ExtHdrFragment
from scapy.packet import raw

from oisp.packet import compute_checksums, parse_batch, reflect
from tests.packet_strategies import packets

helpers = pytest.importorskip("oisp.divert.helpers")


def _blank_checksums(data: bytes) -> bytearray:
    """The packet with every checksum we know of set to a wrong value."""
    buf = bytearray(data)
    row = parse_batch(buf)[0]
    if int(row["ip_version"]) == 4:
        buf[10:12] = b"\xde\xad"
    field = {6: 16, 17: 6, 1: 2, 58: 2}.get(int(row["protocol"]))
    if field is not None and int(row["l4_header_len"]):
        at = int(row["l4_offset"]) + field
        buf[at : at + 2] = b"\xbe\xef"
    return buf


@settings(max_examples=300, deadline=None)
@given(packets())
def test_full_computation_equals_the_backend_helper(pkt):
    assume(not pkt.haslayer(IPv6ExtHdrFragment))
    buf = _blank_checksums(raw(pkt))
    theirs = helpers.calc_checksums(bytes(buf))
    compute_checksums(buf, parse_batch(buf, verify=False))
    assert bytes(buf) == theirs


@settings(max_examples=200, deadline=None)
@given(packets())
def test_incremental_reflection_leaves_nothing_for_the_backend_to_fix(pkt):
    assume(not pkt.haslayer(IPv6ExtHdrFragment))
    buf = bytearray(raw(pkt))
    reflect(buf, parse_batch(buf), None, src_port=443, dst_port=8443)
    assert helpers.calc_checksums(bytes(buf)) == bytes(buf)
