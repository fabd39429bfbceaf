"""pytest-benchmark entry points for the decode workloads (see decode_throughput.py).

    PYTHONPATH=. python -m pytest benchmarks/bench_decode.py --benchmark-enable -q
"""

from __future__ import annotations

import pytest

from decode_throughput import exchanges, run_once, sse_stream

WORKLOADS = {"http1_1000_exchanges": exchanges(1000), "sse_500_chunks": sse_stream(500)}


@pytest.mark.parametrize("kind", ["decoder", "recorder"])
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_decode_throughput(benchmark, workload: str, kind: str) -> None:
    request, response = WORKLOADS[workload]
    seconds, items = benchmark(run_once, kind, request, response, 1460, False)
    assert items > 0
