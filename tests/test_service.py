"""`oisp service`: the units built from configs (read as text), checked by systemd's own
`systemd-analyze verify` and `security`, installed into a test directory and removed
again, and the redirector's capability set measured: under exactly the unit's bounding
set a divert handle opens, the IPC socket is given to the user and other users' sockets
are named, and without any one of those capabilities one of them fails.

systemd is not PID 1 on these machines (a VM whose init is process_api): the units meet a
running systemd in tests/test_service_systemd.py, which boots one in a throwaway machine."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oisp import config
from oisp.service import units, windows
from oisp.service.systemd import installed, remove_units, state, write_units, ServiceError

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ("/usr/bin/python3", "-I", "-m", "oisp")
USER = "service-sensor"  # made by the `service_user` fixture


def _config(text: str = "", path: str = "/etc/oisp/oisp.toml") -> config.Config:
    return config.parse(text, path)


def _plan(text: str = f'[service]\nuser = "{USER}"\n', **kw) -> units.Plan:
    kw.setdefault("command", COMMAND)
    kw.setdefault("user", config.parse(text, "/etc/oisp/oisp.toml").get("service.user"))
    return units.plan(_config(text), **kw)


def _settings(text: str, name: str) -> list[str]:
    return [line.partition("=")[2] for line in text.splitlines() if line.partition("=")[0] == name]


@pytest.fixture
def service_user():
    """A real user for the sensor (systemd-analyze checks User= exists)."""
    subprocess.run(["userdel", USER], capture_output=True)  # left by a run that was killed
    subprocess.run(["groupdel", USER], capture_output=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", USER],
                   check=True, capture_output=True)
    try:
        yield pwd.getpwnam(USER)
    finally:
        subprocess.run(["userdel", USER], capture_output=True)
        subprocess.run(["groupdel", USER], capture_output=True)


# -- the unit text -------------------------------------------------------------------------
def test_the_sensor_runs_as_the_user_with_no_capabilities():
    text = units.sensor_unit(_plan())
    assert units.is_ours(text)
    assert units.unit_setting(text, "User") == USER
    assert units.unit_setting(text, "CapabilityBoundingSet") == ""  # empty: none at all
    assert units.unit_setting(text, "AmbientCapabilities") == ""
    assert units.unit_setting(text, "NoNewPrivileges") == "yes"
    assert units.unit_setting(text, "ExecStart") == "/usr/bin/python3 -I -m oisp sensor --config /etc/oisp/oisp.toml"
    assert units.unit_setting(text, "StateDirectory") == "oisp"
    assert "XDG_DATA_HOME=/var/lib" in units.unit_setting(text, "Environment")
    assert units.unit_setting(text, "Restart") == "on-failure"


def test_a_redirector_restart_does_not_restart_the_sensor():
    """Requires=, BindsTo= and PartOf= all carry a restart of the redirector over to the
    sensor (systemd.unit(5)); Wants= does not."""
    text = units.sensor_unit(_plan())
    for carries_restart in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert _settings(text, carries_restart) == []
    assert units.REDIRECTOR in units.unit_setting(text, "Wants").split()
    assert units.REDIRECTOR in units.unit_setting(text, "After").split()


def test_the_redirector_runs_as_root_with_what_divert_and_the_ipc_need():
    from oisp.divert import preflight

    text = units.redirector_unit(_plan())
    assert units.unit_setting(text, "User") is None  # root
    held = set(units.unit_setting(text, "CapabilityBoundingSet").split())
    # What preflight.check_privileges wants on a kernel with CAP_BPF (without CAP_SYS_ADMIN):
    needed = {preflight.CAP_NAMES[c] for c in (preflight.CAP_NET_ADMIN, preflight.CAP_NET_RAW,
                                              preflight.CAP_BPF, preflight.CAP_PERFMON)}
    assert needed <= held and "CAP_SYS_ADMIN" not in held
    assert units.unit_setting(text, "ExecStart") == "/usr/bin/python3 -I -m oisp redirector --config /etc/oisp/oisp.toml"
    assert units.unit_setting(text, "RuntimeDirectory") == "oisp"  # /run/oisp, the socket's directory
    assert units.unit_setting(text, "RuntimeDirectoryMode") == "0755"  # what oisp.ipc.transport requires
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert units.unit_setting(text, hardening) == "yes"
    assert units.unit_setting(text, "ProtectSystem") == "strict"


def test_the_socket_directory_and_an_install_user_reach_the_units():
    plan = _plan('[service]\nuser = "bob"\nsocket = "/run/oisp-lab/ipc.sock"\n', user="carol")
    redirector, sensor = units.redirector_unit(plan), units.sensor_unit(plan)
    assert units.unit_setting(redirector, "RuntimeDirectory") == "oisp-lab"
    assert units.unit_setting(redirector, "ExecStart").endswith("redirector --config /etc/oisp/oisp.toml --user carol")
    assert units.unit_setting(sensor, "User") == "carol"
    same = _plan('[service]\nuser = "carol"\n', user="carol")  # the config's own user: nothing to pass
    assert "--user" not in units.unit_setting(units.redirector_unit(same), "ExecStart")


def test_a_group_and_an_output_elsewhere_reach_the_sensor():
    plan = _plan(f'[service]\nuser = "{USER}"\ngroup = "oisp"\n[output]\njsonl = "/var/log/oisp/events.jsonl"\n')
    text = units.sensor_unit(plan)
    assert units.unit_setting(text, "Group") == "oisp"
    assert units.unit_setting(text, "ReadWritePaths") == "/var/log/oisp"
    inside = units.sensor_unit(_plan(f'[service]\nuser = "{USER}"\n[output]\njsonl = "/var/lib/oisp/e.jsonl"\n'))
    assert units.unit_setting(inside, "ReadWritePaths") is None  # the state directory is writable already


def test_an_install_under_a_home_directory_is_shown_read_only_and_nothing_else():
    plan = _plan(install=("/root/.pyenv/versions/3.11.7", "/usr"))
    for text in units.build(plan).values():
        assert units.unit_setting(text, "ProtectHome") == "tmpfs"
        assert units.unit_setting(text, "BindReadOnlyPaths") == "/root/.pyenv/versions/3.11.7"


@pytest.mark.parametrize("text, user, message", [
    ("", None, "name the sensor's user"),
    ('[service]\nuser = "root"\n', None, "must not run as root"),
    (f'[service]\nuser = "{USER}"\nsocket = "/var/run/oisp/ipc.sock"\n', None, "directly under /run"),
    (f'[service]\nuser = "{USER}"\nsocket = "/run/ipc.sock"\n', None, "directly under /run"),
    (f'[service]\nuser = "{USER}"\n[capture]\nspec = "/home/alice/spec.json"\n', None, "capture.spec: /home/alice"),
    (f'[service]\nuser = "{USER}"\n[output]\njsonl = "/root/e.jsonl"\n', None, "ProtectHome=yes"),
    (f'[service]\nuser = "{USER}"\n[output]\nwebhook = "@/home/a/url"\n', None, "output.webhook"),
    ("", "bad user", "may hold only letters"),
])
def test_configs_the_units_cannot_run_are_refused(text, user, message):
    with pytest.raises(units.UnitError, match=message):
        units.plan(_config(text), command=COMMAND, user=user or _config(text).get("service.user"))


# -- systemd's own checks ------------------------------------------------------------------
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None or os.geteuid() != 0,
                                   reason="needs systemd-analyze (apt-get install systemd) and root (a test user)")


def _analyze(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *argv], capture_output=True, text=True, timeout=120)


def _write(tmp_path: Path, texts: dict[str, str]) -> list[str]:
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    return [str(tmp_path / name) for name in texts]


@needs_analyze
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path, service_user):
    """verify loads the units as systemd would, checks that ExecStart's program exists and
    that User= is a user, and says every key it does not take; it runs nothing, so the
    arguments of `oisp redirector` and `oisp sensor` are not its business."""
    plan = _plan(command=(sys.executable, "-I", "-m", "oisp"))
    paths = _write(tmp_path, units.build(plan))
    done = _analyze("verify", *paths)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr
    # ... and it does speak up: a misspelt key, an unknown value, a missing program.
    text = units.sensor_unit(plan)
    for broken, says in [(text.replace("Wants=", "Wantz="), "Unknown key 'Wantz'"),
                         (text.replace("Restart=on-failure", "Restart=sometimes"), "restart specifier"),
                         (text.replace(sys.executable, "/nonexistent/python"), "is not executable")]:
        (tmp_path / units.SENSOR).write_text(broken)
        assert says in _analyze("verify", str(tmp_path / units.SENSOR)).stderr


@needs_analyze
def test_systemd_analyze_security_rates_both_units_well(tmp_path, service_user):
    """systemd's own exposure score (0 best, 10 worst; 'OK' up to 4.9): the sensor, which
    parses what any program or provider sends, has to be locked down hardest."""
    paths = _write(tmp_path, units.build(_plan(command=(sys.executable, "-I", "-m", "oisp"))))
    scores = {}
    for path in paths:
        done = _analyze("security", "--offline=yes", "--no-pager", path)
        line = next(line for line in done.stdout.splitlines() if "Overall exposure level" in line)
        scores[Path(path).name] = float(line.split(":")[1].split()[0])
    assert scores[units.SENSOR] <= 2.0, scores
    assert scores[units.REDIRECTOR] <= 4.8, scores  # root with seven capabilities


# -- install and uninstall, into a test directory ------------------------------------------
def _oisp(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oisp", *argv], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, **kw)


@pytest.fixture
def config_file(tmp_path, service_user) -> Path:
    path = tmp_path / "etc" / "oisp.toml"
    path.parent.mkdir()
    path.write_text(f'[service]\nuser = "{USER}"\n[capture]\nproxy_port = 9443\n')
    path.chmod(0o644)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a user for the sensor")
def test_install_then_uninstall_round_trip(tmp_path, config_file):
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / "someone-else.service").write_text("[Service]\nExecStart=/bin/true\n")
    done = _oisp("service", "install", "--config", str(config_file), "--unit-dir", str(unit_dir), "--no-start")
    assert done.returncode == 0, done.stderr
    for name in units.UNITS:
        path = unit_dir / name
        assert f"{path} new" in done.stdout
        assert path.stat().st_mode & 0o777 == 0o644 and units.is_ours(path.read_text())
        assert f"--config {config_file}" in units.unit_setting(path.read_text(), "ExecStart")
    assert f"{unit_dir} is not systemd's directory: systemctl not run" in done.stdout
    first = {name: (unit_dir / name).read_text() for name in units.UNITS}

    again = _oisp("service", "install", "--config", str(config_file), "--unit-dir", str(unit_dir), "--no-start")
    assert again.returncode == 0 and again.stdout.count(" unchanged") == 2, again.stdout  # idempotent
    assert {name: (unit_dir / name).read_text() for name in units.UNITS} == first

    status = _oisp("service", "status", "--unit-dir", str(unit_dir), "--json")
    report = json.loads(status.stdout)
    assert status.returncode == 0 and report["installed"] is True and report["systemd"] is False
    assert report["units"][units.SENSOR]["user"] == USER and report["units"][units.REDIRECTOR]["user"] == "root"
    text = _oisp("service", "status", "--unit-dir", str(unit_dir)).stdout
    assert f"{units.SENSOR:24} installed, as {USER}; systemd is not running here" in text

    gone = _oisp("service", "uninstall", "--unit-dir", str(unit_dir))
    assert gone.returncode == 0, gone.stderr
    assert sorted(p.name for p in unit_dir.iterdir()) == ["someone-else.service"]  # exactly what install wrote
    assert _oisp("service", "status", "--unit-dir", str(unit_dir)).returncode == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a user for the sensor")
def test_a_unit_of_the_same_name_that_is_not_ours_is_left_alone(tmp_path, config_file):
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    theirs = "[Service]\nExecStart=/bin/true\n"
    (unit_dir / units.SENSOR).write_text(theirs)
    done = _oisp("service", "install", "--config", str(config_file), "--unit-dir", str(unit_dir), "--no-start")
    assert done.returncode == 1 and "was not written by oisp" in done.stderr
    assert not (unit_dir / units.REDIRECTOR).exists()  # nothing half installed
    gone = _oisp("service", "uninstall", "--unit-dir", str(unit_dir))
    assert gone.returncode == 1 and "not written by oisp" in gone.stderr
    assert (unit_dir / units.SENSOR).read_text() == theirs


@pytest.mark.skipif(os.geteuid() != 0, reason="makes a user for the sensor")
def test_install_checks_the_config_before_writing_anything(tmp_path, config_file, service_user):
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for text, says in [("[service]\nuser = \"no-such-user-here\"\n", "no user 'no-such-user-here'"),
                       (f"[service]\nuser = \"{USER}\"\n[capture]\nspec = \"{tmp_path}/absent.json\"\n", "capture.spec"),
                       (f"[service]\nuser = \"{USER}\"\n[capture]\nproxy_port = 0\n", "capture.proxy_port")]:
        config_file.write_text(text)
        done = _oisp("service", "install", "--config", str(config_file), "--unit-dir", str(unit_dir), "--no-start")
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert list(unit_dir.iterdir()) == []
    config_file.chmod(0o666)
    done = _oisp("service", "install", "--config", str(config_file), "--unit-dir", str(unit_dir), "--no-start")
    assert done.returncode == 2 and f"chmod go-w {config_file}" in done.stderr
    config_file.write_text(f"[service]\nuser = \"{USER}\"\n")
    config_file.chmod(0o600)  # root's alone: the sensor could not read it
    done = _oisp("service", "install", "--config", str(config_file), "--unit-dir", str(unit_dir), "--no-start")
    assert done.returncode == 2 and f"the sensor runs as {USER} and could not read it" in done.stderr
    os.chown(config_file, 0, service_user.pw_gid)
    config_file.chmod(0o640)  # the sensor's group may read it
    done = _oisp("service", "install", "--config", str(config_file), "--unit-dir", str(unit_dir), "--no-start")
    assert done.returncode == 0, done.stderr


def test_install_and_uninstall_refuse_without_root(monkeypatch, capsys, tmp_path):
    from oisp.cli import service
    from oisp.service.systemd import UNIT_DIR

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for run, what in ((service.run_install, "install"), (service.run_uninstall, "uninstall")):
        args = type("Args", (), {"unit_dir": UNIT_DIR})()
        assert run(args) == 3
        assert f"needs root to change {UNIT_DIR} and systemd: sudo oisp service {what}" in capsys.readouterr().err


def test_write_and_remove_touch_only_oisps_files(tmp_path):
    texts = units.build(_plan())
    assert [w.state for w in write_units(tmp_path, texts)] == ["new", "new"]
    changed = dict(texts, **{units.SENSOR: texts[units.SENSOR].replace("RestartSec=2s", "RestartSec=3s")})
    assert [w.state for w in write_units(tmp_path, changed)] == ["unchanged", "changed"]
    assert installed(tmp_path)[units.SENSOR] == {"file": str(tmp_path / units.SENSOR), "ours": True, "user": USER}
    (tmp_path / units.REDIRECTOR).write_text("[Service]\n")  # someone replaced ours
    with pytest.raises(ServiceError, match="not written by oisp"):
        write_units(tmp_path, texts)
    removed, foreign = remove_units(tmp_path)
    assert removed == [tmp_path / units.SENSOR] and foreign == [tmp_path / units.REDIRECTOR]
    assert not state(tmp_path)["installed"]


def test_oisp_check_reports_the_service():
    done = _oisp("check", "--json")
    report = json.loads(done.stdout)["service"]
    assert set(report["units"]) == set(units.UNITS) and report["systemd"] == os.path.isdir("/run/systemd/system")
    text = _oisp("check").stdout
    assert "service      " in text


# -- the redirector's capabilities, measured ------------------------------------------------
PROBE = r"""
import json, os, socket, sys
from oisp.divert import Handle
from oisp.ipc.transport import listen_unix
import psutil
uid, port, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = {}
try:
    Handle("tcp.DstPort == 443").close(); out["divert"] = True
