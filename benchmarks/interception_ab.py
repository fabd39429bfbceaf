"""A/B of two versions of `oisp record` in one interception lab, rounds interleaved.

    sudo python benchmarks/interception_ab.py OLD_TREE NEW_TREE [--rounds 6] [--seconds 4]
        [--workloads newconn,seq,conc,ttfc] [--default-lab] [--build]

OLD_TREE and NEW_TREE are checkouts of oisp (e.g. `git worktree add /tmp/old HEAD~1`
and this one), each with its compiled modules in place (--build puts them there: a
wheel of the tree, unpacked). The lab is benchmarks/interception.py's (lean unless
--default-lab); each round starts `oisp record` from each tree in turn (the order
alternates) and runs the same client workloads against it. This VM's speed drifts
by up to 40 % within minutes, so only a same-lab, interleaved comparison can show a
change of a few per cent; the per-round ratio's median is the figure to quote.

Prints, per workload, each tree's median (req/s, or TTFC in ms) and proxy CPU per
request, the ratio NEW/OLD of the medians, and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import interception as bench  # the lab


def build_in_place(tree: Path) -> None:
    """Compile the tree's native modules and put them in its package (as an editable
    install would, without installing it)."""
    out = Path(tempfile.mkdtemp(prefix="ab-wheel-"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(tree)], check=True)
    with zipfile.ZipFile(glob.glob(str(out / "*.whl"))[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith("oisp/_native/") and name.endswith((".so", ".pyd")):
                (tree / name).write_bytes(wheel.read(name))


def measure(lab, workload: str, seconds: float) -> tuple[float, float]:
    """(req/s, or median TTFC in ms; proxy CPU ms per request) of one client run."""
    out = lab.client("oisp", workload, seconds, 17)
    value = statistics.median(out["ttfc"]) * 1000 if workload == "ttfc" else out["requests"] / out["elapsed"]
    return value, out["proxy_cpu_ms_per_req"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs=2, type=Path, metavar="TREE")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--workloads", default="newconn")
    parser.add_argument("--default-lab", action="store_true", help="httpx + hypercorn instead of the lean pair")
    parser.add_argument("--build", action="store_true", help="compile each tree's native modules in place first")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    workloads = args.workloads.split(",")
    for tree in trees:
        if args.build:
            build_in_place(tree)
        if not glob.glob(str(tree / "oisp" / "_native" / "ring*")):
            sys.exit(f"{tree} has no compiled modules: add --build")
    values = {(tree, w): [] for tree in trees for w in workloads}
    cpu = {(tree, w): [] for tree in trees for w in workloads}
    lab = bench.Lab(Path(tempfile.mkdtemp(prefix="oisp-ab-")), lean=not args.default_lab)
    try:
        for r in range(args.rounds):
            for tree in trees if r % 2 == 0 else trees[::-1]:
                lab.start_oisp(tree=tree)
                try:
                    for w in workloads:
                        value, ms = measure(lab, w, args.seconds)
                        values[tree, w].append(value)
                        cpu[tree, w].append(ms)
                finally:
                    lab.stop_oisp()
            print(f"round {r + 1}: " + "  ".join(f"{tree.name}:{w} {values[tree, w][-1]:.2f} "
                                                 f"({cpu[tree, w][-1]:.2f} ms CPU)"
                                                 for tree in trees for w in workloads), flush=True)
    finally:
        lab.close()
    old, new = trees
    for w in workloads:
        unit = "ms TTFC" if w == "ttfc" else "req/s"
        a, b = statistics.median(values[old, w]), statistics.median(values[new, w])
        ca, cb = statistics.median(cpu[old, w]), statistics.median(cpu[new, w])
        per_round = statistics.median(y / x for x, y in zip(values[old, w], values[new, w]))
        print(f"{w}: {old.name} {a:.2f} {unit}, {ca:.2f} ms CPU | {new.name} {b:.2f} {unit}, {cb:.2f} ms CPU | "
              f"new/old {b / a:.3f} (median per round {per_round:.3f}), CPU {cb / ca:.3f}")


if __name__ == "__main__":
    main()
