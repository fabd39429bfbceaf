"""The AI address set: DNS answers (compression, CNAME chains, malformed input), batch
membership, the cap on learned addresses, the start-up resolution."""

import ipaddress
import struct

import numpy as np
import pytest

from oisp.packet import PACKET_DTYPE
from oisp.redirect.dns import (TYPE_A, TYPE_AAAA, TYPE_CNAME, DnsError, build_query, chain_addresses, question,
                               read_name)
from oisp.divert.address import row_key
from oisp.redirect.targets import TargetSet, resolve_hosts
from oisp.spec import default_spec

wanted = default_spec().matches_host


def answer_addresses(message):
    return chain_addresses(message, question(message))


def name(text):
    return b"".join(bytes([len(p)]) + p.encode() for p in text.split(".")) + b"\0"


def response(qname, answers, qtype=TYPE_A):
    """answers: (owner bytes, type, rdata bytes); owner b"\\xc0\\x0c" points at the question name."""
    head = struct.pack("!HHHHHH", 1, 0x8180, 1, len(answers), 0, 0)
    body = name(qname) + struct.pack("!HH", qtype, 1)
    for owner, rtype, rdata in answers:
        body += owner + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata
    return head + body


def test_compressed_answers_for_a_spec_host():
    msg = response("api.openai.com", [(b"\xc0\x0c", TYPE_A, bytes([1, 2, 3, 4])),
                                      (b"\xc0\x0c", TYPE_AAAA, ipaddress.IPv6Address("2001:db8::1").packed)])
    assert answer_addresses(msg) == [ipaddress.ip_address("1.2.3.4"), ipaddress.ip_address("2001:db8::1")]


def test_cname_chain_in_any_order_is_followed():
    # api.openai.com CNAME edge.example.net; edge.example.net CNAME x.cdn.test; x.cdn.test A 5.6.7.8
    q = 12
    edge = name("edge.example.net")
    edge_at = q + len(name("api.openai.com")) + 4 + 12  # owner pointer, fixed fields, then rdata
    cname1 = (b"\xc0\x0c", TYPE_CNAME, edge)
    cdn = name("x.cdn.test")
    a = (cdn, TYPE_A, bytes([5, 6, 7, 8]))
    cname2 = (struct.pack("!H", 0xC000 | edge_at), TYPE_CNAME, cdn)
    msg = response("api.openai.com", [cname1, a, cname2])
    assert read_name(msg, edge_at)[0] == "edge.example.net"
    assert answer_addresses(msg) == [ipaddress.ip_address("5.6.7.8")]


def test_records_off_the_questions_chain_are_ignored():
    """Only the question's name and the CNAME targets followed from it count: an A record
    for api.openai.com riding along in an answer about example.com teaches nothing."""
    msg = response("example.com", [(b"\xc0\x0c", TYPE_A, bytes([9, 9, 9, 9])),
                                   (name("api.openai.com"), TYPE_A, bytes([6, 6, 6, 6]))])
    assert answer_addresses(msg) == [ipaddress.ip_address("9.9.9.9")]
    # A CNAME whose owner is not on the chain is not followed either.
    msg = response("api.openai.com", [(name("other.test"), TYPE_CNAME, name("api.openai.com")),
                                      (name("other.test"), TYPE_A, bytes([6, 6, 6, 6]))])
    assert answer_addresses(msg) == []
    q = question(build_query("api.openai.com", TYPE_A, query_id=7))
    assert (q.id, q.response, q.name, q.rtype, q.answers) == (7, False, "api.openai.com", TYPE_A, 0)


def test_a_cname_loop_ends_the_chain():
    msg = response("api.openai.com", [(b"\xc0\x0c", TYPE_CNAME, name("b.test")),
                                      (name("b.test"), TYPE_CNAME, name("api.openai.com")),
                                      (name("b.test"), TYPE_A, bytes([5, 5, 5, 5]))])
    assert answer_addresses(msg) == [ipaddress.ip_address("5.5.5.5")]


def test_a_message_must_hold_exactly_one_question():
    msg = bytearray(response("api.openai.com", [(b"\xc0\x0c", TYPE_A, bytes([1, 2, 3, 4]))]))
    for count in (0, 2):
        msg[4:6] = count.to_bytes(2, "big")
        with pytest.raises(DnsError, match="questions"):
            question(bytes(msg))


