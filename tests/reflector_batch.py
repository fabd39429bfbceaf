"""A stand-in for an engine Batch that the reflector's tests hand to Reflector.process: real
packet bytes parsed by the real batch parser, with the addresses and verdicts an Engine gives
(the reflector reads and writes nothing else of a Batch), and the test addresses they use."""

from __future__ import annotations

import numpy as np

from oisp.divert.address import OUTBOUND, new_addresses
from oisp.packet import parse_batch

SERVERS = {4: ("10.200.1.2", "10.200.1.9"), 6: ("fd00:1::2", "fd00:1::9")}  # an AI address, and another


class Batch:
    """What Reflector.process reads and writes of an engine Batch."""

    def __init__(self, packets: list[bytes], outbound: list[bool]):
        self.data = np.frombuffer(b"".join(packets), dtype=np.uint8).copy()
        self.rows = parse_batch(self.data)
        self.addresses = new_addresses(len(packets))
        self.addresses["bits"] = [OUTBOUND if o else 0 for o in outbound]
        self.verdicts = np.zeros(len(packets), dtype=np.uint8)

    def outbound(self) -> np.ndarray:
        return (self.addresses["bits"] & OUTBOUND) != 0
