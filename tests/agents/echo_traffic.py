"""Real TCP and UDP traffic for capture tests, run inside a test namespace.

    echo_traffic.py server --host HOST --tcp-port P --udp-port P
        echo TCP (one thread per connection) and UDP until killed; prints "ready"
    echo_traffic.py client --host HOST --tcp-port P --udp-port P --messages N --datagrams N [--wait]
        with --wait, print {"pid": …} and wait for a line on stdin first; then send
        N TCP messages and N UDP datagrams, read every echo, and print what was sent
        and received as JSON
"""

import argparse
import json
import os
import socket
import sys
import threading


def server(host, tcp_port, udp_port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, tcp_port))
    tcp.listen()
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((host, udp_port))

    def echo_tcp(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while True:
            conn, _ = tcp.accept()
            threading.Thread(target=echo_tcp, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("ready", flush=True)
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(data, peer)


def client(host, tcp_port, udp_port, messages, datagrams, wait):
    if wait:
        print(json.dumps({"pid": os.getpid()}), flush=True)
        sys.stdin.readline()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.create_connection((host, tcp_port), timeout=10)
    tcp_sent = tcp_received = 0
    for i in range(messages):
        message = b"message %d " % i * (1 + i % 5)
        tcp.sendall(message)
        tcp_sent += len(message)
        while tcp_received < tcp_sent:
            tcp_received += len(tcp.recv(65536))
    tcp_port_local = tcp.getsockname()[1]
    tcp.close()
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.settimeout(5)
    udp.connect((host, udp_port))
    udp_received = 0
    for i in range(datagrams):
        udp.send(b"datagram %d" % i)
        udp.recv(65536)
        udp_received += 1
    print(json.dumps({"pid": os.getpid(), "tcp_port": tcp_port_local, "udp_port": udp.getsockname()[1],
                      "tcp_sent": tcp_sent, "tcp_received": tcp_received, "udp_sent": datagrams,
                      "udp_received": udp_received}), flush=True)


def parse(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="TCP and UDP echo traffic for the capture tests.")
    roles = parser.add_subparsers(dest="role", required=True)
    for name, text in (("server", "echo TCP and UDP until killed"), ("client", "send, read every echo, report")):
        role = roles.add_parser(name, help=text)
        role.add_argument("--host", required=True)
        role.add_argument("--tcp-port", type=int, required=True)
        role.add_argument("--udp-port", type=int, required=True)
        if name == "client":
            role.add_argument("--messages", type=int, required=True, help="TCP messages to send")
            role.add_argument("--datagrams", type=int, required=True, help="UDP datagrams to send")
            role.add_argument("--wait", action="store_true", help='print {"pid": …}, then wait for a line on stdin')
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    options = parse()
    (server if options.pop("role") == "server" else client)(**options)