@pytest.mark.parametrize("cut", range(1, 60, 3))
def test_truncated_responses_raise_dns_error(cut):
    msg = response("api.openai.com", [(b"\xc0\x0c", TYPE_A, bytes([1, 2, 3, 4]))])
    if cut < len(msg):
        with pytest.raises(DnsError):
            answer_addresses(msg[:len(msg) - cut])


def test_a_compression_loop_is_an_error_not_a_hang():
    msg = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c"
    with pytest.raises(DnsError):
        answer_addresses(msg)


def test_random_bytes_never_raise_anything_but_dns_error():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        msg = bytearray(rng.integers(0, 256, int(rng.integers(0, 80)), dtype=np.uint8).tobytes())
        if len(msg) > 2:
            msg[2] |= 0x80
        try:
            answer_addresses(bytes(msg))
        except DnsError:
            pass


def test_membership_over_a_batch_column_both_families():
    targets = TargetSet(["10.0.0.2", "fd00::2"])
    rows = np.zeros(4, dtype=PACKET_DTYPE)
    for i, text in enumerate(["10.0.0.2", "10.0.0.3", "fd00::2", "fd00::3"]):
        rows["dst_addr"][i] = np.frombuffer(ipaddress.ip_address(text).packed.ljust(16, b"\0"), np.uint8)
    assert targets.contains(rows["dst_addr"]).tolist() == [True, False, True, False]
    assert targets.contains(rows["dst_addr"][[1, 2]]).tolist() == [False, True]
    assert targets.contains(rows["dst_addr"][:0]).tolist() == []
    assert targets.add(["10.0.0.3", "10.0.0.2"]) == 1
    assert targets.contains(rows["dst_addr"]).tolist() == [True, True, True, False]
    assert set(map(str, targets.addresses())) == {"10.0.0.2", "10.0.0.3", "fd00::2"}


def test_the_set_is_bounded_and_counts_what_did_not_fit():
    targets = TargetSet(max_addresses=2)
    targets.add(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert len(targets) == 2
    assert targets.counts["full"] == 1


def test_addresses_dns_alone_names_are_capped_below_the_filters_size():
    targets = TargetSet(["10.0.0.1"], max_learned=2)
    assert targets.add(["10.1.0.1", "10.1.0.2", "10.1.0.3"], learned=True) == 2
    assert targets.counts["learned_full"] == 1
    assert len(targets) == 3
    # known: renamed
    assert targets.add(["10.1.0.1"], learned=True) == 0
    assert targets.counts["learned_full"] == 1
    # A resolution naming a learned address takes it off the learned count; others are not capped.
    assert targets.add(["10.1.0.1", "10.2.0.1", "10.2.0.2"]) == 2
    assert targets.add(["10.1.0.4"], learned=True) == 1
    assert targets.add(["10.1.0.5"], learned=True) == 0
    # Expiry frees room.
    targets.expire(float("inf"))
    assert targets.add(["10.1.0.5"], learned=True) == 1
    assert TargetSet().max_learned == 64


def test_startup_resolution_counts_failures_and_is_bounded():
    targets = TargetSet()
    counts = resolve_hosts(["localhost", "no-such-host.invalid"], targets, timeout=5.0)
    assert counts["resolved"] == 1
    assert counts["failed"] + counts["timed_out"] == 1
    assert "127.0.0.1" in targets


def test_learned_addresses_expire_unless_named_again_kept_or_given():
    targets = TargetSet(["10.0.0.1"])  # given: kept for good
    assert targets.add(["10.0.0.2", "10.0.0.3", "10.0.0.4"], now=100.0) == 3
    assert targets.add(["10.0.0.3"], now=200.0) == 0  # named again
    generation = targets.generation
    keep = [row_key("10.0.0.4")]  # e.g. an open flow's server
    assert targets.expire(150.0, keep) == [row_key("10.0.0.2")]
    assert set(map(str, targets.addresses())) == {"10.0.0.1", "10.0.0.3", "10.0.0.4"}
    assert targets.generation == generation + 1
    assert targets.counts["expired"] == 1
    assert targets.expire(150.0, keep) == []
    assert targets.generation == generation + 1
    column = np.array([np.frombuffer(row_key(a), dtype=np.uint8) for a in ("10.0.0.2", "10.0.0.3")])
    assert targets.contains(column).tolist() == [False, True]
    assert sorted(targets.expire(1e12)) == sorted([row_key("10.0.0.3"), row_key("10.0.0.4")])
    assert list(map(str, targets.addresses())) == ["10.0.0.1"]
