"""The far side of the redirect tests, run in the server namespace.

usage: redirect_server.py tcp --ports PORT[,PORT...]
           echo servers; each connection first gets "PEER ip port\\n" (what this server
           saw), then its bytes back; every accept is printed
       redirect_server.py dns [--answer-a A] [--answer-aaaa AAAA]
           answers A/AAAA for api.openai.com (via a CNAME; 10.77.0.1 / fd77::1 unless
           given) and example.com, a broken reply for bad.test
"""

import argparse
import ipaddress
import socket
import struct
import threading

import psutil

from oisp.redirect.dns import TYPE_A, TYPE_AAAA, TYPE_CNAME, read_name

ANSWERS = {("api.openai.com", TYPE_A): "10.77.0.1", ("api.openai.com", TYPE_AAAA): "fd77::1",
           ("example.com", TYPE_A): "10.88.0.1"}


def echo(conn, peer):
    with conn:
        conn.sendall(f"PEER {peer[0]} {peer[1]}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)


def serve_tcp(port):
    server = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    while True:
        conn, peer = server.accept()
        host = peer[0].removeprefix("::ffff:")
        print(f"conn {port} {host} {peer[1]}", flush=True)
        threading.Thread(target=echo, args=(conn, (host, peer[1])), daemon=True).start()


def dns_answer(query):
    qname, end = read_name(query, 12)
    qtype = struct.unpack_from("!H", query, end)[0]
    question = query[12:end + 4]
    if qname == "bad.test":
        return query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + question + b"\xc0"  # answer cut short
    records = b""
    count = 0
    address = ANSWERS.get((qname, qtype))
    if address:
        owner = b"\xc0\x0c"
        if qname == "api.openai.com":  # answer through a CNAME, as the real one does
            target = b"\x04edge\x07example\x03net\x00"
            records += owner + struct.pack("!HHIH", TYPE_CNAME, 1, 60, len(target)) + target
            owner, count = struct.pack("!H", 0xC000 | (12 + len(question) + 12)), 1
        packed = ipaddress.ip_address(address).packed
        records += owner + struct.pack("!HHIH", qtype, 1, 60, len(packed)) + packed
        count += 1
    return query[:2] + struct.pack("!HHHHH", 0x8180, 1, count, 0, 0) + question + records


def serve_dns():
    """One socket per address of this namespace, so each answer comes from the address
    its query went to (a socket bound to :: may answer from another one, which no
    resolver, and not oisp, takes for an answer)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6) and not address.address.startswith("fe80"):
                sock = socket.socket(address.family, socket.SOCK_DGRAM)
                sock.bind((address.address, 53))
                threading.Thread(target=answer_on, args=(sock,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


def answer_on(sock):
    while True:
        query, peer = sock.recvfrom(2048)
        sock.sendto(dns_answer(query), peer)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The far side of the redirect tests.")
    roles = parser.add_subparsers(dest="role", required=True)
    tcp = roles.add_parser("tcp", help="echo servers that first say whom they saw")
    tcp.add_argument("--ports", type=lambda text: [int(p) for p in text.split(",")], required=True,
                     help="comma-separated")
    dns = roles.add_parser("dns", help="a DNS server for api.openai.com, example.com and bad.test")
    dns.add_argument("--answer-a", default=ANSWERS[("api.openai.com", TYPE_A)], help="api.openai.com's A")
    dns.add_argument("--answer-aaaa", default=ANSWERS[("api.openai.com", TYPE_AAAA)], help="its AAAA")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse()
    if options.role == "dns":
        ANSWERS[("api.openai.com", TYPE_A)] = options.answer_a
        ANSWERS[("api.openai.com", TYPE_AAAA)] = options.answer_aaaa
        serve_dns()
    else:
        for p in options.ports:
            threading.Thread(target=serve_tcp, args=(p,), daemon=True).start()
        print("ready", flush=True)
        threading.Event().wait()
