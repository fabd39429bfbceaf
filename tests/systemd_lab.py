"""A throwaway machine with systemd as PID 1, for the service tests: these VMs' init is
not systemd, so `oisp service install` could not otherwise run `systemctl`.

systemd boots (to basic.target: no getty, no other services) in new mount, pid, network,
UTS, IPC and cgroup namespaces, on an overlay of this machine's root whose writes land in
a tmpfs: what it and the tests change (users, /etc, unit files, /var/lib) is gone when it
stops, and the host's /tmp, /run and /etc are never touched. As systemd-nspawn does, it
gets a /dev of its own (a few device nodes, a new devpts), /sys and /proc/sys read-only
(so no udev, sysctl or binfmt unit runs, nothing kernel-wide is set) and no capability to
load modules or set the clock; and a cgroup2 subtree of its own (its cgroup namespace's
root), which `stop()` kills (cgroup.kill) and removes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"

# Runs as PID 1 of the new namespaces: mounts the overlay, then becomes systemd.
BOOT = r"""
set -e
D="$1"
mount -t tmpfs -o mode=0700 tmpfs "$D"
mkdir -p "$D/upper" "$D/work" "$D/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$D/upper,workdir=$D/work" "$D/root"
R="$D/root"
mount -t proc proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs sysfs "$R/sys"
mount -o remount,bind,ro "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$R/dev"
for node in null zero full random urandom tty; do
    touch "$R/dev/$node"
    mount --bind "/dev/$node" "$R/dev/$node"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
cd "$R"
mkdir -p .oisp-old-root
pivot_root . .oisp-old-root
umount -l /.oisp-old-root
exec setpriv --bounding-set=-sys_module,-sys_time,-sys_rawio,-wake_alarm,-syslog,-sys_pacct,-mac_admin,-mac_override \
    env container=oisp-service-test "$2" --unit=basic.target
"""


def cgroup2_mount() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            return Path(left.split()[4])
    return None


def missing() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists(SYSTEMD):
        return f"needs systemd ({SYSTEMD}: apt-get install systemd)"
    if not shutil.which("nsenter") or not shutil.which("unshare"):
        return "needs nsenter and unshare (util-linux)"
    if cgroup2_mount() is None:
        return "needs a cgroup2 hierarchy"
    return None


class SystemdLab:
    def __init__(self, name: str, workdir: Path):
        self.name = name
        self.workdir = workdir
        own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
        self.cgroup = cgroup2_mount() / own.lstrip("/") / name
        self.pid: int | None = None

    def start(self, timeout: float = 60.0) -> SystemdLab:
        self.cgroup.mkdir()
        mnt = self.workdir / "mnt"
        mnt.mkdir()
        log = open(self.workdir / "boot.log", "wb")
        # The shell moves itself into the lab's cgroup, then unshare makes that the new
        # cgroup namespace's root and forks PID 1 of the new pid namespace.
        subprocess.Popen(["sh", "-c", f'echo $$ > "{self.cgroup}/cgroup.procs" && exec unshare --mount --pid --fork '
                                      '--net --uts --ipc --cgroup --propagation private sh -c "$0" boot "$1" "$2"',
                          BOOT, str(mnt), SYSTEMD], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            self.pid = self._init_pid()
            if self.pid:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self
            time.sleep(0.5)
        raise AssertionError(f"systemd did not come up in {timeout:.0f} s (state {state!r}): "
                             f"{(self.workdir / 'boot.log').read_text(errors='replace')}")

    def _init_pid(self) -> int | None:
        """The lab's PID 1, as this (the host's) pid namespace numbers it."""
        for procs in self.cgroup.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
                if len(nspid) == 2 and nspid[1] == "1":
                    return int(pid)
        return None

    def run(self, *argv: str, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command inside the lab (all its namespaces, its root)."""
        done = subprocess.run(["nsenter", "-t", str(self.pid), "-a", *argv], input=input, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode} in the lab:\n{done.stdout}\n{done.stderr}")
        return done

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-c", 'mkdir -p "$(dirname "$0")" && cat > "$0"', path, input=text)

    def stop(self) -> None:
        """Kill everything in the lab (its mounts go with its last process) and remove its cgroups."""
        if not self.cgroup.exists():
            return
        (self.cgroup / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.read_text().strip() for p in self.cgroup.rglob("cgroup.procs")):
            time.sleep(0.1)
        for directory in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            directory.rmdir()
        self.cgroup.rmdir()
