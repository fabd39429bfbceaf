"""The named-pipe transport (oisp.ipc.transport_windows) is written to the Win32 API and
never run here; what can run off Windows is tested here: that it imports, and its DACL."""

from __future__ import annotations

import pytest


def test_windows_pipe_dacl_names_only_system_admins_and_the_allowed_sid():
    from oisp.ipc.transport_windows import pipe_sddl

    sid = "S-1-5-21-1004336348-1177238915-682003330-1001"
    assert pipe_sddl([sid]) == f"D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GRGW;;;{sid})"
    for bad in ["S-1-5-21)(A;;GA;;;WD", "WD", "", "S-1-"]:
        with pytest.raises(ValueError):
            pipe_sddl([bad])
    with pytest.raises(ValueError):
        pipe_sddl([])
