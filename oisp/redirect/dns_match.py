"""Which DNS answers may teach the AI address set: only answers to queries seen going out.

Sans-IO: the DNS watcher hands every message it sees here with its endpoints, and
gets back the addresses to learn. An answer teaches something only if

- a query for an AI name (`wanted`) left this host from the answer's destination
  (address and port) to its source (address, port 53), on the same protocol,
  with the same transaction id and the same question (name, type, class),
  no longer than `timeout` seconds ago, and was not answered yet;
- and then only the A/AAAA records along the CNAME chain from that question.

Any host that can send a datagram from port 53 could otherwise add addresses
(each a filter rebuild; past the filter's size all port-443 traffic crosses user
space). Off the path, a forger must now guess the 16-bit id and the client's
random port of a query in flight; records for other names ride along for
nothing. What is refused is counted: `unsolicited` (no such query: never asked,
wrong id, wrong endpoints, already answered or expired), `wrong_question` (a
query with that id and endpoints asked something else).

The pending table is bounded in entries (`max_pending`, oldest evicted and
counted) and in time (`timeout`); a query for a name that is not an AI endpoint
is not kept at all, so ordinary DNS traffic cannot fill it. A local program may
still ask and answer for AI names through a server it controls: the address cap
(TargetSet.max_learned) and the reflector's swap budget bound what that costs.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from typing import Callable, NamedTuple

from oisp.redirect.dns import DnsError, chain_addresses, question

MAX_PENDING = 1024  # queries for AI names in flight; a host makes a few a second
QUERY_TIMEOUT = 10.0  # seconds; resolvers give up on a server after 5 (glibc) and ask again


class Endpoints(NamedTuple):
    """Where a message went: addresses as bytes (any fixed form, compared as given)."""

    protocol: int
    src: bytes
    src_port: int
    dst: bytes
    dst_port: int


class QueryMatcher:
    def __init__(self, wanted: Callable[[str], bool], *, max_pending: int = MAX_PENDING,
                 timeout: float = QUERY_TIMEOUT, clock: Callable[[], float] = time.monotonic):
        self.wanted, self.max_pending, self.timeout, self.clock = wanted, max_pending, timeout, clock
        # (protocol, client, client port, server, id, name, type, class) → deadline; in the
        # order the queries were seen, which with one timeout is the order they expire in.
        self._pending: OrderedDict[tuple, float] = OrderedDict()
        # (protocol, client, client port, server, id) → how many of the above share it,
        # to tell a wrong question from no query at all.
        self._ids: dict[tuple, int] = {}
        self.counts = {"queries": 0, "answers": 0, "matched": 0, "unsolicited": 0, "wrong_question": 0,
                       "expired": 0, "evicted": 0, "malformed": 0}

    def __len__(self) -> int:
        return len(self._pending)

    def see(self, message: bytes, where: Endpoints,
            now: float | None = None) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """Take one DNS message (query or response); the addresses it teaches, if any."""
        now = self.clock() if now is None else now
        self._expire(now)
        try:
            q = question(message)
            if not q.response:
                if where.dst_port == 53:  # a query to a server; one from port 53 is a server's own
                    self._query(q, where, now)
                return []
            if where.src_port != 53:
                return []
            return self._answer(message, q, where)
        except DnsError:
            self.counts["malformed"] += 1
            return []

    def _query(self, q, where: Endpoints, now: float) -> None:
        if not self.wanted(q.name):
            return
        self.counts["queries"] += 1
        ids = (where.protocol, where.src, where.src_port, where.dst, q.id)
        key = (*ids, q.name, q.rtype, q.rclass)
        if key in self._pending:  # asked again (a retry): the later deadline counts
            self._pending.move_to_end(key)
        else:
            self._ids[ids] = self._ids.get(ids, 0) + 1
            if len(self._pending) >= self.max_pending:
                self._drop(next(iter(self._pending)))
                self.counts["evicted"] += 1
        self._pending[key] = now + self.timeout

    def _answer(self, message: bytes, q, where: Endpoints) -> list:
        if not self.wanted(q.name):
            return []  # about a name we do not track: nothing to learn either way
        self.counts["answers"] += 1
        ids = (where.protocol, where.dst, where.dst_port, where.src, q.id)
        key = (*ids, q.name, q.rtype, q.rclass)
        if key not in self._pending:
            self.counts["wrong_question" if ids in self._ids else "unsolicited"] += 1
            return []
        addresses = chain_addresses(message, q)  # malformed: the query stays pending
        self._drop(key)  # one answer per query: a second one is unsolicited
        self.counts["matched"] += 1
        return addresses

    def _drop(self, key: tuple) -> None:
        del self._pending[key]
        ids = key[:5]
        left = self._ids[ids] - 1
        if left:
            self._ids[ids] = left
        else:
            del self._ids[ids]

    def _expire(self, now: float) -> None:
        while self._pending:
            key, deadline = next(iter(self._pending.items()))
            if deadline > now:
                return
            self._drop(key)
            self.counts["expired"] += 1
