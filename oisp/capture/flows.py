"""The flow table behind `oisp flows`: who talks to whom, how much, since when.

Packets are counted per flow (protocol, local end, remote end) in one numpy pass
per batch; the process comes from the socket owners (SOCKET/FLOW events), looked
up when a flow is first seen and again until it is known, then kept. On loopback
both ends are local: a flow between two local processes shows once for each.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass

import numpy as np

from oisp.divert.owners import ProcessNames, SocketOwners
from oisp.divert.address import OUTBOUND
from oisp.divert.constants import Event

PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_TUPLE_DTYPE = np.dtype([("protocol", "u1"), ("src", "u1", 16), ("dst", "u1", 16), ("sport", "<u2"),
                         ("dport", "<u2"), ("version", "u1"), ("outbound", "u1")])
_EVENT_FLOWS = {Event.FLOW_ESTABLISHED, Event.SOCKET_CONNECT, Event.SOCKET_ACCEPT}


def _ip(raw: bytes, version: int):
    return ipaddress.ip_address(raw[:4] if version == 4 else raw)


@dataclass
class Flow:
    protocol: int
    local: ipaddress.IPv4Address | ipaddress.IPv6Address
    local_port: int
    remote: ipaddress.IPv4Address | ipaddress.IPv6Address
    remote_port: int
    bytes: int = 0
    packets: int = 0
    first_seen: float = 0.0  # wall clock, seconds
    last_seen: float = 0.0
    pid: int = 0  # owner of the local end, 0 while unknown
    remote_pid: int = 0  # owner of the remote end when it is local too (loopback)
    changed: bool = True

    def key(self) -> tuple:
        return (self.protocol, self.local, self.local_port, self.remote, self.remote_port)


class FlowCounters:
    def __init__(self, owners: SocketOwners, names: ProcessNames):
        self.owners = owners
        self.names = names
        self.flows: dict[tuple, Flow] = {}
        self.lock = threading.Lock()  # events arrive on their own threads

    def _flow(self, protocol, local, local_port, remote, remote_port, when: float) -> Flow:
        key = (protocol, local, local_port, remote, remote_port)
        flow = self.flows.get(key) or self.flows.get((protocol, remote, remote_port, local, local_port))
        if flow is None:
            flow = self.flows[key] = Flow(protocol, local, local_port, remote, remote_port, first_seen=when,
                                          last_seen=when)
        return flow

    def add_events(self, events) -> None:
        """FLOW/SOCKET events name the process of a flow, possibly before its first packet."""
        now = time.time()
        with self.lock:
            self._add_events(events, now)

    def _add_events(self, events, now: float) -> None:
        for e in events:
            if e.event in _EVENT_FLOWS and e.remote_port and e.local_port and e.pid:
                flow = self._flow(e.protocol, e.local, e.local_port, e.remote, e.remote_port, now)
                if flow.local == e.local and flow.local_port == e.local_port:
                    flow.pid = flow.pid or e.pid
                else:
                    flow.remote_pid = flow.remote_pid or e.pid
                flow.changed = True

    def add_packets(self, rows: np.ndarray, bits: np.ndarray, when: float) -> None:
        """Count a batch: one Python step per distinct 5-tuple, not per packet."""
        n = len(rows)
        keys = np.empty(n, dtype=_TUPLE_DTYPE)
        keys["protocol"], keys["src"], keys["dst"] = rows["protocol"], rows["src_addr"], rows["dst_addr"]
        keys["sport"], keys["dport"] = rows["src_port"], rows["dst_port"]
        keys["version"], keys["outbound"] = rows["ip_version"], (bits & OUTBOUND) != 0
        unique, which = np.unique(keys.view(f"V{_TUPLE_DTYPE.itemsize}"), return_inverse=True)
        which = which.ravel()
        packets = np.bincount(which, minlength=len(unique))
        nbytes = np.bincount(which, weights=rows["length"], minlength=len(unique))
        with self.lock:
            self._count(unique.view(_TUPLE_DTYPE), packets.tolist(), nbytes.tolist(), when)

    def _count(self, unique, packets, nbytes, when: float) -> None:
        for key, count, size in zip(unique, packets, nbytes):
            version, protocol = int(key["version"]), int(key["protocol"])
            src = (_ip(key["src"].tobytes(), version), int(key["sport"]))
            dst = (_ip(key["dst"].tobytes(), version), int(key["dport"]))
            local, remote = (src, dst) if key["outbound"] else (dst, src)
            flow = self._flow(protocol, *local, *remote, when)
            flow.packets += count
            flow.bytes += int(size)
            flow.last_seen = when
            flow.changed = True
            self._resolve(flow)

    def _resolve(self, flow: Flow) -> None:
        if not flow.pid:
            flow.pid = self._owner(flow.protocol, flow.local, flow.local_port)
        if not flow.remote_pid and flow.remote.is_loopback:
            flow.remote_pid = self._owner(flow.protocol, flow.remote, flow.remote_port)

    def _owner(self, protocol: int, address, port: int) -> int:
        return self.owners.owner(protocol, address.packed.ljust(16, b"\0"), port) or 0

    def rows(self, *, only_changed: bool = False, matcher=None) -> list[dict]:
        """One dict per (flow, local owner); `matcher(pid)` keeps one process's rows."""
        out = []
        with self.lock:
            flows = list(self.flows.values())
        for flow in flows:
            if only_changed and not flow.changed:
                continue
            self._resolve(flow)
            flow.changed = False
            views = [(flow.pid, flow.local, flow.local_port, flow.remote, flow.remote_port)]
            if flow.remote_pid:
                views.append((flow.remote_pid, flow.remote, flow.remote_port, flow.local, flow.local_port))
            for pid, local, local_port, remote, remote_port in views:
                if matcher and not matcher(pid):
                    continue
                out.append({"process": self.names(pid) if pid else None, "pid": pid or None,
                            "protocol": PROTOCOLS.get(flow.protocol, str(flow.protocol)),
                            "local": str(local), "local_port": local_port, "remote": str(remote),
                            "remote_port": remote_port, "bytes": flow.bytes, "packets": flow.packets,
                            "first_seen": flow.first_seen, "last_seen": flow.last_seen})
        return out


def render(rows: list[dict]) -> str:
    """A plain text table, biggest talkers first."""
    header = ("PROCESS", "PID", "PROTO", "LOCAL", "REMOTE", "BYTES", "PACKETS", "FIRST", "LAST")
    lines = [header]
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        lines.append((r["process"] or "?", str(r["pid"] or "-"), r["protocol"], _endpoint(r["local"], r["local_port"]),
                      _endpoint(r["remote"], r["remote_port"]), f"{r['bytes']:,}", f"{r['packets']:,}",
                      time.strftime("%H:%M:%S", time.localtime(r["first_seen"])),
                      time.strftime("%H:%M:%S", time.localtime(r["last_seen"]))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
