"""WINDIVERT_ADDRESS: 80 bytes, the real offsets and bit positions.

Three independent descriptions must agree: our cffi declaration, our numpy
dtype, and pydivert's ctypes structure; and the backend's own filter
evaluator must read the flag bits where we write them.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from pydivert.windivert_dll.structs import WinDivertAddress as PydivertAddress
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from oisp._native._divert_cffi import ffi
from oisp.divert import address as A

UNION = 16
EXPECTED_OFFSETS = {  # absolute offsets, WinDivert 2.2 windivert.h
    "timestamp": 0, "bits": 8,
    "if_idx": 16, "sub_if_idx": 20,
    "endpoint_id": 16, "parent_endpoint_id": 24, "process_id": 32, "local_addr": 36, "remote_addr": 52,
    "local_port": 68, "remote_port": 70, "protocol": 72,
    "reflect_timestamp": 16, "reflect_process_id": 24, "reflect_layer": 28, "reflect_flags": 32,
    "reflect_priority": 40,
}


def test_sizes_are_80_bytes():
    assert ffi.sizeof("WINDIVERT_ADDRESS") == 80
    assert A.ADDRESS_DTYPE.itemsize == 80
    assert ctypes.sizeof(PydivertAddress) == 80


def test_numpy_offsets_match_windivert_h():
    assert {name: A.ADDRESS_DTYPE.fields[name][1] for name in EXPECTED_OFFSETS} == EXPECTED_OFFSETS


C_NAMES = {  # union member -> {C field: our numpy field}
    "NETWORK": {"IfIdx": "if_idx", "SubIfIdx": "sub_if_idx"},
    "FLOW": {"EndpointId": "endpoint_id", "ParentEndpointId": "parent_endpoint_id", "ProcessId": "process_id",
             "LocalAddr": "local_addr", "RemoteAddr": "remote_addr", "LocalPort": "local_port",
             "RemotePort": "remote_port", "Protocol": "protocol"},
    "REFLECT": {"Timestamp": "reflect_timestamp", "ProcessId": "reflect_process_id", "Layer": "reflect_layer",
                "Flags": "reflect_flags", "Priority": "reflect_priority"},
}
C_NAMES["SOCKET"] = C_NAMES["FLOW"]


@pytest.mark.parametrize("member", list(C_NAMES))
def test_cffi_offsets_match_numpy(member):
    c_type = ffi.typeof(f"WINDIVERT_DATA_{member}")
    assert [name for name, _ in c_type.fields] == list(C_NAMES[member])
    for c_name, ours in C_NAMES[member].items():
        assert UNION + ffi.offsetof(c_type, c_name) == A.ADDRESS_DTYPE.fields[ours][1], c_name
    assert ffi.offsetof("WINDIVERT_ADDRESS", "Timestamp") == 0


BITS = {
    "Sniffed": (A.SNIFFED, 16), "Outbound": (A.OUTBOUND, 17), "Loopback": (A.LOOPBACK, 18),
    "Impostor": (A.IMPOSTOR, 19), "IPv6": (A.IPV6, 20), "IPChecksum": (A.IP_CHECKSUM, 21),
    "TCPChecksum": (A.TCP_CHECKSUM, 22), "UDPChecksum": (A.UDP_CHECKSUM, 23),
}


@pytest.mark.parametrize("field", list(BITS))
def test_flag_bit_positions(field):
    mask, bit = BITS[field]
    assert mask == 1 << bit
    # cffi's bitfield, written through the C declaration, lands on that bit ...
    c_address = ffi.new("WINDIVERT_ADDRESS *")
    setattr(c_address, field, 1)
    assert np.frombuffer(ffi.buffer(c_address), dtype=A.ADDRESS_DTYPE)[0]["bits"] == mask
    # ... and so does pydivert's independent ctypes declaration.
    py_address = PydivertAddress()
    setattr(py_address, field, 1)
    assert np.frombuffer(bytes(py_address), dtype=A.ADDRESS_DTYPE)[0]["bits"] == mask


def test_layer_and_event_bits():
    c_address = ffi.new("WINDIVERT_ADDRESS *")
    c_address.Layer = 3
    c_address.Event = 5
    bits = np.frombuffer(ffi.buffer(c_address), dtype=A.ADDRESS_DTYPE)[0]["bits"]
    assert A.layer_of(bits) == 3
    assert A.event_of(bits) == 5


@pytest.mark.parametrize("flag, filter", [(A.OUTBOUND, "outbound"), (A.LOOPBACK, "loopback"), (A.IMPOSTOR, "impostor")])
def test_backend_reads_our_bits(flag, filter):
    """The backend's own filter evaluator sees each flag exactly where we set it."""
    from oisp.divert.filter import eval_filter

    packet = bytes(IP(src="10.1.0.1", dst="10.1.0.2") / TCP(sport=1234, dport=443))
    addresses = A.new_addresses(1)
    assert not eval_filter(filter, packet, addresses)
    addresses["bits"] = flag
    assert eval_filter(filter, packet, addresses)


