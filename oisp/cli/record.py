"""`oisp record`: the main job. Redirects the connections of local programs to AI
endpoints into the TLS-terminating proxy and writes what they send and receive
as OISP events.

Two processes by default (`sudo oisp record`): this one stays root and is the
redirector (divert handles, reflector, flow table, DNS learning, the guardian);
it starts the sensor (`oisp sensor`: the proxy, TLS, decoders, events, sinks, the
dashboard) as the invoking user (SUDO_UID/SUDO_GID, or --user NAME), with no
supplementary groups and no capabilities, so the code that reads what programs
and providers send holds no privilege, and the user's files (events, the CA in the
user's data directory, the key log) are written as the user. The two talk over a
Unix socket only that user can reach (docs/ipc.md).

Run as root with neither SUDO_UID nor --user (a root shell, a CI job) there is no
user to run the sensor as: it runs as one root process, as --single-process does,
and says so on stderr.

Order matters for failing open: the proxy listens before any flow is
reflected to it, and on stop the redirector first stops taking new
connections, the proxy drains and then cuts the ones in flight, and only then
does the redirector go, so no connection is reflected into a proxy that is
not there, nor left waiting on one. Split, Ctrl-C (or SIGTERM) to this process
stops new reflections, then the sensor (which drains, cuts and prints the
summary), then the redirector. Should the sensor die, nothing new is reflected
from that moment (traffic flows directly) and record exits 1; should the
redirector's part fail, the sensor is stopped and record exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

from oisp.cli.configured import add_config_option
from oisp.cli.options import add_redirector_options, add_selection_options, add_sensor_options
from oisp.cli.sensor import DRAIN, argv_of, raise_open_file_limit, record_events, sensor_parser

SENSOR_STOP_WAIT = DRAIN + 15.0  # seconds a stopping sensor gets to drain and close its sinks
SOCKET_DIR = "/run/oisp"


def register(sub) -> None:
    parser = sub.add_parser("record", help="record what local programs send to AI providers (needs root)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sensor_options(parser)
    add_redirector_options(parser)
    add_selection_options(parser)
    split = parser.add_argument_group("privilege split")
    split.add_argument("--user", metavar="NAME",
                       help="run the sensor as this user (default: the one who ran sudo, $SUDO_UID)")
    split.add_argument("--single-process", action="store_true",
                       help="run everything in this one (root) process, as oisp did before the split")
    add_config_option(parser)
    parser.set_defaults(func=run)


def sensor_user(user: str | None, environ, euid: int):
    """Whom the sensor runs as: a pwd entry, or None (one process) with why not."""
    import pwd

    if user is not None:
        return pwd.getpwnam(user), None  # KeyError: no such user
    if euid != 0:
        return None, "not root"
    uid = environ.get("SUDO_UID", "")
    if uid.isdigit() and int(uid) != 0:
        return pwd.getpwuid(int(uid)), None
    return None, ("running as one root process: there is no user to run the sensor as (no $SUDO_UID, no "
                  "--user); to process traffic as an ordinary user, run `sudo oisp record` from that user's "
                  "shell or pass --user NAME")


def sensor_env(environ, user) -> dict[str, str]:
    """The sensor's environment: ours, as that user (its home, so its data directory)."""
    env = {k: v for k, v in environ.items() if not k.startswith("SUDO_")}
    env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    return env


def run(args) -> int:
    from oisp.cli.redirector import preflight
    from oisp.events.cost import PriceTableError, load_prices

    try:
        args.price_table = load_prices(args.prices)
    except PriceTableError as e:
        print(f"oisp record: {e}", file=sys.stderr)
        return 2
    failed = preflight("oisp record")
    if failed is not None:
        return failed
    # The reflector thread decides each new flow's SYN in Python: with the default 5 ms
    # switch interval it waits for the event loop's longer stretches (decoding) to end.
    # 0.2 ms: new connections +8 %, kept-alive +2 %, concurrent unchanged (A/B, lean lab).
    sys.setswitchinterval(0.0002)
    user, why = None, None
    if not args.single_process:
        if sys.platform == "win32":
            why = "running as one process: starting the sensor as another user is not written for Windows yet"
        else:
            try:
                user, why = sensor_user(args.user, os.environ, os.geteuid())
            except KeyError:
                print(f"oisp record: no such user: {args.user}", file=sys.stderr)
                return 2
    if user is None:
        if why:
            print(f"oisp record: note: {why}", file=sys.stderr)
        return _single_process(args)
    return _split(args, user)


