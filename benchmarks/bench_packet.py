"""pytest-benchmark view of benchmarks/packet_ratios.py (same workloads, same functions).

    python -m pytest benchmarks/bench_packet.py --benchmark-enable

Divide each redirector's mean by 256 for ns/packet; packet_ratios.py prints the ratios.
"""

from __future__ import annotations

import pytest
from packet_ratios import (
    Memcpy,
    OispRedirector,
    ParseVerify,
    PydivertRedirector,
    ScapyRedirector,
    check_equivalence,
    full_size_batch,
    realistic_batch,
)

PACKETS = realistic_batch()
FULL_SIZE = full_size_batch()


def test_the_three_redirectors_produce_the_same_bytes():
    check_equivalence(PACKETS)


@pytest.mark.parametrize("redirector", [OispRedirector, PydivertRedirector, ScapyRedirector],
                         ids=["oisp", "pydivert", "scapy"])
def test_redirector_batch_of_256(benchmark, redirector):
    benchmark.group = "redirector work, 256 packets"
    benchmark(redirector(PACKETS).run)


@pytest.mark.parametrize("work", [ParseVerify, Memcpy], ids=["parse+verify", "memcpy"])
def test_full_size_batch(benchmark, work):
    benchmark.group = "255 full-size packets"
    benchmark(work(FULL_SIZE).run)
