"""The demo's throwaway lab: two network namespaces joined by a veth pair.

`client` is where programs and `oisp record` run; its hosts file names the
provider's private address api.openai.com and api.anthropic.com. `provider`
holds the stand-in provider on :443. Nothing leaves the pair: the addresses are
private and no namespace has a route out.

Everything made is named after the demo's pid (`oisp-demo-<pid>-c`), so a lab
left by a demo that was killed can be told apart and removed by the next one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "oisp-demo-"
NETNS_ETC = Path("/etc/netns")  # `ip netns exec` bind-mounts NETNS_ETC/<name>/hosts over /etc/hosts


class LabError(RuntimeError):
    """The lab could not be built; the message says what to install or run."""


def _ip(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _namespaces() -> list[str]:
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _kill_inside(name: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_namespace(name: str) -> None:
    _kill_inside(name)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove the namespaces of demos whose process is gone; returns their names."""
    removed = []
    for name in _namespaces():
        match = re.fullmatch(re.escape(PREFIX) + r"(\d+)-[cp]", name)
        if match and not _alive(int(match.group(1))):
            remove_namespace(name)
            removed.append(name)
    return removed


@dataclass
class Lab:
    client: str
    provider: str
    client_ip: str
    provider_ip: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, hosts: list[str]) -> Lab:
        if shutil.which("ip") is None:
            raise LabError("the `ip` command is missing: apt-get install iproute2")
        pid = os.getpid()
        n = pid % 250 + 1
        lab = cls(f"{PREFIX}{pid}-c", f"{PREFIX}{pid}-p", f"10.203.{n}.1", f"10.203.{n}.2")
        veth_c, veth_p = f"odc{pid % 100000}", f"odp{pid % 100000}"
        try:
            for name in (lab.client, lab.provider):
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
            _ip("link", "add", veth_c, "netns", lab.client, "type", "veth", "peer", "name", veth_p, "netns", lab.provider)
            for name, dev, address in ((lab.client, veth_c, lab.client_ip), (lab.provider, veth_p, lab.provider_ip)):
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", dev)
                _ip("-n", name, "link", "set", dev, "up")
            etc = NETNS_ETC / lab.client
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{lab.provider_ip} {' '.join(hosts)}\n")
        except BaseException:
            lab.remove()
            raise
        return lab

    def command(self, namespace: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv]

    def start(self, namespace: str, *argv: str, **popen) -> subprocess.Popen:
        """A process in a namespace (`ip netns exec` execs it: the pid is the program's own)."""
        process = subprocess.Popen(self.command(namespace, *argv), **popen)
        self.processes.append(process)
        return process

    def remove(self) -> None:
        """Stop every process (SIGINT first, as Ctrl-C would), then remove the namespaces."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for name in (self.client, self.provider):
            remove_namespace(name)
