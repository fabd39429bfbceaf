"""`oisp redirector`: the elevated half of `oisp record` (root). The divert handles, the
reflector and its fast path, the flow table, DNS learning, QUIC refusal and the
guardian; nothing that parses what programs send. It serves the sensor (`oisp sensor`,
run as a user) over one Unix socket, reachable by --user or --group alone.

Nothing is reflected until a sensor has connected and shown it holds the listening
ports (each listening socket must be its uid's, one held by its process); when that
sensor's connection closes (a clean stop or a kill -9), new connections go straight
to their servers again within moments, and the ones in flight get resets at once.
Runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

from oisp.cli.configured import add_config_option
from oisp.cli.options import add_redirector_options, add_selection_options, add_socket_option


def register(sub) -> None:
    parser = sub.add_parser("redirector", help="the elevated half of record: divert and reflect (root)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_redirector_options(parser)
    add_selection_options(parser)
    add_socket_option(parser, "to serve")
    # Not required here: the service names the user in its config file, whose values
    # arrive after this parse (oisp.cli.configured); run() insists on one.
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="NAME", help="the user whose sensor may connect")
    who.add_argument("--group", metavar="NAME", help="the group whose members' sensors may connect")
    add_config_option(parser)
    parser.set_defaults(func=run)


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nobody holds now (the kernel's choice), for the plaintext
    listeners. The probes stay bound until all are chosen: a port freed is handed out again."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            probes.append(probe)
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class RedirectorRole:
    """The Redirector, the gate that lets it reflect only to a believed sensor, and the
    IPC server the sensor talks to. `start()` from the main thread, `stop()` once."""

    def __init__(self, args, spec, plain, *, address: str, policy, owner: tuple[int, int | None],
                 say=lambda text: None, on_change=lambda text: None):
        """`say` is told what was refused; `on_change`, when a sensor starts or stops recording."""
        from oisp.ipc.server import IPCServer, ListenersRefused, flow_table_handlers
        from oisp.redirect import Redirector
        from oisp.redirect.listeners import ListenerGate

        # Where each server port is reflected: fixed now, as the reflector's filter names these
        # ports; the sensor is told in the welcome and must listen there.
        self.listen = {443: args.proxy_port, **dict(zip(sorted(plain.ports), free_ports(len(plain.ports))))}
        self.redirector = Redirector(spec, proxy_ports=self.listen, include=args.process, exclude=args.exclude,
                                     idle_timeout=args.flow_idle_timeout, plain=plain,
                                     refuse_quic=not args.allow_quic, on_quic_refused=self._quic, opening=False)
        self.gate = ListenerGate(self.listen, self.redirector.opening_changed, on_change=on_change)
        handlers = flow_table_handlers(self.redirector.flows, self.redirector.own_ports,
                                       lambda: {**self.redirector.counters(), "listeners": dict(self.gate.counts)})

        def set_listeners(session, peer, wanted: dict[int, int]) -> None:
            try:
                self.gate.set(session, peer, wanted)
            except ValueError as e:
                say(f"refused a sensor's listeners: {e}")
                raise ListenersRefused(str(e)) from None

        handlers.set_listeners, handlers.listeners_dropped, handlers.listen = set_listeners, self.gate.dropped, self.listen
        self.server = IPCServer(handlers, policy, address=address, owner=owner)

    def _quic(self, flow: dict) -> None:
        self.server.quic_refused(flow)

    def start(self) -> RedirectorRole:
        """The redirector first (reflecting nothing yet), then the socket: a sensor that
        connects finds every note in force."""
        self.redirector.start()
        for note in self.redirector.notes:
            self.server.note(note, level="degraded")
        try:
            self.server.start()
        except BaseException:
            self.redirector.stop()
            raise
        return self

    @property
    def failure(self) -> str | None:
        return self.redirector.failure

    def stop_opening(self) -> None:
        self.redirector.opening_changed(False)

    def stop(self) -> None:
        """New connections first go straight to their servers, then the sensor is told
        goodbye, then the handles close."""
        self.stop_opening()
        self.server.stop()
        self.redirector.stop()


def preflight(label: str) -> int | None:
    """The checks before diverting anything: an exit status if it cannot, else None."""
    from oisp.divert.preflight import check_fail_open, check_privileges, sweep_orphaned_filters

    problems = check_privileges()
    if problems:
        for problem in problems:
            print(f"{label}: {problem.message}\n  fix: {problem.fix}", file=sys.stderr)
        return 3
    if removed := sweep_orphaned_filters():  # black-holing traffic since their process died
        print(f"{label}: removed {removed} eBPFDivert filters a dead process had left", file=sys.stderr)
    for problem in check_fail_open():
        print(f"{label}: note: {problem.message}\n  fix: {problem.fix}", file=sys.stderr)
    return None


def access_for(user: str | None, group: str | None):
    """The AccessPolicy and the socket's owner for --user NAME or --group NAME."""
    import grp
    import pwd

    from oisp.ipc.transport import AccessPolicy

    if user is not None:
        entry = pwd.getpwnam(user)
        return AccessPolicy.user(entry.pw_uid), (entry.pw_uid, None)
    gid = grp.getgrnam(group).gr_gid
    return AccessPolicy(gids=frozenset([gid])), (0, gid)


def run(args) -> int:
    from oisp.cli.options import plain_ports
    from oisp.redirect.plain import PlainSpecError
    from oisp.spec import load_spec

    label = "oisp redirector"
    if not (args.user or args.group):
        print(f"{label}: say whose sensor may connect: --user NAME or --group NAME "
              f"(or `user` in the config file's [service] table)", file=sys.stderr)
        return 2
    failed = preflight(label)
    if failed is not None:
        return failed
    try:
        policy, owner = access_for(args.user, args.group)
    except KeyError:
        print(f"{label}: no such {'user' if args.user else 'group'}: {args.user or args.group}", file=sys.stderr)
        return 2
    try:
        spec, plain = plain_ports(load_spec(args.spec), args.plain, local=not args.no_local,
                                  reserved={443, args.proxy_port})
    except (PlainSpecError, KeyError) as e:
        print(f"{label}: --plain: {e}", file=sys.stderr)
        return 2
    sys.setswitchinterval(0.0002)  # see oisp.cli.record: the reflector thread decides SYNs in Python

    def say(text: str) -> None:
        print(f"{label}: {text}", file=sys.stderr, flush=True)

    from oisp.ipc.transport import TransportError

    role = RedirectorRole(args, spec, plain, address=args.socket, policy=policy, owner=owner, say=say, on_change=say)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        role.start()
    except TransportError as e:
        say(str(e))
        return 1
    for note in role.redirector.notes:
        say(f"note: {note}")
    say(f"serving sensors at {args.socket} (reflecting to "
        + ", ".join(f"{server}→:{port}" for server, port in sorted(role.listen.items()))
        + "); nothing is reflected until a sensor listens")
    failure = None
    try:
        while not stop.wait(0.5):
            failure = role.failure
            if failure:
                say(f"{failure}; stopped diverting, traffic flows directly")
                break
    finally:
        role.stop()
    return 1 if failure else 0
