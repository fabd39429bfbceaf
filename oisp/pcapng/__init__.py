"""Reading captures: pcapng/pcap files → TCP byte streams for ``oisp decode``."""

from oisp.pcapng.reader import CaptureFormatError, Frame, read_packets
from oisp.pcapng.tcp import FlowClosed, FlowData, Segment, TcpFlow, TcpReassembler, parse_segment

__all__ = ["CaptureFormatError", "FlowClosed", "FlowData", "Frame", "Segment", "TcpFlow", "TcpReassembler", "parse_segment",
           "read_packets"]
