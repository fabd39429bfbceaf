"""Which destination addresses are AI endpoints.

Filled from a bounded start-up resolution of the spec's hostnames and from
the DNS answers seen on the wire (a sniff handle on port-53 responses).
`contains(column)` tests a whole batch column of 16-byte addresses at once:
the known addresses are kept as a sorted numpy array of 16-byte void keys,
rebuilt on change and swapped in whole, so readers need no lock.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import threading
from typing import Callable, Iterable

import numpy as np

from oisp.divert.errors import DivertError
from oisp.redirect.dns import DnsError, answer_addresses
from oisp.redirect.flows import address_key

_KEY = np.dtype("V16")


class TargetSet:
    """A set of AI endpoint addresses, IPv4 and IPv6, bounded at `max_addresses`."""

    def __init__(self, addresses: Iterable = (), *, max_addresses: int = 65536):
        self.max_addresses = max_addresses
        self._lock = threading.Lock()
        self._keys: set[bytes] = set()
        self._array = np.empty(0, dtype=_KEY)
        self.generation = 0  # counts the adds that brought new addresses
        self.counts = {"added": 0, "full": 0}
        self.on_add: Callable[[list[bytes]], None] | None = None  # new 16-byte keys (the ring's fast path)
        self.add(addresses)

    def add(self, addresses: Iterable) -> int:
        """Add addresses (strings, ipaddress objects or 16-byte keys); returns how many were new."""
        keys = {address_key(a) for a in addresses}
        with self._lock:
            new = keys - self._keys
            room = self.max_addresses - len(self._keys)
            if len(new) > room:
                self.counts["full"] += len(new) - room
                new = set(sorted(new)[:max(room, 0)])
            if not new:
                return 0
            self._keys |= new
            self.generation += 1
            self.counts["added"] += len(new)
            self._array = np.sort(np.frombuffer(b"".join(self._keys), dtype=_KEY))
        if self.on_add is not None:
            self.on_add(sorted(new))
        return len(new)

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._keys)

    def contains(self, column: np.ndarray) -> np.ndarray:
        """Membership of each row of a (n, 16) uint8 address column (e.g. rows["dst_addr"])."""
        keys = np.ascontiguousarray(column).view(_KEY).reshape(-1)
        return np.isin(keys, self._array)

    def __contains__(self, address) -> bool:
        return address_key(address) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
        """(generation, addresses), taken together."""
        with self._lock:
            generation, keys = self.generation, sorted(self._keys)
        # A key with 12 zero bytes after the first 4 is taken as IPv4 (no AI endpoint lives in 0::/96).
        return generation, [ipaddress.IPv4Address(k[:4]) if not any(k[4:]) else ipaddress.IPv6Address(k) for k in keys]


def resolve_hosts(hosts: Iterable[str], targets: TargetSet, *, timeout: float = 5.0,
                  workers: int = 8) -> dict[str, int]:
    """Resolve `hosts` (both families) into `targets`, all within about `timeout` seconds.
    Failures and names still pending at the deadline are counted, never raised."""
    hosts = list(hosts)
    counts = {"hosts": len(hosts), "resolved": 0, "failed": 0, "timed_out": 0, "addresses": 0}
    if not hosts:
        return counts
    pool = concurrent.futures.ThreadPoolExecutor(min(workers, len(hosts)), thread_name_prefix="oisp-resolve")
    futures = {pool.submit(socket.getaddrinfo, host, 443, type=socket.SOCK_STREAM): host for host in hosts}
    done, pending = concurrent.futures.wait(futures, timeout=timeout)
    for future in done:
        try:
            infos = future.result()
        except OSError:
            counts["failed"] += 1
            continue
        counts["resolved"] += 1
        counts["addresses"] += targets.add(info[4][0].split("%")[0] for info in infos)
    counts["timed_out"] = len(pending)
    pool.shutdown(wait=False, cancel_futures=True)  # a stuck getaddrinfo may not hold us up
    return counts


class DnsSniffer:
    """Learns addresses from DNS responses (UDP, and TCP answers within one segment)
    for names `wanted(name)` accepts.

    Without `hold` it only sniffs, so DNS is never delayed. With `hold` the answers are
    diverted: one that names a new AI address is held until `hold(generation)` returns
    (the reflector's filter takes the address), so the client cannot dial the address
    before its SYN is diverted; every other answer is passed on at once."""

    FILTER = "(udp and udp.SrcPort == 53) or (tcp and tcp.SrcPort == 53 and tcp.PayloadLength > 0)"

    def __init__(self, targets: TargetSet, wanted: Callable[[str], bool],
                 hold: Callable[[int], object] | None = None):
        from oisp.divert.constants import Flag
        from oisp.divert.engine import Engine

        self.targets = targets
        self.wanted = wanted
        self.hold = hold
        self.counts = {"responses": 0, "learned": 0, "malformed": 0, "tcp_partial": 0, "held": 0}
        if hold is None:
            self.engine = Engine(self.FILTER, flags=Flag.SNIFF | Flag.RECV_ONLY, policy="drop", watchdog=None)
        else:  # a stuck hold must not stall DNS for good: the watchdog fails open
            self.engine = Engine(self.FILTER, policy="block", watchdog=5.0)
        self._thread = threading.Thread(target=self._run, name="oisp-dns", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self.engine:
                messages = self._messages(batch)
                if self.hold is None:
                    self.engine.release(batch)
                    for message in messages:
                        self.learn(message)
                    continue
                try:
                    if sum([self.learn(message) for message in messages]):
                        self.counts["held"] += 1
                        self.hold(self.targets.generation)
                finally:
                    self.engine.commit(batch)
        except DivertError:
            pass  # the handle closed (stop, or a failure): learning stops, redirection goes on

    def _messages(self, batch) -> list[bytes]:
        from oisp.packet import OK

        rows, data, out = batch.rows, batch.data, []
        for i in np.flatnonzero((rows["status"] == OK) & (rows["payload_len"] > 0)):
            start = int(rows["offset"][i]) + int(rows["payload_offset"][i])
            payload = bytes(data[start:start + int(rows["payload_len"][i])])
            if rows["protocol"][i] == socket.IPPROTO_TCP:
                length = int.from_bytes(payload[:2], "big")
                if len(payload) < 2 or len(payload) - 2 < length:
                    self.counts["tcp_partial"] += 1
                    continue
                payload = payload[2:2 + length]
            out.append(payload)
        return out

    def learn(self, message: bytes) -> int:
        """Add the AI addresses a DNS response names; returns how many were new."""
        self.counts["responses"] += 1
        try:
            addresses = answer_addresses(message, self.wanted)
        except DnsError:
            self.counts["malformed"] += 1
            return 0
        learned = self.targets.add(addresses)
        self.counts["learned"] += learned
        return learned

    def stop(self) -> None:
        self.engine.stop()
        self._thread.join(2.0)

