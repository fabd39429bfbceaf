"""The reflector's decision for one batch: which packets go to the proxy, which back to
their clients, and the rewrite that sends them there.

No I/O and no handle: packet rows and the tables (the port map, the proxy's own
upstream ports, the AI addresses) come in, `Verdicts` go out, and `apply` rewrites
the batch's bytes by them. What is known of flows is asked of two callables the
caller gives, so a test drives it with a plain FlowTable and no root:

- `seen(key, tcp_flags, from_client=...)`: the flow's entry (None: not a taken flow);
  the flow table notes the FINs and RSTs and the time;
- `syn(rows, row, key)`: a client's SYN (no ACK) for `key`: is its flow taken? The
  reflector opens it here, or refuses (a process filter, or not opening new flows).

Keys are the flow table's: (server address as 16 bytes, client port, proxy port).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from oisp.divert.address import OUTBOUND
from oisp.divert.engine import Verdict
from oisp.packet import OK, TCP_ACK, TCP_SYN, reflect
from oisp.own_ports import IPV4_BIT, IPV6_BIT, OwnPorts
from oisp.redirect.targets import TargetSet

SMALL_BATCH = 8  # up to this many rows, decide row by row (see BatchDecider._small)
_NOT_OUTBOUND = np.uint32(~OUTBOUND & 0xFFFFFFFF)

Seen = Callable[..., object]  # seen(key, flags, from_client=bool) -> an entry or None
Syn = Callable[[np.ndarray, int, tuple], bool]


class PortMap:
    """The redirected ports as lookup tables: server port → proxy port and back, and the
    server ports that take any destination (plaintext model servers, see plain.py)."""

    def __init__(self, ports: dict[int, int], any_address=()):
        self.ports = dict(ports)
        self.server_port = np.zeros(65536, dtype=bool)
        self.proxy_port = np.zeros(65536, dtype=bool)
        self.proxy_for = np.zeros(65536, dtype=np.uint16)  # server port → its proxy port
        self.server_port[list(self.ports)] = True
        self.proxy_port[list(self.ports.values())] = True
        self.proxy_for[list(self.ports)] = list(self.ports.values())
        self.any_address = np.zeros(65536, dtype=bool)  # no AI-address check
        self.any_address[list(any_address)] = True
        self.server_for_proxy = {proxy: server for server, proxy in self.ports.items()}


@dataclass
class Verdicts:
    """What to do with a batch: `reflections` in order, each (to the proxy?, the port to
    write, the rows: a mask or a list): to the proxy the destination port becomes the
    proxy port; back to a client the source port becomes the server port. `taken`: every
    reflected row (None: none). `own_upstream`: the proxy's own packets passed."""

    reflections: list[tuple[bool, int, object]] = field(default_factory=list)
    taken: object = None
    own_upstream: int = 0


def apply(batch, verdicts: Verdicts) -> tuple[int, int]:
    """Rewrite the batch's reflected packets and mark them MODIFIED, re-injected as
    arriving. Returns how many went to the proxy and how many back to clients."""
    if verdicts.taken is None:
        return 0, 0
    to_proxy = to_client = 0
    for proxy_bound, port, selected in verdicts.reflections:
        if proxy_bound:
            to_proxy += reflect(batch.data, batch.rows, selected, dst_port=port)
        else:
            to_client += reflect(batch.data, batch.rows, selected, src_port=port)
    bits = batch.addresses["bits"]
    bits[verdicts.taken] &= _NOT_OUTBOUND  # re-injected as arriving, so the local stack accepts it
    batch.verdicts[verdicts.taken] = Verdict.MODIFIED
    return to_proxy, to_client


