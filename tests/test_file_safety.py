"""Every file oisp writes, as root under sudo in the user's directory: never through a
link the user placed, never chowned by path, 0600 / 0700 whatever the umask.

The "user" is nobody (uid 65534) via SUDO_UID/SUDO_GID, as `sudo oisp record` sets
them; their home is a temporary directory they own. The victims are root-owned
files and directories standing in for /etc.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from oisp import paths
from oisp.pcapng.writer import PcapngWriter
from oisp.proxy import trust
from oisp.proxy.ca import CertificateAuthority
from oisp.safefile import UnsafePathError, keylog_name, open_private_file
from oisp.sinks.jsonl import JsonlSink

pytestmark = pytest.mark.privileged  # root, to chown to another user and to be the victim's owner
USER = 65534  # nobody


def write_jsonl(path: Path) -> None:
    sink = JsonlSink(path)
    sink.emit({"event_type": "ai.request", "data": {"messages": [{"content": "a private prompt"}]}})
    sink.close()


def write_pcapng(path: Path) -> None:
    PcapngWriter.open(str(path)).close()


def write_keylog(path: Path) -> None:
    keylog_name(path)


def write_bundle(path: Path, other_ca: CertificateAuthority) -> None:
    trust.write_bundle(other_ca, path)


def write_ca(path: Path) -> None:
    CertificateAuthority.load_or_create(path.parent)


WRITERS = {"jsonl": (write_jsonl, "events.jsonl"), "pcapng": (write_pcapng, "capture.pcapng"),
           "keylog": (write_keylog, "keys.log"), "bundle": (write_bundle, "ca-bundle.pem"),
           "ca": (write_ca, "oisp-ca-key.pem")}


@pytest.fixture
def other_ca(tmp_path_factory) -> CertificateAuthority:
    """A CA made outside the user's directory, for the bundle writer."""
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("elsewhere") / "ca")


def run_writer(name: str, path: Path, other_ca: CertificateAuthority) -> None:
    writer = WRITERS[name][0]
    writer(path, other_ca) if name == "bundle" else writer(path)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """`sudo` by nobody, whose data home is a directory they own."""
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, USER, USER)
    monkeypatch.setenv("SUDO_UID", str(USER))
    monkeypatch.setenv("SUDO_GID", str(USER))
    monkeypatch.setenv("XDG_DATA_HOME", str(home))
    return home


@pytest.fixture
def victim(tmp_path) -> Path:
    """A root-owned directory holding a root-owned file: /etc and /etc/passwd."""
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    (etc / "passwd").write_text("root:x:0:0\n")
    return etc


def untouched(victim: Path) -> None:
    assert victim.stat().st_uid == 0
    assert stat.S_IMODE(victim.stat().st_mode) == 0o755
    assert sorted(p.name for p in victim.iterdir()) == ["passwd"]
    assert (victim / "passwd").read_text() == "root:x:0:0\n"
    assert (victim / "passwd").stat().st_uid == 0


@pytest.mark.parametrize("writer", WRITERS)
def test_a_linked_data_directory_is_refused_and_its_target_keeps_its_owner(writer, home, victim, other_ca):
    (home / "oisp").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        run_writer(writer, paths.data_dir() / WRITERS[writer][1], other_ca)
    untouched(victim)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_data_directory_someone_else_owns_is_refused(writer, home, other_ca):
    foreign = home / "oisp"
    foreign.mkdir(mode=0o700)  # root's, as an older oisp under sudo left it
    with pytest.raises(UnsafePathError, match="belongs to uid 0"):
        run_writer(writer, paths.data_dir() / WRITERS[writer][1], other_ca)
    assert foreign.stat().st_uid == 0
    assert list(foreign.iterdir()) == []


@pytest.mark.parametrize("writer", WRITERS)
def test_a_link_on_the_way_to_a_new_data_directory_is_refused(writer, home, victim, monkeypatch, other_ca):
    (home / ".local").symlink_to(victim)  # ~/.local -> /etc: root must not create /etc/share/oisp
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    with pytest.raises(UnsafePathError, match="does not belong to uid 65534"):
        run_writer(writer, paths.data_dir() / WRITERS[writer][1], other_ca)
    untouched(victim)


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_linked_file_is_never_written_through(writer, dangling, home, victim, other_ca):
    data = home / "oisp"
    data.mkdir(mode=0o700)
    os.chown(data, USER, USER)
    link = data / WRITERS[writer][1]
    link.symlink_to(victim / ("shadow" if dangling else "passwd"))
    try:
        run_writer(writer, link, other_ca)
    except UnsafePathError:
        pass
    else:  # only a rename over the link may succeed: it replaces the link itself
        assert writer == "bundle"
        assert not link.is_symlink()
        assert link.stat().st_uid == USER
    untouched(victim)


def test_the_same_writers_outside_the_data_directory_refuse_links_too(tmp_path, victim):
    link = tmp_path / "events.jsonl"
    link.symlink_to(victim / "passwd")
    with pytest.raises(UnsafePathError):
        write_jsonl(link)
    with pytest.raises(UnsafePathError):
        write_pcapng(link)
    untouched(victim)


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(home):
    data = home / "oisp"
    data.mkdir(mode=0o700)
    os.chown(data, USER, USER)
    os.mkfifo(data / "events.jsonl")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        write_jsonl(data / "events.jsonl")


@pytest.mark.parametrize("writer", WRITERS)
def test_under_sudo_what_is_made_belongs_to_the_user(writer, home, other_ca):
    """Made by descriptor: the data directory (and the parents made with it) and the file are the user's."""
    run_writer(writer, paths.data_dir() / WRITERS[writer][1], other_ca)
    made = paths.data_dir() / WRITERS[writer][1]
    for path in (paths.data_dir(), made):
        assert (path.stat().st_uid, path.stat().st_gid) == (USER, USER), path


