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


def test_distinct_client_alpn_lists_share_a_handful_of_upstream_contexts():
    """Each upstream context holds the trust store (~840 KiB): one per distinct client ALPN
    list, as any local program can vary it, would grow without bound."""
    import random

    from oisp.proxy.server import TransparentProxy

    proxy = TransparentProxy(lookup=lambda addr, port: None, issuer=None)
    rng = random.Random(11)
    offered_seen = set()
    for _ in range(1000):
        offered = [rng.choice(["h2", "http/1.1"]) if rng.random() < 0.3 else f"x-{rng.getrandbits(32):08x}"
                   for _ in range(rng.randint(1, 5))]
        offered_seen.add(tuple(offered))
        alpn, context = proxy._with_alpn(offered)
        assert alpn == list(dict.fromkeys(p for p in offered if p in ("h2", "http/1.1")))
        assert context is (proxy._with_alpn(alpn)[1] if alpn else proxy.upstream_context)
    assert len(offered_seen) > 900
    assert len(proxy._alpn_contexts) <= 4  # (h2), (http/1.1), (h2, http/1.1), (http/1.1, h2)
