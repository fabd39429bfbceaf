"""Where oisp keeps its files, including under sudo."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from oisp import paths


def test_xdg_data_home_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert paths.data_dir() == tmp_path / "oisp"
    assert paths.default_events_path() == tmp_path / "oisp" / "events.jsonl"


@pytest.mark.privileged
def test_under_sudo_the_invoking_users_directory(monkeypatch):
    daemon = pwd.getpwuid(1)  # an account every Debian/Ubuntu has
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("SUDO_UID", str(daemon.pw_uid))
    monkeypatch.setenv("SUDO_GID", str(daemon.pw_gid))
    assert paths.invoking_user() == (daemon.pw_uid, daemon.pw_gid)
    assert paths.data_dir() == Path(daemon.pw_dir) / ".local" / "share" / "oisp"


def test_without_sudo_there_is_no_invoking_user(monkeypatch):
    monkeypatch.delenv("SUDO_UID", raising=False)
    assert paths.invoking_user() is None
