"""What the OTLP sink costs the sensor's own process per exchange, without the lab's noise.

    python benchmarks/otlp_sensor_side.py [--exchanges 20000] [--rounds 5]

The sensor's side of the sink is `emit_line` (FanOut hands it the JSON line it made
once for every line-based sink), the writer thread that sends the lines to the
exporter process every 20 ms, and the thread reading its counts. This feeds one
recorded exchange (the openai_chat_json fixture through the real recorder: four
events) at ~2,000 exchanges/s and reads this process's CPU time (all its threads;
the exporter process's own CPU is not in it — benchmarks/otlp_cost.py measures that).
The endpoint is a closed port: the exporter process does its usual work and counts
the batches lost, and the sensor's side is the same whatever the endpoint does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "providers"))

from provider_cases import load_cases, run_case  # noqa: E402

from oisp.sinks.base import encode_event  # noqa: E402
from oisp.sinks.otlp import OtlpSink, resolve  # noqa: E402
from tests.otlp_receiver import free_ports  # noqa: E402


def one_round(events, lines, exchanges: int) -> float:
    (port,) = free_ports(1)
    sink = OtlpSink(resolve(f"http://127.0.0.1:{port}", None), close_timeout=2.0)
    time.sleep(1.0)  # the exporter process starting up is not the sensor's cost
    cpu0 = time.process_time()
    for i in range(exchanges):
        for event, line in zip(events, lines):
            sink.emit_line(event, line)
        if i % 100 == 99:
            time.sleep(0.05)
    cpu = time.process_time() - cpu0
    sink.close()
    return cpu / exchanges * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    case = next(c for c in load_cases() if c.name == "openai_chat_json")
    events = run_case(case)[0]
    lines = [encode_event(e) for e in events]
    per = [one_round(events, lines, args.exchanges) for _ in range(args.rounds)]
    print(f"sensor-side CPU per exchange ({len(events)} events, {sum(map(len, lines))} bytes of JSON): "
          f"median {statistics.median(per):.1f} us, range {min(per):.1f}-{max(per):.1f} us over {args.rounds} rounds "
          f"of {args.exchanges} exchanges")


if __name__ == "__main__":
    main()
