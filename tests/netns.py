"""Network namespaces for capture tests: made by the test, removed by the test.

Traffic in them never leaves the machine: loopback inside one namespace, or a
veth pair with private addresses between two namespaces the test created.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path
import sys
from dataclasses import dataclass, field

_counter = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NetNS:
    name: str
    addresses: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> NetNS:
        ns = cls(f"oisp-t{os.getpid()}-{next(_counter)}")
        _ip("netns", "add", ns.name)
        _ip("-n", ns.name, "link", "set", "lo", "up")
        return ns

    def delete(self) -> None:
        # Kill anything still running inside first, so the namespace really goes away.
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*argv), capture_output=True, text=True, timeout=timeout, check=check)

    def python(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run Python in the namespace; a failure shows the child's stderr."""
        done = subprocess.run(self.cmd(sys.executable, *argv), capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv), **kw)


@dataclass
class VethPair:
    """Two namespaces joined by a veth: `a` holds 10.200.N.1 / fd00:N::1, `b` holds .2 / ::2."""

    a: NetNS
    b: NetNS
    a_ip4: str
    b_ip4: str
    a_ip6: str
    b_ip6: str

    @classmethod
    def create(cls) -> VethPair:
        n = next(_counter) % 250 + 1
        a, b = NetNS.create(), NetNS.create()
        pair = cls(a, b, f"10.200.{n}.1", f"10.200.{n}.2", f"fd00:{n}::1", f"fd00:{n}::2")
        try:
            ifa, ifb = f"va{os.getpid() % 10000}x{n}", f"vb{os.getpid() % 10000}x{n}"
            _ip("link", "add", ifa, "netns", a.name, "type", "veth", "peer", "name", ifb, "netns", b.name)
            for ns, ifname, ip4, ip6 in ((a, ifa, pair.a_ip4, pair.a_ip6), (b, ifb, pair.b_ip4, pair.b_ip6)):
                _ip("-n", ns.name, "addr", "add", f"{ip4}/24", "dev", ifname)
                _ip("-n", ns.name, "addr", "add", f"{ip6}/64", "dev", ifname, "nodad")
                _ip("-n", ns.name, "link", "set", ifname, "up")
        except Exception:
            pair.delete()
            raise
        return pair

    def delete(self) -> None:
        self.a.delete()
        self.b.delete()


def stop_all(processes: list[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM every process still running, then wait; kill what does not stop."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def agent_args(*words: str, **options) -> list[str]:
    """The command line of a namespace agent (tests/agents/*.py): its scenario (if it has
    any), then each option as `--name value` (`slots=16` → `--slots 16`); True gives the
    bare flag, and False or None leave the option out (the agent's default)."""
    argv = list(words)
    for name, value in options.items():
        if value is None or value is False:
            continue
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def with_cgroup2(*argv: str) -> list[str]:
    """FLOW/SOCKET layers need cgroup v2: a private mount namespace with it mounted."""
    return ["unshare", "-m", "sh", "-c",
            "mount --make-rprivate / && mount -t cgroup2 none /sys/fs/cgroup && exec " + " ".join(argv)]


# tests/agents/echo_traffic.py, the traffic `oisp capture` and `oisp flows` tests read back,
# and the ports its server listens on.
ECHO_AGENT = str(Path(__file__).parent / "agents" / "echo_traffic.py")
ECHO_TCP_PORT, ECHO_UDP_PORT = 7001, 7002


def echo_args(role: str, host: str, **options) -> list[str]:
    """The echo agent's command line ("server" or "client") on the echo ports."""
    return [ECHO_AGENT, *agent_args(role, host=host, tcp_port=ECHO_TCP_PORT, udp_port=ECHO_UDP_PORT, **options)]
