"""`oisp record` split (redirector root, sensor as a user, one IPC round trip per new
connection) against `oisp record --single-process`, in one interception lab, rounds
interleaved (the order alternates), with the direct path in every round for the added
latency. Issue 15 item 3: new connections/s, added p50 and TTFC within 10 %.

    sudo python benchmarks/split_ab.py [--rounds 4] [--seconds 4] [--workloads newconn,seq,ttfc]
        [--default-lab]

The lab is benchmarks/interception.py's (lean unless --default-lab). The split needs a
user: one is made for the run (useradd) and removed after, with x-only ACL entries on
the directories on the way to this interpreter that others may not enter (setfacl),
removed after too; the lab's directory is that user's. Proxy CPU per request counts
`oisp record` and its children (the sensor, when split).

Prints each round, then per workload and mode the median (req/s, or TTFC ms), the
median p50 latency and what it adds over direct, CPU per request, and split/single
(ratio of medians and median of the per-round ratios, with the per-round spread).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import interception as bench

MODES = ("single", "split")


def make_user() -> tuple[pwd.struct_passwd, list[Path]]:
    name = f"oispbench{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    granted = []
    for leaf in (Path(os.path.realpath(sys.executable)), bench.ROOT / "x"):
        for directory in reversed(leaf.parents):
            if not directory.stat().st_mode & stat.S_IXOTH and directory not in granted:
                subprocess.run(["setfacl", "-m", f"u:{name}:x", str(directory)], check=True)
                granted.append(directory)
    return pwd.getpwnam(name), granted


def remove_user(user, granted: list[Path]) -> None:
    for directory in granted:
        subprocess.run(["setfacl", "-x", f"u:{user.pw_name}", str(directory)], capture_output=True)
    subprocess.run(["userdel", user.pw_name], capture_output=True)
    subprocess.run(["groupdel", user.pw_name], capture_output=True)


def measure(lab, path: str, workload: str, seconds: float) -> dict:
    out = lab.client(path, workload, seconds, 17)
    return {"value": statistics.median(out["ttfc"]) * 1000 if workload == "ttfc" else out["requests"] / out["elapsed"],
            "p50": bench.pctl(out["latencies"], .5) * 1000 if out.get("latencies") else None,
            "cpu": out["proxy_cpu_ms_per_req"]}


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workloads", default="newconn,seq,ttfc")
    parser.add_argument("--default-lab", action="store_true", help="httpx + hypercorn instead of the lean pair")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    user, granted = make_user()
    tmp = Path(tempfile.mkdtemp(prefix=f"{user.pw_name}-", dir="/tmp"))
    os.chown(tmp, user.pw_uid, user.pw_gid)
    got = {(mode, w): [] for mode in ("direct", *MODES) for w in workloads}
    lab = None
    try:
        lab = bench.Lab(tmp, lean=not args.default_lab)
        for r in range(args.rounds):
            for w in workloads:
                got["direct", w].append(measure(lab, "direct", w, args.seconds))
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                # A data directory (so a CA) per mode: root's for one process, the user's for the split.
                lab.env["XDG_DATA_HOME"] = str(tmp / f"data-{mode}")
                lab.oisp_ca = tmp / f"data-{mode}" / "oisp" / "oisp-ca.pem"
                lab.start_oisp(extra=("-o", str(tmp / f"events-{mode}.jsonl"),  # (the last -o counts)
                                      *(("--single-process",) if mode == "single" else ("--user", user.pw_name))))
                try:
                    for w in workloads:
                        got[mode, w].append(measure(lab, "oisp", w, args.seconds))
                finally:
                    lab.stop_oisp()
            print(f"round {r + 1}: " + "  ".join(
                f"{mode}:{w} {got[mode, w][-1]['value']:.1f} (p50 {got[mode, w][-1]['p50'] or 0:.2f} ms, "
                f"{got[mode, w][-1]['cpu']:.2f} ms CPU)" for mode in ("direct", *MODES) for w in workloads), flush=True)
    finally:
        if lab is not None:
            lab.close()
        remove_user(user, granted)
        shutil.rmtree(tmp, ignore_errors=True)
    for w in workloads:
        unit = "ms TTFC" if w == "ttfc" else "req/s"
        direct = got["direct", w]
        line = [f"{w}: direct {statistics.median(m['value'] for m in direct):.1f} {unit}"]
        for mode in MODES:
            rounds = got[mode, w]
            value = statistics.median(m["value"] for m in rounds)
            cpu = statistics.median(m["cpu"] for m in rounds)
            text = f"{mode} {value:.1f} {unit}, {cpu:.2f} ms CPU/req"
            if rounds[0]["p50"] is not None:
                added = statistics.median(m["p50"] - d["p50"] for m, d in zip(rounds, direct))
                text += f", p50 {statistics.median(m['p50'] for m in rounds):.2f} ms (+{added:.2f} over direct)"
            line.append(text)
        ratios = [b["value"] / a["value"] for a, b in zip(got["single", w], got["split", w])]
        single = statistics.median(m["value"] for m in got["single", w])
        split = statistics.median(m["value"] for m in got["split", w])
        line.append(f"split/single {split / single:.3f} (per round: median {statistics.median(ratios):.3f}, "
                    f"spread {spread(ratios)})")
        if got["single", w][0]["p50"] is not None:
            p50 = [b["p50"] / a["p50"] for a, b in zip(got["single", w], got["split", w])]
            line.append(f"p50 split/single per round: median {statistics.median(p50):.3f}, spread {spread(p50)}")
        print(" | ".join(line))


if __name__ == "__main__":
    main()
