"""Where `oisp record` spends its CPU per streamed chunk (issue 16, step 1).

    sudo python benchmarks/stream_profile.py [--lean] [--streams 40] [--rate 500]

The interception lab (benchmarks/interception.py: two namespaces, a provider on
:443, `oisp record` in the client's namespace) serves SSE streams of 500 chunks;
py-spy samples the sensor (--nonblocking, all threads, native frames off) while
the streams run. Each sample is charged to one cost, by the innermost frame that
names it:

  TLS decrypt / TLS encrypt   SSLObject.read / SSLObject.write (OpenSSL under them)
  relay                       oisp/proxy/relay.py's own lines (record handling, forwarding)
  socket send / recv          the transports' send() and recv() calls: the syscalls, and in them the
                              kernel's work, which for a send to the client includes the divert
                              hook that takes the packet to the receive ring
  event loop (other)          the rest of asyncio (scheduling, callbacks)
  divert ring                 the engine and reflector threads (oisp/divert, oisp/redirect)
  SSE / HTTP decoding         oisp/decode/sse.py, http1*.py, framing.py, exchange.py, providers/
  event building, redaction   oisp/events (builder, recorder, redact), json encoding
  sinks                       oisp/sinks (the JSONL writer)
  idle                        epoll/select waits and threads parked in the ring's receive

CPU per chunk is the sensor's CPU over the run (/proc, all threads) divided by
the chunks relayed; each cost's share is its samples over the non-idle ones.
Sampling proportions do not depend on how loaded the machine is; the absolute
milliseconds do, so compare runs only within one sitting.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from interception import Lab, cpu_seconds, log, machine, thread_cpu  # noqa: E402

CHUNKS = 500  # content chunks per stream, both clients' ttfc workload (client.py, lean_client.py)

COSTS = [
    # (name, predicate over one frame's function and file); the innermost frame that matches wins
    ("socket send (syscall)", lambda fn, file: fn == "_SelectorSocketTransport.write"),
    ("socket recv (syscall)", lambda fn, file: fn.startswith("_SelectorSocketTransport._read_ready")),
    ("TLS decrypt", lambda fn, file: fn == "SSLObject.read"),
    ("TLS encrypt", lambda fn, file: fn == "SSLObject.write"),
    ("TLS (other)", lambda fn, file: file.endswith("/ssl.py")),
    ("SSE / HTTP decoding", lambda fn, file: "/oisp/decode/" in file),
    ("event building, redaction", lambda fn, file: "/oisp/events/" in file or "/json/" in file),
    ("sinks", lambda fn, file: "/oisp/sinks/" in file),
    ("relay", lambda fn, file: file.endswith("/oisp/proxy/relay.py")),
    ("proxy (other)", lambda fn, file: "/oisp/proxy/" in file),
    ("divert ring (Python)", lambda fn, file: "/oisp/divert/" in file or "/oisp/redirect/" in file),
    ("event loop (other)", lambda fn, file: "/asyncio/" in file or file.endswith("/selectors.py")),
]


def _frame(frame: str) -> tuple[str, str]:
    fn, _, where = frame.partition(" (")
    return fn, where.rsplit(":", 1)[0]


def charge(stack: list[str]) -> str:
    fn, _ = _frame(stack[-1])
    if fn.endswith(".select"):
        return "idle"
    if fn == "Thread.run":  # the receive ring's thread, in C without the GIL: busy or waiting
        return "ring thread (native)"
    for frame in reversed(stack):
        fn, file = _frame(frame)
        for name, matches in COSTS:
            if matches(fn, file):
                return name
    return "other"


def attribute(raw: Path) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[charge(stack.split(";"))] += int(n)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lean", action="store_true", help="the lean client and provider (stdlib)")
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    parser.add_argument("--keep", metavar="FILE", help="also copy py-spy's raw stacks here")
    parser.add_argument("--perf", action="store_true",
                        help="also sample with perf (cpu-clock, kernel and native frames): the event loop's time "
                             "by library, and the kernel's share by function")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        raise SystemExit("needs py-spy: pip install py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="oisp-sprof-"))
    lab = None
    try:
        lab = Lab(tmp, lean=args.lean)
        pid = lab.start_oisp()
        lab.client("oisp", "ttfc", 1, 2)  # warm: CA leaf, upstream session, caches
        raw = tmp / "spy.txt"
        spy = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--nonblocking", "--rate", str(args.rate),
                                "--format", "raw", "--full-filenames", "-o", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        perf_data = tmp / "perf.data"
        perf = (subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-p", str(pid), "-o", str(perf_data)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) if args.perf else None)
        time.sleep(1.0)
        cpu0, threads0 = cpu_seconds(pid), thread_cpu(pid)
        result = lab.client("oisp", "ttfc", 1, args.streams)
        cpu, threads1 = cpu_seconds(pid) - cpu0, thread_cpu(pid)
        loop_cpu = threads1.get(pid, 0.0) - threads0.get(pid, 0.0)  # the main thread runs the event loop
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        lab.stop_oisp()
        counts = attribute(raw)
        if args.keep:
            shutil.copyfile(raw, args.keep)
        busy = sum(n for name, n in counts.items() if name not in ("idle", "ring thread (native)"))
        chunks = result["requests"] * CHUNKS
        print(f"# stream profile, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
              f"{'lean' if args.lean else 'default'} lab, {machine()}")
        print(f"{result['requests']} streams x {CHUNKS} chunks; sensor CPU {cpu * 1000:.0f} ms = "
              f"{cpu * 1e6 / chunks:.1f} us per chunk; {busy} busy samples in Python, "
              f"{counts['ring thread (native)']} in the ring's native thread, {counts['idle']} idle")
        print(f"event-loop thread {loop_cpu * 1e6 / chunks:.1f} us per chunk; the other threads (receive ring, "
              f"reflector, guardian pipe) {(cpu - loop_cpu) * 1e6 / chunks:.1f} us")
        loop_busy = sum(n for name, n in counts.items() if name not in ("idle", "ring thread (native)",
                                                                          "divert ring (Python)"))
        print("| event-loop cost | share of its busy samples | us per chunk |\n|---|---|---|")
        for name, n in counts.most_common():
            if name not in ("idle", "ring thread (native)", "divert ring (Python)"):
                print(f"| {name} | {100 * n / loop_busy:.1f} % | {loop_cpu * 1e6 / chunks * n / loop_busy:.1f} |")
        if perf is not None:
            def report(*sort: str, tid: int | None = None) -> str:
                argv = ["perf", "report", "-i", str(perf_data), "--stdio", "--sort", ",".join(sort)]
                if tid is not None:
                    argv += ["--tid", str(tid)]
                out = subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()
                rows = [line for line in out if "%" in line and not line.startswith("#")]
                shown = sum(float(line.split("%")[0]) for line in rows)
                # perf 6 sometimes leaves the largest row out of a --tid report: say what is missing
                missing = f"\n    {100 - shown:5.2f}%  (not listed by perf)" if shown < 99 and not sort[1:] else ""
                return "\n".join(rows[:25]) + missing
            print(f"\nperf (cpu-clock), all threads, by thread (the event loop is tid {pid}):\n{report('pid')}")
            print(f"\nthe event-loop thread by library:\n{report('dso', tid=pid)}")
            print(f"\nthe event-loop thread's top functions:\n{report('dso', 'sym', tid=pid)}")
    finally:
        if lab is not None:
            lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
        log("lab removed")


if __name__ == "__main__":
    main()
