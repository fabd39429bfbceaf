"""DNS learning believes only answers to queries seen going out (dns_match.py): the
transaction id, the endpoints, the protocol and the question must match a query in
flight, and only the question's CNAME chain is read. Sans-IO: messages in, addresses out."""

import ipaddress
import socket
import struct

import pytest

from oisp.redirect.dns import TYPE_A, TYPE_AAAA, TYPE_CNAME, build_query
from oisp.redirect.dns_match import Endpoints, QueryMatcher
from oisp.spec import default_spec

CLIENT, RESOLVER = bytes(ipaddress.ip_address("10.0.0.1").packed), bytes(ipaddress.ip_address("10.0.0.53").packed)
UDP = socket.IPPROTO_UDP
OUT = Endpoints(UDP, CLIENT, 40000, RESOLVER, 53)  # the client's query
BACK = Endpoints(UDP, RESOLVER, 53, CLIENT, 40000)  # the resolver's answer


def name(text):
    return b"".join(bytes([len(p)]) + p.encode() for p in text.split(".")) + b"\0"


def answer(qname, records, qtype=TYPE_A, query_id=1):
    """records: (owner bytes, type, rdata bytes); the question's name first, uncompressed."""
    body = name(qname) + struct.pack("!HH", qtype, 1)
    for owner, rtype, rdata in records:
        body += owner + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata
    return struct.pack("!HHHHHH", query_id, 0x8180, 1, len(records), 0, 0) + body


A = answer("api.openai.com", [(b"\xc0\x0c", TYPE_A, bytes([1, 2, 3, 4]))])
LEARNED = [ipaddress.ip_address("1.2.3.4")]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def matcher(clock):
    return QueryMatcher(default_spec().matches_host, clock=clock, max_pending=8, timeout=10.0)


def test_an_answer_to_a_query_seen_going_out_teaches_once(matcher):
    assert matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT) == []
    assert len(matcher) == 1
    assert matcher.see(A, BACK) == LEARNED
    assert matcher.see(A, BACK) == []  # the same answer again (a replay, a second forger): no query left
    assert matcher.counts["matched"] == 1
    assert matcher.counts["unsolicited"] == 1
    assert len(matcher) == 0


def test_an_unsolicited_answer_teaches_nothing(matcher):
    assert matcher.see(A, BACK) == []
    assert matcher.counts["unsolicited"] == 1
    assert matcher.counts["matched"] == 0


def test_a_wrong_transaction_id_teaches_nothing(matcher):
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT)
    forged = answer("api.openai.com", [(b"\xc0\x0c", TYPE_A, bytes([6, 6, 6, 6]))], query_id=2)
    assert matcher.see(forged, BACK) == []
    assert matcher.counts["unsolicited"] == 1
    assert matcher.see(A, BACK) == LEARNED  # the real answer is still believed


@pytest.mark.parametrize("where", [
    Endpoints(UDP, RESOLVER, 53, CLIENT, 40001),  # another client port
    Endpoints(UDP, bytes(ipaddress.ip_address("10.0.0.66").packed), 53, CLIENT, 40000),  # another server
    Endpoints(socket.IPPROTO_TCP, RESOLVER, 53, CLIENT, 40000),  # another protocol
    Endpoints(UDP, RESOLVER, 5353, CLIENT, 40000),  # not from port 53
])
def test_an_answer_from_or_to_the_wrong_endpoints_teaches_nothing(matcher, where):
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT)
    assert matcher.see(A, where) == []
    assert matcher.see(A, BACK) == LEARNED


@pytest.mark.parametrize("forged", [
    answer("api.openai.com", [(b"\xc0\x0c", TYPE_AAAA, bytes(16))], qtype=TYPE_AAAA),  # another type
    answer("api.anthropic.com", [(b"\xc0\x0c", TYPE_A, bytes([6, 6, 6, 6]))]),  # another name
])
def test_a_wrong_question_teaches_nothing_and_is_counted(matcher, forged):
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT)
    assert matcher.see(forged, BACK) == []
    assert matcher.counts["wrong_question"] == 1
    assert matcher.counts["unsolicited"] == 0
    assert matcher.see(A, BACK) == LEARNED


def test_the_question_is_compared_without_regard_to_case(matcher):
    """Resolvers may mix the case of a query's name (0x20 encoding); the answer repeats it."""
    matcher.see(build_query("API.OpenAI.com", TYPE_A, query_id=1), OUT)
    assert matcher.see(answer("api.OPENAI.com", [(b"\xc0\x0c", TYPE_A, bytes([1, 2, 3, 4]))]), BACK) == LEARNED


