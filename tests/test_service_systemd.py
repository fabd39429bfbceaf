"""`oisp service install`, `status` and `uninstall` against a real systemd (PID 1 of a
throwaway machine, tests/systemd_lab.py): systemctl daemon-reload and enable --now,
systemctl show and the journal, and each unit's sandbox as systemd builds it.

Until `oisp redirector` and `oisp sensor` exist, a drop-in gives each unit a probe as
its program, run under the unit's own settings: the redirector's opens a divert handle
and serves the IPC socket in RuntimeDirectory=, the sensor's makes its CA in
StateDirectory= and connects to that socket. The probes print what they saw as one
JSON line to the journal."""

from __future__ import annotations

import json
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from tests import systemd_lab

ROOT = Path(__file__).resolve().parents[1]
USER = "service-lab-user"
PYTHON = sys.executable
PROBES = "/usr/local/lib/oisp-service-probe"

REDIRECTOR_PROBE = r"""
import json, os, pwd, socket, sys
from oisp.divert import Handle
from oisp.ipc.transport import listen_unix
out = {"uid": os.geteuid()}
Handle("tcp.DstPort == 443").close()
out["divert"] = True
user = pwd.getpwnam(sys.argv[1])
sock = listen_unix("/run/oisp/ipc.sock", uid=user.pw_uid)
info = os.stat("/run/oisp")
out["socket_dir"] = [info.st_uid, oct(info.st_mode & 0o777)]
out["socket_uid"] = os.stat("/run/oisp/ipc.sock").st_uid
try:
    open("/etc/oisp/written-by-the-redirector", "w")
    out["etc"] = "writable"
except OSError as e:
    out["etc"] = e.strerror
print(json.dumps(out), flush=True)
sock.setblocking(True)
while True:
    conn, _ = sock.accept()
    conn.sendall(b"redirector\n")
    conn.close()
"""

SENSOR_PROBE = r"""
import json, os, socket, struct, time
out = {"uid": os.geteuid()}
for line in open("/proc/self/status"):
    if line.startswith(("CapEff", "CapBnd", "CapAmb", "NoNewPrivs")):
        key, value = line.split(":")
        out[key] = value.strip()
from oisp.proxy.ca import CertificateAuthority
ca = CertificateAuthority.load_or_create()
out["ca"] = str(ca.cert_path)
out["ca_uid"] = os.stat(ca.cert_path).st_uid
out["data_dir_mode"] = oct(os.stat(os.path.dirname(ca.cert_path)).st_mode & 0o777)
for attempt in range(100):  # the redirector may still be starting
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect("/run/oisp/ipc.sock")
        break
    except OSError:
        time.sleep(0.1)
out["server_uid"] = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
out["server_said"] = c.recv(64).decode().strip()
try:
    out["root_home"] = sorted(os.listdir("/root"))
except OSError as e:
    out["root_home"] = e.strerror
print(json.dumps(out), flush=True)
while True:
    time.sleep(3600)
"""


@pytest.fixture
def lab(tmp_path):
    problem = systemd_lab.missing()
    if problem:
        pytest.skip(problem)
    machine = systemd_lab.SystemdLab(f"oisp-service-lab-{tmp_path.name[-12:]}", tmp_path)
    try:
        machine.start()
        # The lab's interpreter imports the oisp under test first (in the lab's overlay only).
        machine.write(f"{sysconfig.get_paths()['purelib']}/00-oisp-service-lab.pth", f"{ROOT}\n")
        machine.run("useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", USER)
        machine.write("/etc/oisp/oisp.toml", f'[service]\nuser = "{USER}"\n')
        machine.run("chmod", "0644", "/etc/oisp/oisp.toml")
        yield machine
    finally:
        machine.stop()


def _oisp(lab, *argv: str, check: bool = True):
    return lab.run(PYTHON, "-I", "-m", "oisp", *argv, check=check)


