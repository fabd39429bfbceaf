"""Plaintext model server ports: `--plain` parsing, the divert filter's local ranges
(judged by the backend's own filter evaluator on real packets), the spec's local
ports and providers, and the reflector and its ring taking every destination of a
plaintext port in both of their paths."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from oisp._native.ring import FastPath
from oisp.divert.address import IPV6, OUTBOUND, new_addresses, row_key
from oisp.redirect import FlowTable, OwnPorts, TargetSet
from oisp.redirect import batch_decision
from oisp.redirect.plain import LOCAL_NETWORKS, PlainPorts, PlainRequest, PlainSpecError, is_local, parse_plain
from oisp.redirect.reflector import Reflector
from oisp.redirect.succession import reflector_filter
from oisp.spec import default_spec
from tests.reflector_batch import Batch

TO_PROXY, PASS_OTHER, SLOW = FastPath.TO_PROXY, FastPath.PASS_OTHER, FastPath.SLOW


@pytest.mark.parametrize("text, want", [
    ("11434", PlainRequest(11434)),
    ("gpu-box:8000", PlainRequest(8000, "gpu-box")),
    ("[fd00::2]:8000", PlainRequest(8000, "fd00::2")),
    ("9000=vllm", PlainRequest(9000, None, "vllm")),
    ("10.0.0.5:9000=llamacpp", PlainRequest(9000, "10.0.0.5", "llamacpp")),
])
def test_parse_plain(text, want):
    assert parse_plain(text) == want


@pytest.mark.parametrize("text", ["", "0", "65536", "x", ":80", "fd00::2:8000", "[fd00::2]8000", "host:port"])
def test_parse_plain_refuses(text):
    with pytest.raises(PlainSpecError):
        parse_plain(text)


def test_ports_from_the_spec_and_plain_values():
    resolved = []

    def resolve(host):
        resolved.append(host)
        return ["192.0.2.7", "2001:db8::7", "10.1.2.3"]

    ports = PlainPorts.build([11434, 8000], [parse_plain("9000=vllm"), parse_plain("box:7000"),
                                             parse_plain("198.51.100.1:11434")], resolve)
    assert resolved == ["box"]  # an address literal is not resolved
    assert sorted(ports.ports) == [7000, 8000, 9000, 11434]
    assert ports.ports[9000].local
    assert ports.ports[9000].provider == "vllm"
    assert not ports.ports[7000].local
    assert ports.ports[7000].addresses == {"192.0.2.7", "2001:db8::7", "10.1.2.3"}
    assert ports.ports[11434].local
    assert ports.ports[11434].addresses == {"198.51.100.1"}
    assert ports.describe()[0] == "7000 (no provider named: =ID names one): 10.1.2.3, 192.0.2.7, 2001:db8::7"
    assert PlainPorts.build([], [], resolve).clause() is None
    assert not PlainPorts()
    with pytest.raises(PlainSpecError, match="link-local"):
        PlainPorts.build([], [parse_plain("[fe80::1]:8000")], resolve)
    mixed = PlainPorts.build([], [parse_plain("box:8000")], lambda host: ["fe80::2%eth0", "10.0.0.9"])
    assert mixed.ports[8000].addresses == {"10.0.0.9"}


def packet(dst: str, dport: int, sport: int = 40000) -> tuple[bytes, np.ndarray]:
    v6 = ":" in dst
    p = (IPv6(src="fd00:9::1", dst=dst) if v6 else IP(src="10.9.0.1", dst=dst)) / TCP(sport=sport, dport=dport, flags="S")
    address = new_addresses(1)
    address["bits"] = OUTBOUND | (IPV6 if v6 else 0)
    return bytes(p), address


@pytest.fixture(scope="module")
def backend():
    from oisp.divert.backend import get_backend

    try:
        return get_backend()
    except Exception as e:  # no backend library: the filter cannot be judged here
        pytest.skip(f"no divert backend: {e}")


def test_the_filter_takes_local_ranges_and_named_hosts_only(backend):
    """The backend's evaluator, on real packets: every local range's edges are in, the
    addresses just outside are out, and a named public host is in on its port alone."""
    plain = PlainPorts.build([11434], [parse_plain("198.51.100.1:7000")], lambda host: [])
    filter = reflector_filter({443: 8443, 11434: 30001, 7000: 30002}, [ipaddress.ip_address("192.0.2.1")], plain)
    assert backend.compile_filter(filter)[0], filter

    def taken(dst, dport):
        data, address = packet(dst, dport)
        return backend.eval_filter(filter, data, len(data), address)

    for network in LOCAL_NETWORKS:
        first, last = network.network_address, network.broadcast_address
        assert taken(str(first), 11434), network
        assert taken(str(last), 11434), network
        for outside in (int(first) - 1, int(last) + 1):
            neighbour = ipaddress.ip_address(outside)
            if not is_local(str(neighbour)):
                assert not taken(str(neighbour), 11434), neighbour
    assert not taken("8.8.8.8", 11434)
    assert not taken("2001:db8::1", 11434)
    assert not taken("fe80::1", 11434)  # link-local: the upstream would need a scope id
    assert taken("198.51.100.1", 7000)
    assert not taken("198.51.100.1", 11434)
    assert not taken("10.0.0.1", 7000)
    # the AI port still names its addresses
    assert taken("192.0.2.1", 443)
    assert not taken("10.0.0.1", 443)


def test_the_spec_lists_local_servers_and_names_a_port():
    spec = default_spec()
    assert {11434, 1234, 8000, 8080, 30000} <= set(spec.local_ports())
    # every web dev server's
    assert 3000 not in spec.local_ports()
    assert 5000 not in spec.local_ports()
    assert spec.match("127.0.0.1:8080", "/v1/chat/completions").provider_id == "llamacpp"
    assert spec.match("127.0.0.1:9000", "/v1/chat/completions") is None  # no provider, no body
    named = spec.with_port_providers({9000: "vllm"})
    assert named.match("127.0.0.1:9000", "/v1/chat/completions").provider_id == "vllm"
    assert named.match("api.openai.com", "/v1/chat/completions").provider_id == "openai"  # a Host still wins
    assert spec.match("127.0.0.1:9000", "/v1/chat/completions") is None  # the original is unchanged
    with pytest.raises(KeyError):
        spec.with_port_providers({9000: "nonesuch"})


def plain_reflector(small: bool, monkeypatch) -> Reflector:
    monkeypatch.setattr(batch_decision, "SMALL_BATCH", 10**6 if small else 0)
    plain = PlainPorts.build([11434], [], lambda host: [])
    return Reflector(TargetSet(["10.200.1.2"]), FlowTable(), OwnPorts(), ports={443: 8443, 11434: 30001},
                     plain=plain)


@pytest.mark.parametrize("small", [True, False], ids=["row", "vector"])
def test_the_reflector_takes_any_destination_of_a_plaintext_port(small, monkeypatch):
    reflector = plain_reflector(small, monkeypatch)
    packets = [packet("127.0.0.1", 11434, 40000)[0], packet("::1", 11434, 40001)[0],
               packet("10.9.9.9", 443, 40002)[0]]  # 443 to an address that is not an AI one
    batch = Batch(packets, [True, True, True])
    batch.addresses["bits"][1] |= IPV6
    reflector.process(batch)
    assert batch.verdicts.tolist()[:2] != [0, 0]
    assert batch.verdicts[2] == 0
    rows = batch.rows
    assert rows["dst_port"].tolist()[:2] == [30001, 30001]
    assert rows["dst_port"][2] == 443
    assert sorted(e.key[1] for e in reflector.flows.entries()) == [40000, 40001]


def test_a_plaintext_port_needs_a_proxy_port():
    with pytest.raises(ValueError, match="11434"):
        Reflector(TargetSet(), FlowTable(), OwnPorts(), ports={443: 8443},
                  plain=PlainPorts.build([11434], [], lambda host: []))


def test_the_ring_opens_and_reflects_flows_of_a_plaintext_port_to_any_address():
    from oisp._native.ring import ReceiveRing

    own = OwnPorts()
    fast = ReceiveRing(0, 0, 0, 0, nslots=2).enable_fast({443: 8443, 11434: 30001}, own.mask, 64, any_address=[11434])
    fast.add_targets([row_key("10.200.1.2")], enable=True)
    fast.open_syns(True)
    for dst in ("127.0.0.1", "::1", "192.168.1.20"):
        data, address = packet(dst, 11434)
        action, out, _ = fast.decide(data, address.tobytes())
        assert action == TO_PROXY, dst
    data, address = packet("192.168.1.20", 443)
    assert fast.decide(data, address.tobytes())[0] == PASS_OTHER  # 443 still wants an AI address
    assert [o[2] for o in fast.take_opened()] == [40000, 40000, 40000]
    with pytest.raises(ValueError, match="not redirected"):
        ReceiveRing(0, 0, 0, 0, nslots=2).enable_fast({443: 8443}, own.mask, 64, any_address=[11434])


def test_oisp_check_says_which_local_servers_and_ports_are_watched(tmp_path):
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "oisp", "check", "--json"], capture_output=True, text=True, timeout=60)
    watched = json.loads(done.stdout)["watched"]
    assert {"port": 11434, "provider": "ollama"} in watched["plain"]
    assert {"port": 8080, "provider": "llamacpp"} in watched["plain"]
    assert {"localai", "tgi"} <= set(watched["plain_by_option"])
    assert "127.0.0.0/8" in watched["plain_networks"]
    assert "fc00::/7" in watched["plain_networks"]
    text = subprocess.run([sys.executable, "-m", "oisp", "check"], capture_output=True, text=True, timeout=60).stdout
    assert ":11434 ollama" in text
    assert ":1234 lmstudio" in text
    assert "--plain PORT=ID" in text
    # A spec of one's own: its ports are the ones shown.
    spec = json.loads((Path(__file__).parents[1] / "oisp" / "spec" / "ai_endpoints.json").read_text())
    spec["providers"] = [p for p in spec["providers"] if p["id"] in ("openai", "ollama")]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "oisp", "check", "--json", "--spec", str(tmp_path / "spec.json")],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout)["watched"]["plain"] == [{"port": 11434, "provider": "ollama"}]
