"""The backend's own packet helpers, used as an independent reference in tests
and by callers who want WinDivert's exact behaviour."""

from __future__ import annotations

from oisp.divert.address import OUTBOUND, new_addresses
from oisp.divert.constants import ChecksumFlag


def calc_checksums(packet: bytes, flags: int = ChecksumFlag.ALL, *, outbound: bool = True) -> bytes:
    """`packet` with its checksums recomputed by WinDivertHelperCalcChecksums /
    ebpfdivert_helper_calc_checksums."""
    from oisp.divert.backend import get_backend

    buf = bytearray(packet)
    address = new_addresses(1)
    if outbound:
        address["bits"] = OUTBOUND
    if not get_backend().calc_checksums(buf, len(buf), address, int(flags)):
        raise ValueError("the backend could not parse this packet to compute its checksums")
    return bytes(buf)


def hash_packet(packet: bytes, seed: int = 0) -> int:
    """WinDivertHelperHashPacket: a 64-bit hash of the packet's headers."""
    from oisp.divert.backend import get_backend

    return get_backend().hash_packet(packet, len(packet), seed)
