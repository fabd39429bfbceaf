"""Shared test policy.

Tests that need root and a working divert backend are marked `privileged`.
Outside CI they skip with the reason; with OISP_REQUIRE_PRIVILEGED=1 (set by
.ci/run) a skip of any test is turned into a failure, so CI never counts a
skipped capture test as passed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.record_lab import provider_lab, record_lab, sensor_tmp, sensor_user  # noqa: F401 - the `oisp record` lab fixtures, for every module

REQUIRE_PRIVILEGED = os.environ.get("OISP_REQUIRE_PRIVILEGED") == "1"

# The agents tests start (`python tests/agents/x.py` in a namespace) have their own
# directory first on sys.path, not the tree under test: without this they import
# whichever oisp is installed, so a checkout beside the installed one tests the other.
_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TREE, os.environ.get("PYTHONPATH")) if p)

# Anything that hashes a credential makes the install's hash key in the data directory: tests
# that do not choose their own keep theirs in a throw-away one, not in the real user's.
if "XDG_DATA_HOME" not in os.environ:
    import tempfile

    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="oisp-test-data-")


def _privilege_problem() -> str | None:
    import sys

    from oisp.divert.preflight import check_privileges

    if not sys.platform.startswith("linux"):
        return "these tests build Linux network namespaces (ip netns)"

    problems = check_privileges()
    return "; ".join(p.message for p in problems) if problems else None


def pytest_collection_modifyitems(config, items):
    problem = None
    checked = False
    for item in items:
        if item.get_closest_marker("privileged") is None:
            continue
        if not checked:
            problem, checked = _privilege_problem(), True
        if problem:
            item.add_marker(pytest.mark.skip(reason=f"needs privileges: {problem}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_PRIVILEGED and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under OISP_REQUIRE_PRIVILEGED=1, which counts as a failure: {reason}"


@pytest.fixture
def netns():
    """One fresh network namespace with loopback up."""
    from tests.netns import NetNS

    ns = NetNS.create()
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def veth_pair():
    """Two fresh namespaces joined by a veth pair (IPv4 and IPv6)."""
    from tests.netns import VethPair

    pair = VethPair.create()
    try:
        yield pair
    finally:
        pair.delete()


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    """A private user data directory, so no test touches the real user's CA."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "oisp"
