"""A flow source for tests that run the proxy without a redirector: every accepted
connection goes where `route(peer_addr, peer_port)` says (None: no such flow). Nothing
reflects here, so the upstream ports need registering nowhere; `opened` keeps what was
asked, for tests that check it."""

from __future__ import annotations

from oisp.proxy.flow_source import FlowSource


class FixedFlows(FlowSource):
    def __init__(self, route):
        self.route = route
        self.opened: list[tuple[str, int, int]] = []

    async def open(self, peer_addr, peer_port, proxy_port, upstream):
        self.opened.append((peer_addr, peer_port, proxy_port))
        return self.route(peer_addr, peer_port)

    async def lookup(self, peer_addr, peer_port, proxy_port, name_owner=False):
        return self.route(peer_addr, peer_port)

    def release(self, target):
        pass

    def unregister(self, port, family):
        pass