except Exception as e:
    out["divert"] = False
try:
    listen_unix(path, uid=uid).close(); out["socket"] = os.stat(path).st_uid == uid
except OSError:
    out["socket"] = False
owners = [c.pid for c in psutil.net_connections(kind="inet") if c.laddr and c.laddr.port == port]
out["owner"] = bool(owners) and owners[0] is not None
print(json.dumps(out))
"""


@pytest.mark.privileged
@pytest.mark.skipif(shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"),
                    reason="needs setpriv (util-linux) and /usr/bin/python3")
def test_the_redirectors_capabilities_are_what_it_needs(tmp_path, netns, service_user):
    """As root in a namespace, under the bounding set the unit names, nothing else: a divert
    handle opens, the IPC socket is given to the sensor's user and the owner of another
    user's socket is named. Without any one of the seven, one of those fails."""
    caps = units.unit_setting(units.redirector_unit(_plan()), "CapabilityBoundingSet").split()
    sock_dir = tmp_path / "run"
    sock_dir.mkdir(mode=0o755)
    port = 47190
    listener = netns.popen("setpriv", f"--reuid={service_user.pw_uid}", f"--regid={service_user.pw_gid}",
                           "--clear-groups", "/usr/bin/python3", "-c",
                           f"import socket,time; s=socket.socket(); s.bind(('127.0.0.1',{port})); s.listen(); "
                           "print('up', flush=True); time.sleep(120)", stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"

        def probe(bounding: list[str]) -> dict:
            spec = "-all" + "".join(f",+{c.removeprefix('CAP_').lower()}" for c in bounding)
            done = netns.run("setpriv", f"--bounding-set={spec}", "--inh-caps=-all", sys.executable, "-c", PROBE,
                             str(service_user.pw_uid), str(port), str(sock_dir / "ipc.sock"),
                             timeout=90, check=False)
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        assert probe(caps) == {"divert": True, "socket": True, "owner": True}
        for cap in caps:
            without = probe([c for c in caps if c != cap])
            assert not all(without.values()), f"{cap} is in the unit but nothing needed it: {without}"
    finally:
        listener.kill()
        listener.wait()


# -- Windows: the command lines (never run here) --------------------------------------------
def test_the_windows_sensor_task_and_acl_command_lines():
    command = (r"C:\Program Files\Python312\python.exe", "-I", "-m", "oisp")
    task = windows.sensor_task(command, r"C:\ProgramData\oisp\oisp.toml", r"HOST\alice")
    assert task[:12] == ["schtasks", "/Create", "/TN", r"\oisp\sensor", "/SC", "ONLOGON", "/RU", r"HOST\alice",
                         "/IT", "/RL", "LIMITED", "/TR"]
    assert task[12] == r'"C:\Program Files\Python312\python.exe" -I -m oisp sensor --config C:\ProgramData\oisp\oisp.toml'
    assert task[13] == "/F"  # replaces: install is idempotent
    acl = windows.config_acl(r"C:\ProgramData\oisp\oisp.toml")
    assert acl[:3] == ["icacls", r"C:\ProgramData\oisp", "/inheritance:r"]
    assert "*S-1-5-32-545:(OI)(CI)RX" in acl and "*S-1-5-18:(OI)(CI)F" in acl
    assert windows.redirector_command(command, r"C:\c.toml", None)[-3:] == ["redirector", "--config", r"C:\c.toml"]
    with pytest.raises(windows.WindowsServiceError, match="more than schtasks takes"):
        windows.sensor_task(("C:\\" + "x" * 250 + "\\python.exe",), r"C:\c.toml", "alice")
