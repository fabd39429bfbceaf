"""The WinDivert filter language, checked by the backend's own compiler."""

from __future__ import annotations

from oisp.divert.backend import get_backend
from oisp.divert.constants import Layer
from oisp.divert.errors import InvalidFilterError


def compile_filter(filter: str, layer: int = Layer.NETWORK) -> tuple[bool, int, str]:
    """(ok, error position, error message) from the backend's filter compiler."""
    return get_backend().compile_filter(filter, layer)


def check_filter(filter: str, layer: int = Layer.NETWORK) -> str:
    """Return the filter unchanged, or raise InvalidFilterError naming the position."""
    ok, position, reason = compile_filter(filter, layer)
    if not ok:
        raise InvalidFilterError(filter, position, reason)
    return filter


def format_filter(filter: str, layer: int = Layer.NETWORK) -> str:
    """The backend's normalised rendering of a filter."""
    check_filter(filter, layer)
    return get_backend().format_filter(filter, layer)


def eval_filter(filter: str, packet: bytes, address) -> bool:
    """Would `filter` match this packet with this WINDIVERT_ADDRESS (an ADDRESS_DTYPE record or array)?"""
    check_filter(filter)
    return get_backend().eval_filter(filter, packet, len(packet), address)
