"""The installed pydivert carries exactly the backend files this release was tested with."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oisp.divert import pinned

REPO = Path(__file__).resolve().parents[1]


def test_installed_backend_matches_the_pinned_hashes():
    version, files = pinned.check_installed()
    assert version == ("2.2.2-A" if sys.platform == "win32" else "0.0.5")
    assert files
    for check in files:
        assert check.path.is_file()
        assert hashlib.sha256(check.path.read_bytes()).hexdigest() == check.expected


def test_loaded_library_reports_the_pinned_version():
    from oisp.divert.backend import get_backend

    backend = get_backend()
    assert backend.location.path == pinned.check_installed()[1][0].path
    if sys.platform != "win32":
        assert backend.version() == pinned.manifest()["backends"]["ebpfdivert"]["version"]


@pytest.mark.skipif(not (REPO / "deps" / "backends.json").exists(), reason="runs from a source checkout")
def test_package_copy_and_readme_agree_with_deps():
    source = json.loads((REPO / "deps" / "backends.json").read_text())
    assert pinned.manifest() == source
    readme = (REPO / "deps" / "README.md").read_text()
    table = set(re.findall(r"`([\w/.]+)` \| `([0-9a-f]{64})`", readme))
    listed = {(rel, digest) for entry in source["backends"].values()
              for files in entry["files"].values() for rel, digest in files.items()}
    assert table == listed


def test_a_changed_file_is_reported(tmp_path, monkeypatch):
    _, files = pinned.check_installed()
    root = pinned.pydivert_dir()
    for check in files:
        copy = tmp_path / check.path.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(check.path, copy)
    with open(copy, "ab") as f:
        f.write(b"\0")
    monkeypatch.setattr(pinned, "pydivert_dir", lambda: tmp_path)
    _, tampered = pinned.check_installed()
    assert [c.ok for c in tampered] == [True] * (len(tampered) - 1) + [False]

    from oisp.cli.check import gather

    report = gather()
    assert not report["ready"]
    assert any(p["what"] == "tested backend" and "pydivert==4.0.1" in p["fix"] for p in report["missing"])


@pytest.mark.privileged
def test_oisp_check_reports_ready_as_root():
    done = subprocess.run([sys.executable, "-m", "oisp", "check", "--json"], capture_output=True, text=True, timeout=60)
    report = json.loads(done.stdout)
    assert done.returncode == 0, done.stdout
    assert report["ready"]
    assert report["backend"]["open"] == "ok"
    assert all(state == "ok" for state in report["backend"]["files"].values())