def test_only_the_questions_cname_chain_is_learned(matcher):
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT)
    msg = answer("api.openai.com", [
        (b"\xc0\x0c", TYPE_CNAME, name("edge.example.net")),
        (name("edge.example.net"), TYPE_CNAME, name("x.cdn.test")),
        (name("x.cdn.test"), TYPE_A, bytes([5, 6, 7, 8])),
        (name("api.anthropic.com"), TYPE_A, bytes([6, 6, 6, 6])),  # an AI name, but off the chain
        (name("unrelated.test"), TYPE_A, bytes([7, 7, 7, 7])),
    ])
    assert matcher.see(msg, BACK) == [ipaddress.ip_address("5.6.7.8")]


def test_queries_for_other_names_are_not_kept(matcher):
    for i in range(50):
        matcher.see(build_query(f"host{i}.example.com", TYPE_A, query_id=i), OUT)
    assert len(matcher) == 0
    assert matcher.counts["queries"] == 0
    # Nor does an answer about such a name count as refused: there is nothing to learn from it.
    assert matcher.see(answer("host1.example.com", [(b"\xc0\x0c", TYPE_A, bytes([1, 1, 1, 1]))]), BACK) == []
    assert matcher.counts["unsolicited"] == 0


def test_a_pending_query_expires(matcher, clock):
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT)
    clock.now += 10.5
    assert matcher.see(A, BACK) == []
    assert len(matcher) == 0
    assert matcher.counts["expired"] == 1
    assert matcher.counts["unsolicited"] == 1


def test_a_retried_query_lives_from_its_last_sending(matcher, clock):
    query = build_query("api.openai.com", TYPE_A, query_id=1)
    matcher.see(query, OUT)
    clock.now += 6
    matcher.see(query, OUT)
    clock.now += 6
    assert len(matcher) == 1
    assert matcher.see(A, BACK) == LEARNED


def test_a_flood_of_pending_queries_stays_bounded_and_a_later_query_still_matches(matcher, clock):
    for i in range(20_000):
        where = Endpoints(UDP, CLIENT, 1024 + i % 60000, RESOLVER, 53)
        matcher.see(build_query("api.openai.com", TYPE_A, query_id=i % 65536), where)
    assert len(matcher) == 8
    assert matcher.counts["evicted"] == 20_000 - 8
    assert len(matcher._ids) == 8  # the id index is bounded with the table
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT)
    assert matcher.see(A, BACK) == LEARNED
    clock.now += 11
    matcher.see(b"", OUT)  # any message expires what is due, even a malformed one
    assert len(matcher) == 0
    assert len(matcher._ids) == 0
    assert matcher.counts["malformed"] == 1


def test_a_query_from_port_53_is_a_servers_business(matcher):
    """A DNS server on this host asks from port 53 (and its clients' queries arrive
    inbound, which the watcher's filter leaves out): not a client's query."""
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), Endpoints(UDP, RESOLVER, 53, CLIENT, 40000))
    assert len(matcher) == 0


def test_a_malformed_answer_leaves_the_query_pending(matcher):
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT)
    assert matcher.see(A[:-2], BACK) == []
    assert matcher.counts["malformed"] == 1
    assert matcher.see(A, BACK) == LEARNED


# -- hostile bytes: any message, either way, gives a list (of addresses) and never raises --

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CHAIN = answer("api.openai.com", [(b"\xc0\x0c", TYPE_CNAME, name("edge.example.net")),
                                  (b"\xc0\x2c", TYPE_A, bytes([5, 6, 7, 8]))])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from([A, CHAIN, build_query("api.openai.com", TYPE_A, query_id=1), b""]),
                          st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
                          st.binary(max_size=40), st.booleans()), max_size=12))
def test_damaged_messages_never_raise_and_the_table_stays_bounded(messages):
    import time
    import tracemalloc

    matcher = QueryMatcher(default_spec().matches_host, max_pending=4)
    tracemalloc.start()
    started = time.process_time()  # CPU time: a loaded machine does not count
    try:
        for base, flips, tail, outgoing in messages:
            message = bytearray(base + tail)
            for at, value in flips:
                if message:
                    message[at % len(message)] = value
            learned = matcher.see(bytes(message), OUT if outgoing else BACK)
            assert isinstance(learned, list)
            assert len(matcher) <= 4
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - started < 3.0
    assert peak < 8 * 1024 * 1024


def test_the_fuzz_corpus_chain_answer_is_a_real_answer(matcher):
    matcher.see(build_query("api.openai.com", TYPE_A, query_id=1), OUT)
    assert matcher.see(CHAIN, BACK) == [ipaddress.ip_address("5.6.7.8")]