def test_backend_reads_interface_index():
    from oisp.divert.filter import eval_filter

    packet = bytes(IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=1234, dport=443))
    addresses = A.new_addresses(1)
    addresses["bits"] = A.IPV6
    addresses["if_idx"] = 7
    addresses["sub_if_idx"] = 3
    assert eval_filter("ifIdx == 7 and subIfIdx == 3 and tcp.DstPort == 443", packet, addresses)
    assert not eval_filter("ifIdx == 8", packet, addresses)


def test_backend_requires_our_ipv6_bit_to_match_the_packet():
    """The backend checks the address's IPv6 flag against the packet: bit 20 is the one it reads."""
    from oisp.divert.filter import eval_filter

    v4 = bytes(IP(src="10.1.0.1", dst="10.1.0.2") / TCP(sport=1, dport=2))
    v6 = bytes(IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=1, dport=2))
    plain, flagged = A.new_addresses(1), A.new_addresses(1)
    flagged["bits"] = A.IPV6
    assert eval_filter("true", v4, plain)
    assert eval_filter("true", v6, flagged)
    for packet, address in ((v4, flagged), (v6, plain)):
        with pytest.raises(ValueError, match="IPv6 bit"):
            eval_filter("true", packet, address)


def test_flow_address_host_order_words():
    ipv4_mapped = [0x0A000001, 0x0000FFFF, 0, 0]  # ::ffff:10.0.0.1, least significant word first
    assert str(A.flow_address(ipv4_mapped)) == "10.0.0.1"
    assert str(A.flow_address([2, 0, 0, 0xFD000000])) == "fd00::2"


def test_set_flag_on_selected_rows():
    addresses = A.new_addresses(4)
    addresses["bits"] = A.LOOPBACK
    A.set_flag(addresses, A.OUTBOUND, [True, False, True, False])
    assert list(addresses["bits"]) == [A.LOOPBACK | A.OUTBOUND, A.LOOPBACK] * 2
    A.set_flag(addresses, A.LOOPBACK, False)
    assert list(addresses["bits"]) == [A.OUTBOUND, 0] * 2


def test_unmapped_is_the_one_ipv4_mapped_rule():
    import ipaddress

    assert A.unmapped("::ffff:10.0.0.1") == ipaddress.IPv4Address("10.0.0.1")  # a dual-stack socket's IPv4 peer
    assert A.unmapped(ipaddress.IPv6Address("::ffff:10.0.0.1")) == ipaddress.IPv4Address("10.0.0.1")
    assert A.unmapped("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")  # the zone is not part of the address
    assert A.unmapped("10.0.0.1") == ipaddress.IPv4Address("10.0.0.1")
    assert A.unmapped("::1") == ipaddress.IPv6Address("::1")  # IPv6 stays IPv6
    assert A.row_key("::ffff:10.0.0.1") == A.row_key("10.0.0.1") == bytes([10, 0, 0, 1]) + bytes(12)
