"""Truncated, garbage and oversized input: a clear error or an invalid row,
never a crash, never a read or write past the end.

Buffers that must not be overrun are placed so they end exactly at a
PROT_NONE guard page: any access past the end kills the test run (SIGSEGV)
instead of silently reading neighbouring heap memory.
"""

from __future__ import annotations

import ctypes
import mmap
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.packet import raw

from oisp.packet import (
    BAD_EXTENSION_HEADER,
    BAD_HEADER_LENGTH,
    BAD_L4_HEADER,
    BAD_TOTAL_LENGTH,
    BAD_VERSION,
    FIRST_PACKET_ERROR,
    L4_TRUNCATED,
    OK,
    PACKET_DTYPE,
    TRUNCATED,
    compute_checksums,
    parse_batch,
    reflect,
    split_batch,
    verify_checksums,
)

SAMPLES = [
    raw(IP(src="10.0.0.1", dst="10.0.0.2", options=b"\x01\x01\x01\x00") / TCP(sport=1, dport=443,
                                                                              options=[("MSS", 1460)]) / b"hello"),
    raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=53, dport=5353) / b"odd"),
    raw(IP(src="10.0.0.1", dst="10.0.0.2") / ICMP() / b"ping"),
    raw(IPv6(src="fd00::1", dst="fd00::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=2, dport=80) / b"x"),
    raw(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=3, dport=4)),
    raw(IPv6(src="fd00::1", dst="fd00::2") / ICMPv6EchoRequest(data=b"abc")),
]
BATCH = b"".join(SAMPLES)
PROT_NONE = 0  # POSIX value; the mmap module does not export it


