"""What the health panel shows while recording, gathered on the recorder's own loop once a second."""

from __future__ import annotations

import time
from typing import Any

TRUST_COMMAND = "sudo oisp ca install"


def ca_trusted(ca) -> bool | None:
    """Whether the system trust store holds our CA (None: could not tell)."""
    from oisp.proxy import trust

    try:
        roots, _ = trust.system_roots()
    except (trust.TrustError, OSError):
        return None
    ours = "".join(ca.cert_pem.split())
    return any("".join(block.split()) == ours for block in roots)


# What the redirector refused or could not tell, by counter: DNS answers nobody asked for
# (issue 11 item 9), owners that did not hold the socket or could not be named (item 10),
# QUIC sent back to TCP (issue 13).
DEFENCES = {
    "dns": ("unsolicited", "wrong_question", "expired", "evicted", "malformed", "learned_full"),
    "processes": ("unknown", "refused", "socket_gone"),
    "quic": ("refused",),
}


def defences(counters: dict[str, Any]) -> dict[str, int]:
    return {f"{group} {name}": counters.get(group, {}).get(name, 0)
            for group, names in DEFENCES.items() for name in names if name in counters.get(group, {})}


def record_status(*, proxy, redirector, sinks, status, ca, trusted: bool | None) -> dict[str, Any]:
    counters = redirector.counters()
    engine = counters["reflector"].get("engine", {})
    return {
        "defences": defences(counters),
        "mode": "record",
        "flows": {k: proxy.stats.get(k, 0) for k in ("intercepted", "passed_through", "pinned", "no_flow",
                                                       "not_tls", "client_tls_errors", "upstream_errors")},
        "pinned_hosts": [f"{sni} for {program} ({user})" for program, user, sni in proxy.pinning.pins(time.monotonic())],
        "drops": engine.get("dropped", 0),
        "requests": status.requests, "responses": status.responses,
        "sinks": sinks.report(),
        "ca": {"path": str(ca.cert_path), "trusted": trusted, "command": TRUST_COMMAND},
    }
