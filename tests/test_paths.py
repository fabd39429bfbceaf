"""Where oisp keeps its files, including under sudo."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from oisp import paths


def test_xdg_data_home_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert paths.data_dir() == tmp_path / "oisp"
    assert paths.default_events_path() == tmp_path / "oisp" / "events.jsonl"


@pytest.mark.privileged
def test_under_sudo_the_invoking_users_directory_and_ownership(monkeypatch, tmp_path):
    daemon = pwd.getpwuid(1)  # an account every Debian/Ubuntu has
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("SUDO_UID", str(daemon.pw_uid))
    monkeypatch.setenv("SUDO_GID", str(daemon.pw_gid))
    assert paths.data_dir() == Path(daemon.pw_dir) / ".local" / "share" / "oisp"
    made = tmp_path / "made-by-root"
    made.write_text("x")
    paths.give_to_invoking_user(made)
    assert (made.stat().st_uid, made.stat().st_gid) == (daemon.pw_uid, daemon.pw_gid)


def test_without_sudo_nothing_changes_hands(monkeypatch, tmp_path):
    monkeypatch.delenv("SUDO_UID", raising=False)
    made = tmp_path / "mine"
    made.write_text("x")
    before = made.stat().st_uid
    paths.give_to_invoking_user(made)
    assert made.stat().st_uid == before == os.geteuid()
