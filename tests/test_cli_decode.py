"""`oisp decode`: TCP reassembly from pcapng, and the same events the live recorder emits.

Two independent capture producers: scapy's pcapng writer over crafted segments
(reordered, retransmitted, with overlap), and dumpcap recording a real HTTP
exchange with a local Ollama-compatible server on 127.0.0.1:11434.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "providers"))
from provider_cases import Case, http1_request, http1_response, load_cases, validate

from oisp.cli import main
from oisp.cli.decode import decode_capture
from oisp.decode import Direction, FlowContext
from oisp.events import FlowRecorder

scapy_all = pytest.importorskip("scapy.all")


def comparable(events: list[dict]) -> list[tuple]:
    out = []
    for e in events:
        data = {k: v for k, v in e["data"].items()
                if k not in ("request_id", "latency_ms", "time_to_first_token_ms", "duration_ms", "start_time", "end_time")}
        out.append((e["event_type"], json.dumps(data, sort_keys=True)))
    return out


def segments_for(case: Case, client=("10.1.1.2", 40001), server=("10.1.1.9", 11434)) -> list:
    IP, TCP, Ether = scapy_all.IP, scapy_all.TCP, scapy_all.Ether
    c_isn, s_isn = 1000, 500000
    req, resp = http1_request(case), http1_response(case)

    def mk(src, dst, flags, seq, payload=b""):
        return Ether() / IP(src=src[0], dst=dst[0]) / TCP(sport=src[1], dport=dst[1], flags=flags, seq=seq) / payload

    pkts = [mk(client, server, "S", c_isn), mk(server, client, "SA", s_isn), mk(client, server, "A", c_isn + 1)]
    for data, src, dst, isn in ((req, client, server, c_isn + 1), (resp, server, client, s_isn + 1)):
        pieces = [(isn + i, data[i : i + 40]) for i in range(0, len(data), 40)]
        rng = random.Random(len(data))
        shuffled = pieces[:]
        for i in range(0, len(shuffled) - 1, 3):  # swap neighbours: out-of-order delivery
            shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
        extra = [rng.choice(pieces) for _ in range(3)]  # duplicates: retransmissions
        overlap = [(pieces[1][0] - 10, data[30:70])] if len(pieces) > 2 else []
        for seq, chunk in shuffled + extra + overlap:
            pkts.append(mk(src, dst, "PA", seq, chunk))
    pkts += [mk(client, server, "FA", c_isn + 1 + len(req)), mk(server, client, "FA", s_isn + 1 + len(resp))]
    for i, p in enumerate(pkts):
        p.time = 1700000000 + i * 0.001
    return pkts


def direct_events(case: Case, server_port: int) -> list[dict]:
    rec = FlowRecorder(FlowContext(("10.1.1.2", 40001), ("10.1.1.9", server_port), 0.0), capture_method="other")
    return (rec.feed(Direction.REQUEST, http1_request(case), 1.0) + rec.feed(Direction.RESPONSE, http1_response(case), 2.0)
            + rec.close(3.0))


@pytest.mark.parametrize("name", ["ollama_chat_ndjson", "ollama_generate_json"])
def test_scapy_pcapng_decodes_like_live(tmp_path, name: str) -> None:
    case = next(c for c in load_cases() if c.name == name)
    path = tmp_path / "cap.pcapng"
    scapy_all.wrpcapng(str(path), segments_for(case))
    events: list[dict] = []
    counts = decode_capture(str(path), events.append)
    validate(events)
    assert counts["connections"] == 1
    assert counts["decode_errors"] == 0
    assert comparable(events) == comparable(direct_events(case, 11434))
    resp = next(e for e in events if e["event_type"] == "ai.response")["data"]
    assert resp["choices"][0]["message"]["content"] == case.expected["text"]


def test_classic_pcap_and_port_filter(tmp_path) -> None:
    case = next(c for c in load_cases() if c.name == "ollama_chat_ndjson")
    path = tmp_path / "cap.pcap"
    scapy_all.wrpcap(str(path), segments_for(case))
    events: list[dict] = []
    decode_capture(str(path), events.append)
    assert [e["event_type"] for e in events] == ["network.connect", "ai.request", "ai.response", "network.flow"]
    none: list[dict] = []
    decode_capture(str(path), none.append, ports=[80])
    assert none == []


class _FakeOllama(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        lines = [{"model": body["model"], "message": {"role": "assistant", "content": w}, "done": False}
                 for w in ("Sky ", "is ", "blue.")]
        lines.append({"model": body["model"], "message": {"role": "assistant", "content": ""}, "done": True,
                      "done_reason": "stop", "prompt_eval_count": 9, "eval_count": 3})
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines:
            data = json.dumps(line).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(0.02)
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args) -> None:
        pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.skipif(shutil.which("dumpcap") is None, reason="dumpcap not installed (apt-get install tshark)")
@pytest.mark.skipif(not _port_free(11434), reason="port 11434 is in use (a real Ollama?)")
def test_dumpcap_capture_of_real_loopback_exchange(tmp_path, capsys) -> None:
    pcap = tmp_path / "ollama.pcapng"
    srv = ThreadingHTTPServer(("127.0.0.1", 11434), _FakeOllama)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cap = subprocess.Popen(["dumpcap", "-q", "-i", "lo", "-f", "tcp port 11434", "-w", str(pcap)], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 10
        while not pcap.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        for prompt in ("why is the sky blue?", "and the sea?"):
            req = urllib.request.Request("http://127.0.0.1:11434/api/chat",
                                         data=json.dumps({"model": "llama3.2",
                                                          "messages": [{"role": "user", "content": prompt}]}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req) as r:
                assert r.read().count(b"\n") == 4
        time.sleep(0.5)
    finally:
        cap.terminate()
        cap.wait(10)
        srv.shutdown()
        srv.server_close()
    assert main(["decode", str(pcap)]) == 0
    out = capsys.readouterr().out
    events = [json.loads(line) for line in out.splitlines()]
    validate(events)
    reqs = [e["data"] for e in events if e["event_type"] == "ai.request"]
    resps = [e["data"] for e in events if e["event_type"] == "ai.response"]
    assert [r["messages"][0]["content"] for r in reqs] == ["why is the sky blue?", "and the sea?"]
    assert all(r["provider"]["name"] == "ollama" and r["streaming"] for r in reqs)
    for r in resps:
        assert r["choices"][0]["message"]["content"] == "Sky is blue."
        assert r["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        # The first chunk follows the headers at once: under 1 ms on loopback rounds to 0.
        assert r["finish_reason"] == "stop"
        assert 0 <= r["time_to_first_token_ms"] < r["latency_ms"]


def test_not_a_capture_is_a_clean_error(tmp_path, capsys) -> None:
    bad = tmp_path / "x.pcapng"
    bad.write_bytes(b"hello world")
    assert main(["decode", str(bad)]) == 2


# -- damaged captures: a clear error or a counted skip, and nothing readable lost ----------

import struct  # noqa: E402

from oisp.pcapng import CaptureFormatError, read_packets  # noqa: E402
from oisp.pcapng.reader import ReadStats  # noqa: E402


def _clean_capture(tmp_path) -> tuple[Path, list[dict]]:
    case = next(c for c in load_cases() if c.name == "ollama_chat_ndjson")
    path = tmp_path / "clean.pcapng"
    scapy_all.wrpcapng(str(path), segments_for(case))
    events: list[dict] = []
    decode_capture(str(path), events.append)
    return path, events


def _blocks(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each block of a little-endian pcapng file, from its length fields."""
    out, pos = [], 0
    while pos < len(data):
        total = struct.unpack_from("<I", data, pos + 4)[0]
        out.append((pos, total))
        pos += total
    return out


