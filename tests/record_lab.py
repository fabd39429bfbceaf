"""The `oisp record` lab the end-to-end tests share (fixture `record_lab`, made available to
every test module by conftest.py) and its helpers.

Two namespaces joined by a veth: `b` runs the fake AI provider (tests/fakeprovider.py) on
:443; in `a` the hosts file names it api.openai.com / api.anthropic.com / example.test and
`oisp record` runs split, as `sudo oisp record` does: its redirector as root, its sensor as
the session's test user (`sensor_user`: `--user NAME`). The fixture yields a dict: the
pair, the temporary directory, the running `oisp record` ("sensor", for the tests written
before the split: the process to signal), the CAs, the events file, the user, and
`start_sensor(*options)` to start another (stop the running one first; `user=False`:
without --user, so as one root process: no SUDO_UID here)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.fakeprovider import make_test_pki
from tests.netns import VethPair, stop_all

HERE = Path(__file__).parent  # the tests directory: agents/, fakeprovider.py


@pytest.fixture(scope="session")
def sensor_user():
    """A local user for the tests' sensors, made for this session and removed after it.
    It is granted traversal (an ACL entry, x only) of the directories on the way to this
    interpreter that others may not enter (here /root, where pyenv keeps Python, is
    0700) — nothing else: each test gives it a directory of its own (`sensor_tmp`).
    Not pytest's tmp_path: every pytest session that starts (other checkouts' too) strips
    the group bits of /tmp/pytest-of-root, which is the ACL mask, so an entry there does
    not last."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setfacl"):
        pytest.skip("the split needs root, useradd and setfacl (apt-get install passwd acl)")
    name = f"oispsens{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    granted: list[Path] = []
    try:
        for leaf in (Path(os.path.realpath(sys.executable)), Path(__file__).resolve()):
            for directory in reversed(leaf.parents):
                if not directory.stat().st_mode & stat.S_IXOTH and directory not in granted:
                    subprocess.run(["setfacl", "-m", f"u:{name}:x", str(directory)], check=True)
                    granted.append(directory)
        yield pwd.getpwnam(name)
    finally:
        for directory in granted:
            subprocess.run(["setfacl", "-x", f"u:{name}", str(directory)], capture_output=True)
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def sensor_tmp(sensor_user):
    """A test's directory, the sensor user's (as a user's own files are), removed after."""
    path = Path(tempfile.mkdtemp(prefix=f"{sensor_user.pw_name}-", dir="/tmp"))
    os.chown(path, sensor_user.pw_uid, sensor_user.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sensor_of(record: subprocess.Popen) -> int:
    """The pid of the `oisp sensor` a split `oisp record` started (its one child that is)."""
    import psutil

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for child in psutil.Process(record.pid).children():
            try:
                if "sensor" in child.cmdline():
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError("oisp record has no sensor child")


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def provider_lab(sensor_tmp, request, sensor_user):
    """record_lab without a running `oisp record`: `spawn(argv, as_user=False)` starts
    a process in `a` (as the sensor user with `as_user`), stopped with the lab."""
    tmp_path = sensor_tmp
    pair = VethPair.create()
    server_ip = pair.b_ip4 if request.param == 4 else pair.b_ip6
    hosts_dir = Path("/etc/netns") / pair.a.name
    hosts_dir.mkdir(parents=True, exist_ok=True)
    (hosts_dir / "hosts").write_text(f"127.0.0.1 localhost\n{server_ip} api.openai.com api.anthropic.com example.test\n")
    upstream_ca, cert, key = make_test_pki(tmp_path)
    provider = pair.b.popen(sys.executable, str(HERE / "fakeprovider.py"), "--host", server_ip, "--port", "443",
                            "--cert", cert, "--key", key, stdout=subprocess.DEVNULL)
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    processes = [provider]

    def start_sensor(*options: str, user: bool = True, **popen) -> subprocess.Popen:
        split = ("--user", sensor_user.pw_name) if user else ()
        sensor = pair.a.popen(sys.executable, "-m", "oisp", "record", "-o", str(tmp_path / "events.jsonl"),
                              "--upstream-ca", upstream_ca, *split, *options, stderr=subprocess.PIPE, text=True,
                              env=env, **popen)
        processes.append(sensor)
        await_recording(sensor)
        return sensor

    def spawn(*argv: str, as_user: bool = False) -> subprocess.Popen:
        user = ("setpriv", f"--reuid={sensor_user.pw_uid}", f"--regid={sensor_user.pw_gid}", "--clear-groups",
                "--inh-caps=-all") if as_user else ()
        started = pair.a.popen(*user, *argv, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
        processes.append(started)
        return started

    our_ca = tmp_path / "data" / "oisp" / "oisp-ca.pem"
    try:
        time.sleep(1.0)  # hypercorn binding
        yield {"family": request.param, "pair": pair, "tmp": tmp_path, "our_ca": str(our_ca),
               "both": str(tmp_path / "both.pem"), "upstream_ca": upstream_ca, "events": tmp_path / "events.jsonl",
               "env": env, "start_sensor": start_sensor, "spawn": spawn, "user": sensor_user}
    finally:
        stop_all(processes)
        pair.delete()
        shutil.rmtree(hosts_dir, ignore_errors=True)


@pytest.fixture
def record_lab(provider_lab):
    provider_lab["sensor"] = provider_lab["start_sensor"]()
    # For clients that must also work once the sensor is gone.
    Path(provider_lab["both"]).write_text(Path(provider_lab["our_ca"]).read_text()
                                          + Path(provider_lab["upstream_ca"]).read_text())
    return provider_lab


def run_client(lab, name, base="https://api.openai.com", n=0, ca=None, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "SSL_CERT_FILE": ca or lab["our_ca"]}
    return subprocess.run(lab["pair"].a.cmd(sys.executable, str(HERE / "agents" / "ai_clients.py"), name, base, str(n)),
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_events(lab) -> list[dict]:
    return [json.loads(line) for line in lab["events"].read_text().splitlines()] if lab["events"].exists() else []


def stop_sensor(lab) -> int:
    lab["sensor"].send_signal(signal.SIGINT)
    return lab["sensor"].wait(15)


def start_client(lab, name, base, n=0) -> subprocess.Popen:
    """`ip netns exec` execs the client, so the Popen pid is the client's own."""
    return subprocess.Popen(lab["pair"].a.cmd(sys.executable, str(HERE / "agents" / "ai_clients.py"), name, base, str(n)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SSL_CERT_FILE": lab["our_ca"]})


def await_recording(sensor: subprocess.Popen) -> list[str]:
    """Read a starting `oisp record`'s stderr (text) up to its "recording" line and return
    what it said before (the dashboard's URL, notes), also kept as `sensor.banner`. Only
    that line counts: a path it prints may hold the word (temporary directories are named
    after the test). A sensor that ends first fails the test with what it said."""
    said: list[str] = []
    for line in sensor.stderr:
        said.append(line)
        if line.startswith("oisp record: recording"):
            sensor.banner = said
            return said
    raise AssertionError(f"the sensor did not start (exit {sensor.wait()}): {''.join(said)[-3000:]}")
