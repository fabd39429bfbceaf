"""Hardening of the proxy and `oisp record` against faults and hostile clients (issue 11)."""

from __future__ import annotations

import pytest

from oisp.cli import main


@pytest.mark.parametrize("port", ["0", "-1", "65536", "99999", "http"])
def test_record_rejects_a_proxy_port_outside_1_to_65535(port, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["record", "--proxy-port", port])
    assert exit.value.code == 2  # argparse's usage error, before anything is diverted
    assert "--proxy-port" in capsys.readouterr().err