def _show(lab, unit: str, *props: str) -> dict[str, str]:
    out = lab.run("systemctl", "show", f"--property={','.join(props)}", unit).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _journal_json(lab, unit: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = lab.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout.splitlines()
        found = [line for line in lines if line.startswith("{")]
        if found:
            return json.loads(found[-1])
        time.sleep(0.3)
    raise AssertionError(f"{unit} printed no probe line: {lab.run('journalctl', '--no-pager', '-u', unit).stdout}")


@pytest.mark.privileged
@pytest.mark.slow
def test_install_status_and_uninstall_under_systemd(lab):
    done = _oisp(lab, "service", "install")
    assert "enabled and started" in done.stdout, done.stdout + done.stderr
    for unit in ("oisp-redirector.service", "oisp-sensor.service"):
        props = _show(lab, unit, "LoadState", "UnitFileState", "FragmentPath")
        assert props == {"LoadState": "loaded", "UnitFileState": "enabled",
                         "FragmentPath": f"/etc/systemd/system/{unit}"}, props
    # Without their subcommands the units fail (until the split lands): their journal says why.
    status = json.loads(_oisp(lab, "service", "status", "--json", "--journal", "5").stdout)
    assert status["systemd"] is True and status["installed"] is True
    assert status["units"]["oisp-sensor.service"]["user"] == USER
    assert status["units"]["oisp-sensor.service"]["systemd"]["LoadState"] == "loaded"
    assert "oisp" in status["units"]["oisp-redirector.service"]["journal"]

    # Each unit's sandbox, with a probe for its program.
    for role, probe in (("redirector", REDIRECTOR_PROBE), ("sensor", SENSOR_PROBE)):
        lab.write(f"{PROBES}/{role}.py", probe)
        lab.write(f"/etc/systemd/system/oisp-{role}.service.d/probe.conf",
                  f"[Service]\nExecStart=\nExecStart={PYTHON} -I {PROBES}/{role}.py {USER}\n")
    lab.run("systemctl", "daemon-reload")
    lab.run("systemctl", "restart", "oisp-redirector.service")
    lab.run("systemctl", "restart", "oisp-sensor.service")
    uid = int(lab.run("id", "-u", USER).stdout)
    redirector = _journal_json(lab, "oisp-redirector.service")
    assert redirector == {"uid": 0, "divert": True, "socket_dir": [0, "0o755"], "socket_uid": uid,
                          "etc": "Read-only file system"}, redirector
    sensor = _journal_json(lab, "oisp-sensor.service")
    # Of root's home the sensor sees at most the way to this install (ProtectHome=tmpfs), else nothing.
    shown = {Path(p).parts[2] for p in (sys.base_prefix, sys.prefix, str(ROOT)) if Path(p).parts[1:2] == ("root",)}
    seen = sensor.pop("root_home")
    assert seen == "Permission denied" or set(seen) <= shown, seen
    assert sensor == {"uid": uid, "CapEff": "0" * 16, "CapBnd": "0" * 16, "CapAmb": "0" * 16, "NoNewPrivs": "1",
                      "ca": "/var/lib/oisp/oisp-ca.pem", "ca_uid": uid, "data_dir_mode": "0o700",
                      "server_uid": 0, "server_said": "redirector"}, sensor

    # A restart of the redirector leaves the sensor running (it reconnects by itself).
    before = _show(lab, "oisp-sensor.service", "ActiveState", "MainPID")
    assert before["ActiveState"] == "active"
    first = _show(lab, "oisp-redirector.service", "MainPID")["MainPID"]
    lab.run("systemctl", "restart", "oisp-redirector.service")
    assert _show(lab, "oisp-redirector.service", "MainPID")["MainPID"] != first
    assert _show(lab, "oisp-sensor.service", "ActiveState", "MainPID") == before

    text = _oisp(lab, "service", "status").stdout
    assert f"oisp-sensor.service      installed, as {USER}; active (running), enabled, pid {before['MainPID']}" in text
    assert "oisp-sensor.service" in _oisp(lab, "check", check=False).stdout

    again = _oisp(lab, "service", "install")
    assert again.stdout.count(" unchanged") == 2, again.stdout  # idempotent

    gone = _oisp(lab, "service", "uninstall")
    assert gone.stdout.count("removed /etc/systemd/system/oisp-") == 2, gone.stdout
    for unit in ("oisp-redirector.service", "oisp-sensor.service"):
        assert _show(lab, unit, "ActiveState")["ActiveState"] == "inactive"
    assert lab.run("ls", "/etc/systemd/system/multi-user.target.wants").stdout.count("oisp-") == 0
    # Exactly what install wrote: the test's own drop-ins are left.
    assert lab.run("ls", "/etc/systemd/system/oisp-sensor.service.d").stdout.split() == ["probe.conf"]
    assert _oisp(lab, "service", "status", check=False).returncode == 1
