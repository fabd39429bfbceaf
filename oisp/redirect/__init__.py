"""Which flows are taken and how: AI endpoint addresses, the reflect rewrite, the flow table.

The proxy needs three things from here (see redirector.py for the wiring):
`FlowTable.lookup(peer_addr, peer_port, proxy_port)` for an accepted socket,
`OwnPorts` with `connect_upstream` / `open_upstream` for its upstream
connections (oisp/own_ports.py, re-exported here; it lives outside this package
because the sensor's side uses it too), and a started `Redirector` (or `Reflector`).
"""

from oisp.divert.process_filter import ProcessFilter
from oisp.redirect.flows import FlowEntry, FlowTable
from oisp.own_ports import OwnPorts, connect_upstream, open_upstream, upstream_socket
from oisp.redirect.processes import ProcessResolver
from oisp.redirect.redirector import Redirector
from oisp.redirect.reflector import DEFAULT_PORTS, Reflector
from oisp.redirect.targets import DnsSniffer, TargetSet, resolve_hosts

__all__ = ["DEFAULT_PORTS", "DnsSniffer", "FlowEntry", "FlowTable", "OwnPorts", "ProcessFilter", "ProcessResolver",
           "Redirector", "Reflector", "TargetSet", "connect_upstream", "open_upstream", "resolve_hosts",
           "upstream_socket"]