def test_under_sudo_new_parents_of_the_data_directory_are_the_users_too(home, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    write_jsonl(paths.default_events_path())
    for path in (home / ".local", home / ".local" / "share", home / ".local" / "share" / "oisp"):
        assert path.stat().st_uid == USER, path
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path


def test_a_file_written_outside_the_users_directory_stays_roots(tmp_path, home):
    """Only what is made in a directory the user owns is handed over."""
    out = tmp_path / "root-only"
    out.mkdir()
    write_jsonl(out / "events.jsonl")
    assert (out / "events.jsonl").stat().st_uid == 0


def test_open_private_file_writes_what_it_is_given(tmp_path):
    with open_private_file(tmp_path / "f", "wb") as f:
        f.write(b"one")
    with open_private_file(tmp_path / "f", "ab") as f:
        f.write(b"two")
    assert (tmp_path / "f").read_bytes() == b"onetwo"
    with open_private_file(tmp_path / "f", "wb") as f:
        f.write(b"3")
    assert (tmp_path / "f").read_bytes() == b"3"
    with pytest.raises(FileExistsError):
        open_private_file(tmp_path / "f", "xb")


def test_the_key_log_handed_to_openssl_cannot_be_redirected_afterwards(home, victim):
    import ssl

    data = home / "oisp"
    data.mkdir(mode=0o700)
    os.chown(data, USER, USER)
    path = data / "keys.log"
    name = keylog_name(path)
    path.rename(data / "keys.moved")  # the user swaps the checked file for a link to /etc/passwd ...
    path.symlink_to(victim / "passwd")
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).keylog_filename = name  # ... before OpenSSL opens it
    untouched(victim)
    assert (data / "keys.moved").read_text().startswith("# TLS secrets log file")


# -- item 12: nothing oisp writes is readable by others, whatever the umask ----------------------

@pytest.fixture
def umask_zero():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("writer", WRITERS)
def test_with_umask_zero_files_are_0600_and_directories_0700(writer, tmp_path, monkeypatch, umask_zero, other_ca):
    monkeypatch.delenv("SUDO_UID", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    run_writer(writer, paths.data_dir() / WRITERS[writer][1], other_ca)
    assert stat.S_IMODE(paths.data_dir().stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "xdg").stat().st_mode) == 0o700  # a parent made on the way, too
    made = [p for p in paths.data_dir().iterdir()]
    assert made, ([
        (p.name, oct(p.stat().st_mode)) for p in made])
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in made), ([
        (p.name, oct(p.stat().st_mode)) for p in made])


def test_with_umask_zero_a_rotated_jsonl_stays_0600(tmp_path, umask_zero):
    sink = JsonlSink(tmp_path / "events.jsonl", max_bytes=100, backups=2)
    for i in range(10):
        sink.emit({"n": i, "pad": "x" * 40})
    sink.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)


def test_an_existing_file_others_can_read_is_reported_once(tmp_path, capfd):
    shared = tmp_path / "events.jsonl"
    shared.write_text("")
    shared.chmod(0o644)
    write_jsonl(shared)
    write_jsonl(shared)
    err = capfd.readouterr().err
    assert err.count(f"{shared} is readable by others (mode 0644)") == 1
    assert "chmod 600" in err
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644  # the user's choice is reported, not overridden


def test_an_existing_data_directory_others_can_read_is_reported(tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("SUDO_UID", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    (tmp_path / "oisp").mkdir()
    (tmp_path / "oisp").chmod(0o755)
    write_jsonl(paths.default_events_path())
    assert f"{tmp_path / 'oisp'} is readable by others (mode 0755)" in capfd.readouterr().err


def test_the_hash_key_is_never_made_through_a_linked_data_directory(home, victim, capfd):
    from oisp.events import redact

    (home / "oisp").symlink_to(victim)
    redact._keys.clear()
    try:
        first = redact.secret_hash("sk-proj-some-key")
    finally:
        redact._keys.clear()
    assert first.startswith("sha256:")  # hashing goes on, with a key for this run alone ...
    assert "cannot use the hash key" in capfd.readouterr().err  # ... and says so
    untouched(victim)


def test_the_hash_key_is_made_once_for_the_user(home):
    from oisp.events import redact

    redact._keys.clear()
    try:
        first = redact.secret_hash("sk-proj-some-key")
        redact._keys.clear()
        assert redact.secret_hash("sk-proj-some-key") == first  # read back, not made anew
    finally:
        redact._keys.clear()
    key = paths.data_dir() / "hash.key"
    assert key.stat().st_uid == USER
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_oisp_capture_refuses_a_linked_output_file_with_a_message(tmp_path, victim, capfd):
    from oisp.cli import main

    link = tmp_path / "out.pcapng"
    link.symlink_to(victim / "passwd")
    assert main(["capture", "-w", str(link), "--count", "1"]) == 2
    err = capfd.readouterr().err
    assert f"cannot write {link}" in err
    assert "symbolic link" in err
    untouched(victim)


def test_oisp_ca_refuses_a_linked_data_directory_with_a_message(home, victim, capfd):
    from oisp.cli import main

    (home / "oisp").symlink_to(victim)
    assert main(["ca", "show"]) == 1
    assert "symbolic link" in capfd.readouterr().err
    untouched(victim)


def test_a_linked_ca_key_is_not_read(tmp_path, victim):
    from oisp.safefile import read_nofollow

    (tmp_path / "key.pem").symlink_to(victim / "passwd")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        read_nofollow(tmp_path / "key.pem")