def _group(addresses: np.ndarray, ports_a: np.ndarray, ports_b: np.ndarray):
    """Unique (address, port, port) keys of some rows: (first row of each, row → key)."""
    packed = np.empty((len(addresses), 20), dtype=np.uint8)
    packed[:, :16] = addresses
    packed[:, 16:18] = ports_a.astype("<u2").view(np.uint8).reshape(-1, 2)
    packed[:, 18:20] = ports_b.astype("<u2").view(np.uint8).reshape(-1, 2)
    _, first, inverse = np.unique(packed.view("V20").reshape(-1), return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


class BatchDecider:
    """Decides batches against the reflector's tables (read live: the own-port mask and
    the target set change while it runs).

    (a) to a server port, from a port that is not the proxy's own upstream, to an AI
        address (or any, on a plaintext port), of a taken flow: to the proxy;
    (b) from a proxy port (not to a server port) of a taken flow: back to the client."""

    def __init__(self, ports: PortMap, own_ports: OwnPorts, targets: TargetSet):
        self.ports, self.own_ports, self.targets = ports, own_ports, targets

    def decide(self, rows: np.ndarray, outbound: np.ndarray, seen: Seen, syn: Syn) -> Verdicts:
        if not len(rows):
            return Verdicts()
        if len(rows) <= SMALL_BATCH:
            return self._small(rows, outbound, seen, syn)
        ports = self.ports
        valid = (rows["status"] == OK) & outbound
        src_port, dst_port = rows["src_port"], rows["dst_port"]

        to_server = valid & ports.server_port[dst_port]
        # The registered port of the packet's family (a bit each: see own_ports.py).
        family = np.where(rows["ip_version"] == 6, IPV6_BIT, IPV4_BIT).astype(np.uint8)
        own = to_server & ((self.own_ports.mask[src_port] & family) != 0)
        own_upstream = int(own.sum())
        to_server_rows = np.flatnonzero(to_server & ~own)
        to_server_rows = to_server_rows[ports.any_address[dst_port[to_server_rows]]
                                        | self.targets.contains(rows["dst_addr"][to_server_rows])]
        # A row to a server port was judged as a client's above, whatever its source port.
        from_proxy_rows = np.flatnonzero(valid & ports.proxy_port[src_port] & ~ports.server_port[dst_port])

        taken = np.zeros(len(rows), dtype=bool)
        taken[self._to_server(rows, to_server_rows, seen, syn)] = True
        taken[self._from_proxy(rows, from_proxy_rows, seen)] = True
        if not taken.any():
            return Verdicts(own_upstream=own_upstream)
        reflections = []
        for server_port, proxy_port in ports.ports.items():
            reflections.append((True, proxy_port, taken & (dst_port == server_port)))
            reflections.append((False, server_port, taken & (src_port == proxy_port)))
        return Verdicts(reflections, taken, own_upstream)

    def _small(self, rows: np.ndarray, outbound: np.ndarray, seen: Seen, syn: Syn) -> Verdicts:
        """The same decisions row by row with Python scalars: at interactive rates batches
        hold 1–3 packets, where numpy's per-call cost (~150 µs a batch) would dominate."""
        ports, own_mask = self.ports, self.own_ports.mask
        status, flags = rows["status"].tolist(), rows["tcp_flags"].tolist()
        src_ports, dst_ports = rows["src_port"].tolist(), rows["dst_port"].tolist()
        families = [IPV6_BIT if v == 6 else IPV4_BIT for v in rows["ip_version"].tolist()]
        to_proxy: dict[int, list[int]] = {}  # proxy port → rows
        to_client: dict[int, list[int]] = {}  # server port → rows
        own_upstream = 0
        for i, (ok, out, sport, dport, f, family) in enumerate(zip(status, outbound.tolist(), src_ports, dst_ports,
                                                                    flags, families)):
            if ok != OK or not out:
                continue
            if dport in ports.ports:
                if own_mask[sport] & family:
                    own_upstream += 1
                    continue
                address = rows["dst_addr"][i].tobytes()
                if not ports.any_address[dport] and address not in self.targets:
                    continue
                proxy_port = ports.ports[dport]
                key = (address, sport, proxy_port)
                if f & TCP_SYN and not f & TCP_ACK and not syn(rows, i, key):
                    continue
                if seen(key, f, from_client=True) is not None:
                    to_proxy.setdefault(proxy_port, []).append(i)
            elif sport in ports.server_for_proxy:
                key = (rows["dst_addr"][i].tobytes(), dport, sport)
                if seen(key, f, from_client=False) is not None:
                    to_client.setdefault(ports.server_for_proxy[sport], []).append(i)
        if not to_proxy and not to_client:
            return Verdicts(own_upstream=own_upstream)
        reflections = [(True, port, selected) for port, selected in to_proxy.items()]
        reflections += [(False, port, selected) for port, selected in to_client.items()]
        taken = [i for selected in (*to_proxy.values(), *to_client.values()) for i in selected]
        return Verdicts(reflections, taken, own_upstream)

    def _to_server(self, rows, index: np.ndarray, seen: Seen, syn: Syn) -> np.ndarray:
        if not len(index):
            return index
        proxy_ports = self.ports.proxy_for[rows["dst_port"][index]]
        first, inverse = _group(rows["dst_addr"][index], rows["src_port"][index], proxy_ports)
        flags = np.zeros(len(first), dtype=np.uint8)
        np.bitwise_or.at(flags, inverse, rows["tcp_flags"][index])
        keep = np.zeros(len(first), dtype=bool)
        for k, (row, f) in enumerate(zip(index[first], flags)):
            key = (rows["dst_addr"][row].tobytes(), int(rows["src_port"][row]), int(proxy_ports[first[k]]))
            if f & TCP_SYN and not f & TCP_ACK and not syn(rows, row, key):
                continue
            keep[k] = seen(key, int(f), from_client=True) is not None
        return index[keep[inverse]]

    def _from_proxy(self, rows, index: np.ndarray, seen: Seen) -> np.ndarray:
        if not len(index):
            return index
        first, inverse = _group(rows["dst_addr"][index], rows["dst_port"][index], rows["src_port"][index])
        flags = np.zeros(len(first), dtype=np.uint8)
        np.bitwise_or.at(flags, inverse, rows["tcp_flags"][index])
        keep = np.zeros(len(first), dtype=bool)
        for k, (row, f) in enumerate(zip(index[first], flags)):
            key = (rows["dst_addr"][row].tobytes(), int(rows["dst_port"][row]), int(rows["src_port"][row]))
            keep[k] = seen(key, int(f), from_client=False) is not None
        return index[keep[inverse]]
