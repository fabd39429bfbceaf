"""The divert engine: handles over WinDivert (Windows) or eBPFDivert (Linux).

`Handle` loads the native backend, so it is imported on first use: importing
`oisp.divert.errors` or `oisp.divert.address` alone loads nothing native.
"""

from oisp.divert.address import ADDRESS_DTYPE, new_addresses
from oisp.divert.constants import ChecksumFlag, Event, Flag, Layer, Param, Shutdown
from oisp.divert.errors import DivertError, InvalidFilterError, PrivilegeError

__all__ = [
    "ADDRESS_DTYPE", "ChecksumFlag", "DivertError", "Event", "Flag", "Handle", "InvalidFilterError",
    "Layer", "Param", "PrivilegeError", "Shutdown", "new_addresses",
]


def __getattr__(name: str):
    if name == "Handle":
        from oisp.divert.handle import Handle

        return Handle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