def _epb(if_id: int, payload: bytes) -> bytes:
    body = struct.pack("<IIIII", if_id, 0, 0, len(payload), len(payload)) + payload + b"\0" * (-len(payload) % 4)
    total = 12 + len(body)
    return struct.pack("<II", 6, total) + body + struct.pack("<I", total)


def test_truncated_anywhere_keeps_every_whole_packet(tmp_path) -> None:
    path, _ = _clean_capture(tmp_path)
    data = path.read_bytes()
    full = list(read_packets(path))
    ends = [off + total for off, total in _blocks(data)]
    cut_file = tmp_path / "cut.pcapng"
    for cut in range(4, len(data), 7):
        cut_file.write_bytes(data[:cut])
        stats = ReadStats()
        got = list(read_packets(cut_file, stats))
        whole_blocks = sum(1 for e in ends if e <= cut)
        # Every packet whose block is whole is read; a block cut short is one counted skip.
        assert got == full[: len(got)], cut
        assert stats.skipped == (0 if cut in ends else 1), cut
        assert len(got) == len(full) - sum(1 for e in ends[2:] if e > cut) or whole_blocks < 2, cut


def test_a_packet_on_an_undescribed_interface_is_skipped_and_counted(tmp_path, capsys) -> None:
    path, clean_events = _clean_capture(tmp_path)
    data = path.read_bytes()
    off, total = _blocks(data)[5]
    damaged = tmp_path / "bad-if.pcapng"
    damaged.write_bytes(data[: off + total] + _epb(7, b"\x00" * 60) + data[off + total :])
    events: list[dict] = []
    counts = decode_capture(str(damaged), events.append)
    assert counts["skipped_blocks"] == 1
    assert comparable(events) == comparable(clean_events)
    assert main(["decode", str(damaged), "--quiet"]) == 0
    assert "1 unreadable blocks skipped" in capsys.readouterr().err