def _single_process(args) -> int:
    if args.jsonl is None:
        args.jsonl = args.output or ""
    raise_open_file_limit()
    try:
        return asyncio.run(record_events(args, lambda spec, plain, emit: LocalRedirector(args, spec, plain, emit),
                                         label="oisp record"))
    except KeyboardInterrupt:
        return 0


class LocalRedirector:
    """The redirector in this process (--single-process), as oisp.cli.sensor.record_events
    uses it; oisp.cli.remote.RemoteRedirector is the same over the IPC."""

    def __init__(self, args, spec, plain, on_quic_refused):
        from oisp.proxy.flow_source import LocalFlows
        from oisp.redirect import Redirector

        self.proxy_port, self.plain = args.proxy_port, plain
        self.redirector = Redirector(spec, proxy_ports={443: args.proxy_port}, include=args.process,
                                     exclude=args.exclude, idle_timeout=args.flow_idle_timeout, plain=plain,
                                     refuse_quic=not args.allow_quic, on_quic_refused=on_quic_refused)
        self.flows = LocalFlows(self.redirector.flows, self.redirector.own_ports)
        self.on_listen = None  # set by record_events

    async def start(self, stop) -> bool:
        # The proxy listens first (plaintext listeners on ports the kernel picks), then the
        # reflector starts with those ports.
        ports = await self.on_listen({443: self.proxy_port, **{port: 0 for port in self.plain.ports}})
        self.redirector.proxy_ports.update(ports)
        await asyncio.get_running_loop().run_in_executor(None, self.redirector.start)
        return True

    @property
    def notes(self) -> list[str]:
        return self.redirector.notes

    @property
    def failure(self) -> str | None:
        return self.redirector.failure

    def counters(self) -> dict:
        return self.redirector.counters()

    async def refresh(self) -> None:
        pass  # counters() reads the redirector directly

    async def stop_opening(self) -> None:
        if self.redirector.reflector is not None:
            self.redirector.reflector.stop_opening()

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.redirector.stop)


def _split(args, user) -> int:
    """This process the redirector, `oisp sensor` the sensor, as `user`."""
    from oisp.cli.options import plain_ports
    from oisp.cli.redirector import RedirectorRole
    from oisp.ipc.transport import AccessPolicy, TransportError
    from oisp.redirect.plain import PlainSpecError
    from oisp.spec import load_spec

    def say(text: str) -> None:
        print(f"oisp record: {text}", file=sys.stderr, flush=True)

    try:
        spec, plain = plain_ports(load_spec(args.spec), args.plain, local=not args.no_local,
                                  reserved={443, args.proxy_port})
    except (PlainSpecError, KeyError) as e:
        say(f"--plain: {e}")
        return 2
    # One socket per run: a service's redirector (/run/oisp/ipc.sock) may be running too.
    address = f"{SOCKET_DIR}/record-{os.getpid()}.sock"
    role = RedirectorRole(args, spec, plain, address=address, policy=AccessPolicy.user(user.pw_uid),
                          owner=(user.pw_uid, None), say=say)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        role.start()
    except TransportError as e:
        say(str(e))
        return 1
    argv = [sys.executable, "-m", "oisp", "sensor", "--from-record", "--socket", address,
            *argv_of(sensor_parser(), args)]
    try:
        # Its standard input is a pipe whose other end only we hold: it stops when we are gone.
        sensor = subprocess.Popen(argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                                  env=sensor_env(os.environ, user), stdin=subprocess.PIPE)
    except OSError as e:
        say(f"cannot start the sensor as {user.pw_name}: {e}")
        role.stop()
        return 1
    failure = died = None
    try:
        while not stopping.wait(0.1):
            died = sensor.poll()
            if died is not None:
                break
            failure = role.failure
            if failure:
                say(f"{failure}; stopped diverting, traffic flows directly")
                break
    finally:
        role.stop_opening()  # first: nothing new reflected into a sensor that is stopping
        if sensor.poll() is None:
            sensor.send_signal(signal.SIGINT)  # its clean stop: drain, cut, the summary
            try:
                sensor.wait(SENSOR_STOP_WAIT)
            except subprocess.TimeoutExpired:
                sensor.kill()
                sensor.wait()
        time.sleep(0.2)  # the cut connections' resets cross the reflector
        role.stop()
        sensor.stdin.close()
    if died is not None and died < 0:
        say(f"the sensor died ({signal.Signals(-died).name}); stopped diverting, traffic flows directly")
        return 1
    return 1 if failure or sensor.returncode < 0 else sensor.returncode
