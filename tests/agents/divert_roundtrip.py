"""Run inside a test namespace: divert N UDP datagrams on loopback, receive them
in batches, re-inject every batch unchanged, and report as JSON what was seen.

usage: divert_roundtrip.py --family 4|6 --count N --max-packets N
"""

import argparse
import json
import socket
import struct
import sys
import threading

from oisp.divert import Handle, new_addresses

parser = argparse.ArgumentParser(description="Divert UDP datagrams on loopback and re-inject them in batches.")
parser.add_argument("--family", type=int, choices=[4, 6], required=True, help="IP version")
parser.add_argument("--count", type=int, required=True, help="datagrams to send")
parser.add_argument("--max-packets", type=int, required=True, help="the most packets one receive may take")
options = parser.parse_args()
family, count, max_packets = options.family, options.count, options.max_packets
host = "127.0.0.1" if family == 4 else "::1"
af = socket.AF_INET if family == 4 else socket.AF_INET6
port = 40000

handle = Handle(f"udp.DstPort == {port}")
rx = socket.socket(af, socket.SOCK_DGRAM)
rx.bind((host, port))
rx.settimeout(5)
delivered = []


def receive():
    try:
        while len(delivered) < count:
            delivered.append(rx.recv(65535).hex())
    except socket.timeout:
        pass


def payload(i):
    return (b"%05d" % i) * (1 + i % 7) + b"!" * (i % 2)  # odd and even lengths


reader = threading.Thread(target=receive)
reader.start()
tx = socket.socket(af, socket.SOCK_DGRAM)
for i in range(count):
    tx.sendto(payload(i), (host, port))


def packet_length(buf, offset):
    if buf[offset] >> 4 == 4:
        return struct.unpack_from("!H", buf, offset + 2)[0]
    return 40 + struct.unpack_from("!H", buf, offset + 4)[0]


buf, addresses = bytearray(65535 * 4), new_addresses(255)
packets, bits, batches = [], [], []
while len(packets) < count:
    nbytes, n = handle.recv_batch(buf, addresses, max_packets=max_packets, timeout=5)
    offset = 0
    for _ in range(n):
        length = packet_length(buf, offset)
        packets.append(bytes(buf[offset:offset + length]).hex())
        offset += length
    batches.append([nbytes, n, offset])
    bits.extend(int(b) for b in addresses["bits"][:n])
    handle.send_batch(buf, nbytes, addresses, n)
reader.join()
handle.close()
json.dump({"packets": packets, "bits": bits, "batches": batches, "delivered": delivered,
           "sent": [payload(i).hex() for i in range(count)]}, sys.stdout)
