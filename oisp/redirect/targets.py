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
import logging
import socket
import threading
import time
from typing import Callable, Iterable

import numpy as np

from oisp.redirect.dns_match import Endpoints, QueryMatcher
from oisp.divert.address import row_key

_KEY = np.dtype("V16")
MAX_LEARNED = 64  # addresses DNS answers alone may add (see TargetSet)
log = logging.getLogger(__name__)


class TargetSet:
    """A set of AI endpoint addresses, IPv4 and IPv6, bounded at `max_addresses`, of
    which at most `max_learned` come from DNS answers alone (`add(..., learned=True)`):
    learning is the part a stranger can push on (dns_match.py), and the filter holds
    about MAX_FILTER_ADDRESSES (200) before it names the port alone, so the spec's own
    resolution (a few per host) plus what DNS may add stays below that.
    Each address remembers when a resolution or DNS answer last named it, so ones
    no longer named can be let go (`expire`); those given here are kept for good."""

    def __init__(self, addresses: Iterable = (), *, max_addresses: int = 65536, max_learned: int = MAX_LEARNED):
        self.max_addresses, self.max_learned = max_addresses, max_learned
        self._lock = threading.Lock()
        self._seen: dict[bytes, float] = {}  # key → when last named (monotonic)
        self._learned: set[bytes] = set()  # keys only DNS answers have named
        self._array = np.empty(0, dtype=_KEY)
        self.generation = 0  # counts the changes: adds that brought new addresses, expiries
        self.counts = {"added": 0, "full": 0, "learned_full": 0, "expired": 0}
        self.on_add: Callable[[list[bytes]], None] | None = None  # new 16-byte keys (the ring's fast path)
        self.add(addresses)
        self._pinned = frozenset(self._seen)

    def add(self, addresses: Iterable, now: float | None = None, learned: bool = False) -> int:
        """Add addresses (strings, ipaddress objects or 16-byte keys), or mark known ones
        as named again; returns how many were new. `learned`: named by a DNS answer
        only, so bounded by max_learned; otherwise (a resolution, the caller) they stop
        counting as learned."""
        keys = {row_key(a) for a in addresses}
        now = time.monotonic() if now is None else now
        with self._lock:
            new = keys - self._seen.keys()
            for key in keys - new:
                self._seen[key] = now
            if not learned:
                self._learned -= keys
            room = self.max_addresses - len(self._seen)
            if len(new) > room:
                self.counts["full"] += len(new) - room
                new = set(sorted(new)[:max(room, 0)])
            if learned:
                room = self.max_learned - len(self._learned)
                if len(new) > room:
                    self.counts["learned_full"] += len(new) - max(room, 0)
                    new = set(sorted(new)[:max(room, 0)])
                self._learned |= new
            if not new:
                return 0
            self._seen.update(dict.fromkeys(new, now))
            self._changed()
            self.counts["added"] += len(new)
        if self.on_add is not None:
            self.on_add(sorted(new))
        return len(new)

    def expire(self, named_before: float, keep: Iterable[bytes] = ()) -> list[bytes]:
        """Let go of the addresses last named before `named_before` (monotonic), except
        those in `keep` (the servers of open flows); returns their keys."""
        keep = self._pinned.union(keep)
        with self._lock:
            stale = [key for key, seen in self._seen.items() if seen < named_before and key not in keep]
            if not stale:
                return []
            for key in stale:
                del self._seen[key]
            self._learned.difference_update(stale)
            self._changed()
            self.counts["expired"] += len(stale)
        return stale

    def _changed(self) -> None:
        """Under the lock: a new generation and a new sorted array, swapped in whole."""
        self.generation += 1
        self._array = np.sort(np.frombuffer(b"".join(self._seen), dtype=_KEY))

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._seen)

    def contains(self, column: np.ndarray) -> np.ndarray:
        """Membership of each row of a (n, 16) uint8 address column (e.g. rows["dst_addr"])."""
        keys = np.ascontiguousarray(column).view(_KEY).reshape(-1)
        return np.isin(keys, self._array)

    def __contains__(self, address) -> bool:
        return row_key(address) in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return self.snapshot()[1]

    def snapshot(self) -> tuple[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
        """(generation, addresses), taken together."""
        with self._lock:
            generation, keys = self.generation, sorted(self._seen)
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
        # an IP socket address: its host is a str
        counts["addresses"] += targets.add(info[4][0].split("%")[0] for info in infos)  # type: ignore[union-attr]
    counts["timed_out"] = len(pending)
    pool.shutdown(wait=False, cancel_futures=True)  # a stuck getaddrinfo may not hold us up
    return counts


class DnsSniffer:
    """Learns addresses from DNS responses (UDP, and TCP messages within one segment)
    to queries for names `wanted(name)` accepts that it saw going out (dns_match.py).

    Without `hold` it only sniffs, so DNS is never delayed. With `hold` queries and
    answers are diverted: an answer that names a new AI address is held until
    `hold(generation)` returns (the reflector's filter takes the address), so the
    client cannot dial the address before its SYN is diverted; every other message is
    passed on at once. Queries and answers share one handle, so a query is always seen
    before the answer to it."""

    # Queries outbound only: this host's clients, not the queries a DNS server here gets.
    FILTER = ("(udp and (udp.SrcPort == 53 or (outbound and udp.DstPort == 53))) or "
              "(tcp and tcp.PayloadLength > 0 and (tcp.SrcPort == 53 or (outbound and tcp.DstPort == 53)))")

    def __init__(self, targets: TargetSet, wanted: Callable[[str], bool],
                 hold: Callable[[int], object] | None = None):
        from oisp.divert.constants import Flag
        from oisp.divert.engine import Engine

        self.targets = targets
        self.wanted = wanted
        self.hold = hold
        self.matcher = QueryMatcher(wanted)
        self.counts = {"responses": 0, "learned": 0, "tcp_partial": 0, "held": 0}
        self.failure: BaseException | None = None  # what ended it: the handle is closed (failed open)
        self._stopping = threading.Event()
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
                    for message, where in messages:
                        self.learn(message, where)
                    continue
                try:
                    if sum([self.learn(message, where) for message, where in messages]):
                        self.counts["held"] += 1
                        self.hold(self.targets.generation)
                finally:
                    self.engine.commit(batch)
        except BaseException as e:  # the watchdog failed open, or something unexpected broke
            self.engine.stop()  # a handle left open would hold every DNS answer on the host
            if not self._stopping.is_set():
                log.error("the DNS watcher stopped (%s: %s); its divert handle is closed, DNS flows directly",
                          type(e).__name__, e, exc_info=e)
                self.failure = e

    def _messages(self, batch) -> list[tuple[bytes, Endpoints]]:
        """The DNS messages of a batch in packet order, each with its endpoints."""
        from oisp.packet import OK

        rows, data, out = batch.rows, batch.data, []
        for i in np.flatnonzero((rows["status"] == OK) & (rows["payload_len"] > 0)):
            start = int(rows["offset"][i]) + int(rows["payload_offset"][i])
            payload = bytes(data[start:start + int(rows["payload_len"][i])])
            protocol = int(rows["protocol"][i])
            if protocol == socket.IPPROTO_TCP:
                length = int.from_bytes(payload[:2], "big")
                if len(payload) < 2 or len(payload) - 2 < length:
                    self.counts["tcp_partial"] += 1
                    continue
                payload = payload[2:2 + length]
            out.append((payload, Endpoints(protocol, rows["src_addr"][i].tobytes(), int(rows["src_port"][i]),
                                           rows["dst_addr"][i].tobytes(), int(rows["dst_port"][i]))))
        return out

    def learn(self, message: bytes, where: Endpoints) -> int:
        """Add the AI addresses a DNS message teaches (an answer to a query seen going
        out, for an AI name); returns how many were new."""
        if len(message) > 2 and message[2] & 0x80:
            self.counts["responses"] += 1
        learned = self.targets.add(self.matcher.see(message, where), learned=True)
        self.counts["learned"] += learned
        return learned

    def counters(self) -> dict:
        """Its own counts and the matcher's (what was refused, and why)."""
        return {**self.counts, **self.matcher.counts, "pending": len(self.matcher)}

    def stop(self) -> None:
        self._stopping.set()
        self.engine.stop()
        self._thread.join(2.0)