def test_a_short_interface_block_is_skipped_and_its_packets_with_it(tmp_path) -> None:
    path, _ = _clean_capture(tmp_path)
    data = path.read_bytes()
    (shb_off, shb_len), (idb_off, idb_len) = _blocks(data)[:2]
    short_idb = struct.pack("<II", 1, 16) + b"\x01\x00\x00\x00" + struct.pack("<I", 16)  # 4 bytes of body: no snaplen
    damaged = tmp_path / "bad-idb.pcapng"
    damaged.write_bytes(data[:idb_off] + short_idb + data[idb_off + idb_len :])
    stats = ReadStats()
    assert list(read_packets(damaged, stats)) == []
    assert stats.skipped == len(_blocks(data)) - 1


def test_damage_part_way_decodes_what_came_before_and_says_so(tmp_path, capsys) -> None:
    path, clean_events = _clean_capture(tmp_path)
    data = path.read_bytes()
    damaged = tmp_path / "damaged.pcapng"
    damaged.write_bytes(data + struct.pack("<II", 6, 0xFFFFFF00) + b"\0" * 64)  # a block of impossible length
    assert main(["decode", str(damaged)]) == 1
    out = capsys.readouterr()
    assert comparable([json.loads(line) for line in out.out.splitlines()]) == comparable(clean_events)
    assert "impossible length" in out.err
    assert "decoded what came before" in out.err
    assert "Traceback" not in out.err
    # The same damage with nothing readable before it: not a capture, status 2.
    shb = data[: _blocks(data)[0][1]]
    damaged.write_bytes(shb + struct.pack("<II", 6, 4) + b"\0" * 16)
    assert main(["decode", str(damaged)]) == 2


def test_pcap_record_of_impossible_length_and_short_header(tmp_path, capsys) -> None:
    case = next(c for c in load_cases() if c.name == "ollama_chat_ndjson")
    path = tmp_path / "cap.pcap"
    scapy_all.wrpcap(str(path), segments_for(case))
    clean: list[dict] = []
    decode_capture(str(path), clean.append)
    data = path.read_bytes()
    path.write_bytes(data + struct.pack("<IIII", 0, 0, 0xFFFFFFF0, 0xFFFFFFF0) + b"\0" * 32)
    assert main(["decode", str(path)]) == 1
    out = capsys.readouterr()
    assert comparable([json.loads(line) for line in out.out.splitlines()]) == comparable(clean)
    assert "claims" in out.err
    path.write_bytes(data[:10])
    assert main(["decode", str(path)]) == 2
    assert "pcap file header cut short" in capsys.readouterr().err


def test_a_spec_file_of_another_shape_is_a_clean_error(tmp_path, capsys) -> None:
    path, _ = _clean_capture(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text('{"not": "a spec"}')
    assert main(["decode", str(path), "--spec", str(spec)]) == 2
    assert "not an AI endpoint spec" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(12))
def test_random_damage_never_raises_anything_else(tmp_path, seed: int) -> None:
    """Bytes flipped, blocks cut, lengths changed: read_packets yields or raises CaptureFormatError, no other error."""
    path, _ = _clean_capture(tmp_path)
    data = path.read_bytes()
    rng = random.Random(seed)
    damaged = tmp_path / "fuzz.pcapng"
    for _ in range(60):
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256) if rng.random() < 0.7 else (b[i] ^ 0x80)
        if rng.random() < 0.3:
            del b[rng.randrange(len(b)) :]
        damaged.write_bytes(bytes(b))
        events: list[dict] = []
        try:
            decode_capture(str(damaged), events.append)
        except CaptureFormatError:
            pass
