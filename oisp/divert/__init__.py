"""The divert engine: handles over WinDivert (Windows) or eBPFDivert (Linux)."""

from oisp.divert.address import ADDRESS_DTYPE, new_addresses
from oisp.divert.constants import ChecksumFlag, Event, Flag, Layer, Param, Shutdown
from oisp.divert.errors import DivertError, InvalidFilterError, PrivilegeError
from oisp.divert.handle import Handle

__all__ = [
    "ADDRESS_DTYPE", "ChecksumFlag", "DivertError", "Event", "Flag", "Handle", "InvalidFilterError",
    "Layer", "Param", "PrivilegeError", "Shutdown", "new_addresses",
]
