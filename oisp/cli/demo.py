"""`oisp demo`: watch the whole recording path work, with no internet and no API key.

It builds a throwaway lab (two network namespaces joined by a veth pair),
starts a stand-in provider that speaks the OpenAI and Anthropic wire formats
in one of them, runs the real `oisp record` in the other, makes real client
calls there (the openai and anthropic SDKs when installed, urllib otherwise),
prints the events as they come, and removes everything it made when it ends,
also on Ctrl-C. With --ui it serves the dashboard over the events until Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from oisp.demo.clients import CALLS

HOSTS = ["api.openai.com", "api.anthropic.com"]


def register(sub) -> None:
    parser = sub.add_parser("demo", help="run the recording path in a throwaway lab (needs root, no internet)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print the events as JSON lines (default: one line each)")
    parser.add_argument("--ui", metavar="PORT", nargs="?", type=int, const=7878,
                        help="serve the dashboard over the events until Ctrl-C (default port 7878)")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up on a step after this many seconds")
    parser.set_defaults(func=run)


def _say(message: str) -> None:
    print(f"oisp demo: {message}", file=sys.stderr, flush=True)


def _child_env(data_home: Path) -> dict:
    # The lab's files (a throwaway CA, the events) are the demo's own, in its temporary
    # directory: nothing is written to the invoking user's data directory.
    env = {k: v for k, v in os.environ.items() if k not in ("SUDO_UID", "SUDO_GID", "SUDO_USER")}
    env["XDG_DATA_HOME"] = str(data_home)
    return env


def _wait_for_line(stream, marker: str, timeout: float, seen: list[str]) -> str | None:
    """Read lines until one holds `marker` (kept in `seen`); None at EOF or timeout."""
    found: list[str] = []

    def read() -> None:
        for line in stream:
            seen.append(line.rstrip("\n"))
            if marker in line:
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


def _drain(stream, prefix: str) -> None:
    """Echo a child's stderr lines (its notes and its closing summary) to ours."""
    def echo() -> None:
        for line in stream:
            if line.strip() and not line.startswith("\r"):
                print(f"{prefix}{line.rstrip()}", file=sys.stderr, flush=True)
    threading.Thread(target=echo, daemon=True).start()


def _count(events_path: Path, kind: str) -> int:
    if not events_path.exists():
        return 0
    count = 0
    for line in events_path.read_text().splitlines():
        try:
            count += json.loads(line).get("event_type") == kind
        except ValueError:
            pass  # a line still being written
    return count


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args) -> int:
    from oisp.demo.lab import Lab, LabError, sweep_stale
    from oisp.divert.preflight import check_privileges

    problems = check_privileges()
    if problems:
        for problem in problems:
            print(f"oisp demo: {problem.message}\n  fix: {problem.fix}", file=sys.stderr)
        return 3
    if args.ui is not None and importlib.util.find_spec("oisp.cli.ui") is None:
        _say("this oisp has no dashboard (`oisp ui`)")
        return 2
    for name in sweep_stale():
        _say(f"removed {name}, left by a demo that was killed")

    # SIGTERM ends the demo like Ctrl-C: the finally below removes the lab either way.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="oisp-demo-"))
    lab = None
    try:
        lab = Lab.create(HOSTS)
        _say(f"lab: namespaces {lab.client} (programs, oisp record) and {lab.provider} "
             f"(a stand-in provider at {lab.provider_ip}, named {' and '.join(HOSTS)})")
        return _run_in(lab, workdir, args)
    except LabError as e:
        _say(f"cannot build the lab: {e}")
        return 1
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    finally:
        if lab is not None:
            lab.remove()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
        _say("lab removed")


def _run_in(lab, workdir: Path, args) -> int:
    from oisp.demo.provider import make_test_pki

    env = _child_env(workdir / "data")
    upstream_ca, cert, key = make_test_pki(workdir)
    provider = lab.start(lab.provider, sys.executable, "-m", "oisp.demo.provider", "--host", lab.provider_ip,
                         "--port", "443", "--cert", cert, "--key", key, stdout=subprocess.PIPE, text=True, env=env)
    if _wait_for_line(provider.stdout, "ready", args.timeout, []) is None:
        _say("the stand-in provider did not start")
        return 1

    events_path = workdir / "events.jsonl"
    output = ["--stdout"] if args.json else ["--pretty"]
    sensor = lab.start(lab.client, sys.executable, "-m", "oisp", "record", "-o", str(events_path),
                       "--upstream-ca", upstream_ca, *output, stderr=subprocess.PIPE, text=True, env=env)
    said: list[str] = []
    if _wait_for_line(sensor.stderr, "recording", args.timeout, said) is None:
        _say("oisp record did not start:\n  " + "\n  ".join(said[-10:]))
        return 1
    _drain(sensor.stderr, "  ")
    ca_line = next((line for line in said if line.startswith("oisp record: CA ")), "")
    our_ca = ca_line.removeprefix("oisp record: CA ").strip()
    ui = None
    if args.ui is not None:
        ui = subprocess.Popen([sys.executable, "-m", "oisp", "ui", str(events_path), "--port", str(args.ui)], env=env)
        lab.processes.append(ui)

    failures = 0
    client_env = {**env, "SSL_CERT_FILE": our_ca}
    for call in CALLS:
        done = subprocess.run(lab.command(lab.client, sys.executable, "-m", "oisp.demo.clients", call),
                              capture_output=True, text=True, timeout=args.timeout, env=client_env)
        if done.returncode != 0:
            failures += 1
            _say(f"{call}: the client failed:\n  " + "\n  ".join(done.stderr.strip().splitlines()[-5:]))
            continue
        result = json.loads(done.stdout)
        _say(f"{call}: {result['client']} (pid {result['pid']}) got {result['text'][:60]!r}")

    deadline = time.monotonic() + 5
    while _count(events_path, "ai.response") < len(CALLS) - failures and time.monotonic() < deadline:
        time.sleep(0.1)
    requests, responses = _count(events_path, "ai.request"), _count(events_path, "ai.response")
    if ui is not None:
        _say("the dashboard serves these events (its URL is above); Ctrl-C to end the demo")
        try:
            ui.wait()
        except KeyboardInterrupt:
            pass
    sensor.send_signal(signal.SIGINT)
    sensor.wait(args.timeout)
    _say(f"{len(CALLS) - failures} of {len(CALLS)} calls made; recorded {requests} requests, "
         f"{responses} responses")
    if failures or requests != len(CALLS) or responses != len(CALLS):
        return 1
    _say("done: every call was recorded. On your own machine: sudo oisp ca install && sudo oisp record")
    return 0
