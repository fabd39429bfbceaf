"""What the OTLP sink's exporter process costs per exchange, without the lab around it.

    python benchmarks/otlp_child_cost.py [--exchanges 6000] [--rate 1100] [--rounds 5]
                                         [--tree A --tree B] [--profile DIR]

The exporter process (`python -m oisp.sinks.otlp.child`, what OtlpSink starts) is fed
what the sensor's writer sends it: one recorded exchange (the openai_chat_json fixture
through the real recorder, four events, with a process the way the sensor attributes
one), its request and event ids made unique per exchange, in one write every 20 ms at
``--rate`` exchanges per second (a rate it cannot keep up with shows as events lost). The
endpoint is a real OTLP receiver (ddapm-test-agent, tests/otlp_receiver.py) on loopback.

CPU is the exporter process's own (all its threads, from /proc just before the first
exchange and from wait4 after it exited, so the export of the last batches and the
shutdown are in it, its start-up is not), divided by the exchanges. With two or more
``--tree`` (checkouts of oisp, e.g. main and a branch), the rounds alternate between
them and each tree's child runs its own code; the ratios are per round, against the
first tree. ``--profile DIR``: one more untimed round per tree under py-spy (all
threads), whose raw stacks are written to DIR and summarised by function.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "providers"))

from provider_cases import load_cases, run_case  # noqa: E402

from oisp.sinks.base import encode_event  # noqa: E402
from tests.otlp_receiver import Receiver  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
WRITE_INTERVAL = 0.02  # the sensor's writer: oisp/sinks/otlp/sink.py
PYSPY = Path("/tmp/mitm-venv/bin/py-spy")  # benchmarks/interception.py's venv (ensure_mitm_venv installs it)
PROCESS = {"pid": 4242, "ppid": 4200, "name": "python3", "exe": "/usr/bin/python3.11", "user": "root",
           "cmdline": "python3 benchmarks/client.py seq 3 17", "cmdline_args": ["benchmarks/client.py", "seq", "3", "17"]}


def exchange_template() -> list[str]:
    """The four events of one exchange as JSON text, with {n} where ids must differ per exchange."""
    case = next(c for c in load_cases() if c.name == "openai_chat_json")
    events = run_case(case)[0]
    request_id = next(e["data"]["request_id"] for e in events if e["event_type"] == "ai.request")
    lines = []
    for event in events:
        event = {**event, "process": PROCESS}
        text = encode_event(event).decode().replace("{", "{{").replace("}", "}}")
        text = text.replace(request_id, request_id[:-8] + "{n:08d}")
        text = text.replace(event["event_id"], event["event_id"][:-8] + "{n:08d}")
        lines.append("E" + text + "\n")
    return lines


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def one_round(tree: Path, receiver: Receiver, template: list[str], exchanges: int, rate: float,
              spy_to: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "oisp.sinks.otlp.child"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd=str(tree), env=env)
    settings = {"protocol": "http/protobuf", "base": receiver.http_url, "content": False,
                "metric_interval_ms": None, "close_timeout": 20.0}
    proc.stdin.write(json.dumps(settings).encode() + b"\n")
    proc.stdin.flush()
    time.sleep(1.5)  # imports and the providers' start: not per exchange
    spy = None
    if spy_to is not None:
        spy = subprocess.Popen([str(PYSPY), "record", "--pid", str(proc.pid), "--nonblocking", "--rate", "250",
                                "--format", "raw", "--full-filenames", "--threads", "-o", str(spy_to)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
    cpu0, receiver0 = cpu_seconds(proc.pid), cpu_seconds(receiver.proc.pid)
    t0 = time.monotonic()
    per_write = max(1, round(rate * WRITE_INTERVAL))
    n = 0
    while n < exchanges:
        count = min(per_write, exchanges - n)
        proc.stdin.write("".join(line.format(n=n + i) for i in range(count) for line in template).encode())
        proc.stdin.flush()
        n += count
        time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
    fed = time.monotonic() - t0
    proc.stdin.close()
    stats_lines = proc.stdout.read().splitlines()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if spy is not None:
        spy.wait(30)
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    receiver_cpu = cpu_seconds(receiver.proc.pid) - receiver0
    stats = json.loads(stats_lines[-1])["stats"] if stats_lines else {}
    return {"us_per_exchange": cpu / exchanges * 1e6, "receiver_us": receiver_cpu / exchanges * 1e6,
            "fed_rate": exchanges / fed, "wall": wall,
            "emitted": stats.get("emitted"), "lost": stats.get("lost"), "spans_lost": stats.get("spans_lost"),
            "last_error": stats.get("last_error"), "exit": proc.returncode}


def summarise(raw: Path, top: int = 25) -> list[tuple[str, float]]:
    """py-spy raw stacks → share of the samples by function, inclusive (on the stack anywhere)."""
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if any(f.startswith(("select ", "wait ", "_wait_for_tstate_lock", "readinto ")) or "Condition.wait" in f
               or "Event.wait" in f for f in frames[-3:]):
            continue  # a thread waiting is not CPU
        total += int(count)
        seen = set()
        for frame in frames:
            name = frame.split(" (", 1)[0] + " " + frame.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
            if name not in seen:
                seen.add(name)
                inclusive[name] += int(count)
    return [(name, count / total) for name, count in inclusive.most_common(top)] if total else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exchanges", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=1100.0, help="exchanges per second")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", action="append", type=Path, help="an oisp checkout (repeat to A/B); default this one")
    parser.add_argument("--profile", type=Path, help="write py-spy stacks of one more round per tree here")
    args = parser.parse_args()
    trees = [t.resolve() for t in (args.tree or [ROOT])]
    template = exchange_template()
    receiver = Receiver().start()
    results: dict[Path, list[dict]] = {t: [] for t in trees}
    try:
        for i in range(args.rounds):
            for tree in (trees if i % 2 == 0 else trees[::-1]):
                r = one_round(tree, receiver, template, args.exchanges, args.rate)
                results[tree].append(r)
                print(f"[{time.strftime('%H:%M:%S')}] round {i + 1} {tree.name}: {r['us_per_exchange']:.0f} us/exchange "
                      f"(receiver {r['receiver_us']:.0f}), fed {r['fed_rate']:.0f}/s, done in {r['wall']:.1f} s, "
                      f"emitted {r['emitted']} lost {r['lost']} "
                      f"({r['last_error']})", file=sys.stderr, flush=True)
        if args.profile:
            if not PYSPY.exists():
                sys.exit(f"--profile needs py-spy at {PYSPY}: python -m venv /tmp/mitm-venv && "
                         "/tmp/mitm-venv/bin/pip install py-spy (or run benchmarks/interception.py once)")
            args.profile.mkdir(parents=True, exist_ok=True)
            for tree in trees:
                raw = args.profile / f"{tree.name}.txt"
                one_round(tree, receiver, template, args.exchanges, args.rate, spy_to=raw)
                print(f"\n# py-spy, {tree}: share of the CPU samples by function (inclusive)")
                for name, share in summarise(raw):
                    print(f"{share * 100:6.1f} %  {name}")
    finally:
        receiver.stop()
    events = len(template)
    print(f"\n# exporter process CPU per exchange ({events} events), {args.exchanges} exchanges per round at "
          f"{args.rate:g}/s, {args.rounds} rounds, trees alternating")
    first = results[trees[0]]
    for tree in trees:
        per = [r["us_per_exchange"] for r in results[tree]]
        lost = [r["lost"] for r in results[tree]]
        line = (f"{str(tree):40} median {statistics.median(per):6.0f} us  range {min(per):.0f}-{max(per):.0f}  "
                f"lost per round {lost}")
        if tree != trees[0]:
            ratios = [r["us_per_exchange"] / f["us_per_exchange"] for r, f in zip(results[tree], first)]
            line += f"  ratio {statistics.median(ratios):.3f} (" + " ".join(f"{x:.2f}" for x in ratios) + ")"
        print(line)


if __name__ == "__main__":
    main()
