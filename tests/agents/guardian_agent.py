"""Guardians under fire, run inside a test's namespace.

usage: guardian_agent.py holder --port PORT [--die-in-open]
    open a divert handle on TCP to PORT (nobody reads it: what it takes is black-holed),
    print "ready GUARDIAN_PID", then wait. die-in-open: SIGKILL this process the moment
    the backend has opened the handle, before the handle returns (no guardian heard of it).
usage: guardian_agent.py engine --port PORT --sig TERM|KILL
    an Engine on TCP to PORT that nobody consumes; its guardian gets SIGNAL (TERM, KILL);
    prints one JSON object: connects before and after, whether the engine noticed, the
    filters tc lists.
usage: guardian_agent.py listen --port PORT
    a TCP listener on 127.0.0.1:PORT (a connect succeeds once its SYN gets through).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import time


def connects(port, timeout=0.5) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def bpf_filters() -> int:
    """BPF filters on every interface here, as tc itself lists them."""
    count = 0
    for _, name in socket.if_nameindex():
        for direction in ("ingress", "egress"):
            shown = subprocess.run(["tc", "-j", "filter", "show", "dev", name, direction],
                                   capture_output=True, text=True, check=True)
            count += sum("options" in f and f["kind"] == "bpf" for f in json.loads(shown.stdout or "[]"))
    return count


def holder(port, die_in_open=False):
    from oisp.divert import Handle
    from oisp.divert.backend import get_backend

    backend = get_backend()
    if die_in_open:
        opened = backend.open

        def open_and_die(*args):
            opened(*args)
            print("opened", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        backend.open = open_and_die
    handle = Handle(f"tcp.DstPort == {port}", backend=backend)
    guardian = handle._guardian
    print("ready", guardian.process.pid if guardian else 0, flush=True)
    signal.pause()


def engine(port, sig):
    from oisp.divert.engine import Engine

    engine = Engine(f"tcp.DstPort == {port}", watchdog=None)
    out = {"connects_while_diverted": connects(port), "filters_before": bpf_filters()}
    killed = time.monotonic()
    os.kill(engine.handle._guardian.process.pid, getattr(signal, "SIG" + sig))
    while engine._stalled is None and time.monotonic() - killed < 3:
        time.sleep(0.01)
    out["noticed_after"] = time.monotonic() - killed if engine._stalled is not None else None
    try:
        engine.next_batch(timeout=0.1)
        out["error"] = None
    except Exception as e:
        out["error"] = type(e).__name__
    out["guardian_deaths"] = engine.counters().get("guardian_deaths")
    out["filters_after"] = bpf_filters()
    out["connects_after"] = connects(port)
    print(json.dumps(out))


def listen(port):
    server = socket.create_server(("127.0.0.1", port), backlog=128)
    print("ready", flush=True)
    while True:
        server.accept()[0].close()


def parse(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Guardians under fire, in a test's namespace.")
    roles = parser.add_subparsers(dest="role", required=True)
    for name, text in (("holder", "a divert handle nobody reads"), ("engine", "an Engine whose guardian is signalled"),
                       ("listen", "a TCP listener on 127.0.0.1")):
        roles.add_parser(name, help=text).add_argument("--port", type=int, required=True)
    roles.choices["holder"].add_argument("--die-in-open", action="store_true",
                                         help="SIGKILL this process while the backend opens the handle")
    roles.choices["engine"].add_argument("--sig", choices=["TERM", "KILL"], required=True, help="for the guardian")
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    options = parse()
    {"holder": holder, "engine": engine, "listen": listen}[options.pop("role")](**options)