class GuardedBuffer:
    """A writable region whose last usable byte sits just before a PROT_NONE page."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        page = mmap.PAGESIZE
        self.size = (capacity + page - 1) // page * page
        self._map = mmap.mmap(-1, self.size + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self._map)  # pins the mapping while we use it
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(ctypes.addressof(self._anchor) + self.size, page, PROT_NONE) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        self._view = memoryview(self._map)

    def holding(self, data: bytes) -> memoryview:
        """A view of exactly len(data) bytes, ending at the guard page."""
        start = self.size - len(data)
        self._view[start : self.size] = data
        return self._view[start : self.size]


@pytest.fixture(scope="module")
def guarded() -> GuardedBuffer:
    if sys.platform == "win32":
        pytest.skip("guard pages use POSIX mmap/mprotect")
    return GuardedBuffer()


@pytest.mark.skipif(sys.platform == "win32", reason="guard pages use POSIX mmap/mprotect")
def test_the_guard_page_really_faults():
    """Without this, a silent over-read would pass every guarded test."""
    code = (
        "import ctypes; from tests.test_packet_malformed import GuardedBuffer;"
        "view = GuardedBuffer().holding(b'x');"
        "ctypes.string_at(ctypes.addressof(ctypes.c_char.from_buffer(view)), 2)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True)
    assert result.returncode == -signal.SIGSEGV, result.stderr.decode()


def check_invariants(rows, nbytes: int) -> None:
    """What any caller may rely on, whatever the input."""
    if len(rows) == 0:
        assert nbytes == 0
        return
    offsets = rows["offset"].astype(np.int64)
    ends = offsets + rows["length"]
    assert offsets[0] == 0
    assert (offsets[1:] == ends[:-1]).all(), "rows must tile the buffer"
    assert ends[-1] <= nbytes
    status = rows["status"]
    assert ((status[:-1] == OK) | (status[:-1] >= FIRST_PACKET_ERROR)).all(), (
        "only the last row may carry a framing error"
    )
    if status[-1] != OK and status[-1] < FIRST_PACKET_ERROR:
        assert ends[-1] == nbytes, "a framing-error row spans the rest of the buffer"
    ok = status == OK
    assert (rows["payload_offset"][ok].astype(np.int64) + rows["payload_len"][ok] <= rows["length"][ok]).all()
    assert (rows["l4_offset"][ok] >= rows["ip_header_len"][ok]).all()


def test_empty_buffer_has_no_rows():
    assert len(parse_batch(b"")) == 0
    assert len(parse_batch(np.zeros(0, np.uint8))) == 0
    assert [len(a) for a in split_batch(b"")] == [0, 0]


@pytest.mark.parametrize("sample", SAMPLES, ids=range(len(SAMPLES)))
def test_every_truncation_is_a_truncated_row(sample, guarded):
    for cut in range(1, len(sample)):
        rows = parse_batch(guarded.holding(sample[:cut]))
        assert len(rows) == 1, cut
        assert int(rows[0]["status"]) == TRUNCATED, cut
        assert int(rows[0]["length"]) == cut


def test_nbytes_smaller_than_the_memory_is_honoured():
    buf = np.frombuffer(BATCH + b"\0" * 64, np.uint8)  # complete packets beyond nbytes
    nbytes = len(SAMPLES[0]) + 10
    rows = parse_batch(buf, nbytes)
    assert rows["status"].tolist() == [OK, TRUNCATED]
    assert int(rows[1]["length"]) == 10
    offsets, lengths = split_batch(buf, nbytes)
    assert lengths.tolist() == [len(SAMPLES[0])]
    with pytest.raises(ValueError, match="outside the buffer"):
        parse_batch(buf, len(buf) + 1)
    with pytest.raises(ValueError, match="outside the buffer"):
        parse_batch(buf, -1)


def _ipv4(**fields) -> bytearray:
    return bytearray(raw(IP(src="1.1.1.1", dst="2.2.2.2", **fields) / TCP(sport=1, dport=2) / b"data"))


def _garbage_cases():
    bad_version = bytearray(SAMPLES[1])
    bad_version[0] = 0x55
    ihl_too_small = _ipv4()
    ihl_too_small[0] = 0x44
    total_below_20 = _ipv4()
    total_below_20[2:4] = (19).to_bytes(2, "big")
    total_below_ihl = bytearray(SAMPLES[0])  # IHL 6 (24 bytes)
    total_below_ihl[2:4] = (22).to_bytes(2, "big")
    oversized = _ipv4()
    oversized[2:4] = (0xFFFF).to_bytes(2, "big")
    v6_oversized = bytearray(SAMPLES[4])
    v6_oversized[4:6] = (0xFFFF).to_bytes(2, "big")
    return {
        "bad version": (bad_version, BAD_VERSION),
        "IHL < 5": (ihl_too_small, BAD_HEADER_LENGTH),
        "total length < 20": (total_below_20, BAD_TOTAL_LENGTH),
        "total length < IHL": (total_below_ihl, BAD_HEADER_LENGTH),
        "IPv4 length past the end": (oversized, TRUNCATED),
        "IPv6 length past the end": (v6_oversized, TRUNCATED),
    }


@pytest.mark.parametrize("name", list(_garbage_cases()))
def test_framing_errors_end_the_batch(name, guarded):
    packet, status = _garbage_cases()[name]
    data = SAMPLES[2] + bytes(packet) + SAMPLES[3]  # a good packet must not be read after it
    rows = parse_batch(guarded.holding(data))
    assert rows["status"].tolist() == [OK, status]
    assert int(rows[1]["length"]) == len(data) - len(SAMPLES[2])
    check_invariants(rows, len(data))
    assert len(split_batch(data)[0]) == 1


def _packet_error_cases():
    hbh_overrun = bytearray(raw(IPv6(src="::1", dst="::2") / IPv6ExtHdrHopByHop() / UDP()))
    hbh_overrun[41] = 9  # hop-by-hop claims 80 bytes
    tcp_short = bytearray(raw(IP(src="1.1.1.1", dst="2.2.2.2", proto=6) / (b"\0" * 12)))
    tcp_doff_small = _ipv4()
    tcp_doff_small[32] = 0x30
    tcp_doff_past_end = _ipv4()
    tcp_doff_past_end[32] = 0xF0
    udp_len_past_end = bytearray(SAMPLES[1])
    udp_len_past_end[24:26] = (200).to_bytes(2, "big")
    udp_len_below_8 = bytearray(SAMPLES[1])
    udp_len_below_8[24:26] = (4).to_bytes(2, "big")
    icmp_short = bytearray(raw(IP(src="1.1.1.1", dst="2.2.2.2", proto=1) / b"\x08\0\0"))
    return {
        "extension header overrun": (hbh_overrun, BAD_EXTENSION_HEADER),
        "TCP shorter than 20": (tcp_short, L4_TRUNCATED),
        "TCP data offset < 5": (tcp_doff_small, BAD_L4_HEADER),
        "TCP data offset past the end": (tcp_doff_past_end, L4_TRUNCATED),
        "UDP length past the end": (udp_len_past_end, L4_TRUNCATED),
        "UDP length < 8": (udp_len_below_8, BAD_L4_HEADER),
        "ICMP shorter than 4": (icmp_short, L4_TRUNCATED),
    }


@pytest.mark.parametrize("name", list(_packet_error_cases()))
def test_packet_errors_mark_one_row_and_parsing_goes_on(name, guarded):
    packet, status = _packet_error_cases()[name]
    data = bytes(packet) + SAMPLES[5]
    rows = parse_batch(guarded.holding(data))
    assert rows["status"].tolist() == [status, OK]
    assert int(rows[0]["length"]) == len(packet)
    assert int(rows[0]["l4_checksum_ok"]) == -1
    if int(rows[0]["ip_version"]) == 4:
        assert int(rows[0]["ip_checksum_ok"]) == 1  # the IP header itself is sound
    check_invariants(rows, len(data))


def test_out_must_be_a_packet_array():
    with pytest.raises(TypeError):
        parse_batch(BATCH, out=np.zeros(4, np.uint8))
    with pytest.raises(TypeError):
        parse_batch(BATCH, out=np.zeros((2, 2), PACKET_DTYPE))
    with pytest.raises(ValueError):
        parse_batch(BATCH, out=np.zeros(8, PACKET_DTYPE)[::2])


def test_rows_that_lie_about_the_buffer_are_not_followed():
    buf = bytearray(BATCH)
    rows = parse_batch(buf)
    rows["length"][0] = 60000  # a caller's corrupted row
    rows["offset"][1] = len(buf)
    before = bytes(buf)
    compute_checksums(buf, rows)
    reflect(buf, rows, None, dst_port=1)
    assert bytes(buf[: len(SAMPLES[0]) + len(SAMPLES[1])]) == before[: len(SAMPLES[0]) + len(SAMPLES[1])]
    verify_checksums(buf, rows)
    assert rows["ip_checksum_ok"][:2].tolist() == [-1, -1]


def _fuzz_inputs(rng: np.random.Generator, count: int):
    """Pure random bytes, mutated valid batches, truncated valid batches, in turn."""
    valid = np.frombuffer(BATCH, np.uint8)
    noise = rng.integers(0, 256, size=1 << 20, dtype=np.uint8)
    starts = rng.integers(0, len(noise) - 600, size=count)
    sizes = rng.integers(0, 600, size=count)
    cuts = rng.integers(0, len(valid) + 1, size=count)
    for i in range(count):
        kind = i % 3
        if kind == 0:
            # Random bytes, with the version nibble often made plausible so the
            # parser gets past the first check.
            chunk = noise[starts[i] : starts[i] + sizes[i]].copy()
            if len(chunk) and i % 2:
                chunk[0] = (chunk[0] & 0x0F) | (0x40 if i % 4 == 1 else 0x60)
            yield chunk.tobytes()
        elif kind == 1:
            chunk = valid.copy()
            positions = rng.integers(0, len(chunk), size=1 + i % 8)
            chunk[positions] = noise[starts[i] : starts[i] + len(positions)]
            yield chunk.tobytes()
        else:
            yield BATCH[: cuts[i]]


def test_fuzz_parse_verify_rewrite_never_escape_the_buffer(guarded):
    count = 120_000
    rng = np.random.default_rng(20261122)
    out = np.empty(255, PACKET_DTYPE)
    started = time.perf_counter()
    statuses = np.zeros(256, np.int64)
    for i, data in enumerate(_fuzz_inputs(rng, count)):
        view = guarded.holding(data)
        rows = parse_batch(view, out=out)
        if i % 16 == 0:
            check_invariants(rows, len(data))
            offsets, lengths = split_batch(view)
            framed = int(np.sum(rows["status"] == OK) + np.sum(rows["status"] >= FIRST_PACKET_ERROR))
            assert len(offsets) == framed
        if i % 4 == 0 and len(rows):
            verify_checksums(view, rows)
            reflect(view, rows, None, dst_port=8443)
            compute_checksums(view, rows)
        statuses[rows["status"]] += 1
    elapsed = time.perf_counter() - started
    # The corpus must actually reach the interesting paths, or the test proves little.
    for status in (OK, TRUNCATED, BAD_VERSION, BAD_HEADER_LENGTH, BAD_TOTAL_LENGTH,
                   BAD_EXTENSION_HEADER, L4_TRUNCATED, BAD_L4_HEADER):
        assert statuses[status] > 0, f"fuzz corpus never produced status {status}"
    assert elapsed < 45, f"fuzz took {elapsed:.1f}s"
