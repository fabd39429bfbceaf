"""WinDivert 2.2 constants, shared by both backends."""

from __future__ import annotations

from enum import IntEnum, IntFlag

ADDRESS_SIZE = 80
MAX_BATCH = 255  # WinDivertRecvEx/SendEx take at most 255 addresses
MTU_MAX = 40 + 0xFFFF  # largest IP packet a handle can return


class Layer(IntEnum):
    NETWORK = 0
    NETWORK_FORWARD = 1
    FLOW = 2  # needs Flag.SNIFF | Flag.RECV_ONLY
    SOCKET = 3  # needs Flag.RECV_ONLY
    REFLECT = 4


class Flag(IntFlag):
    NONE = 0
    SNIFF = 1
    DROP = 2
    RECV_ONLY = 4
    SEND_ONLY = 8
    NO_INSTALL = 16
    FRAGMENTS = 32


class Param(IntEnum):
    QUEUE_LENGTH = 0
    QUEUE_TIME = 1
    QUEUE_SIZE = 2
    VERSION_MAJOR = 3
    VERSION_MINOR = 4


# (minimum, default, maximum) as documented for WinDivert 2.2.
PARAM_LIMITS = {
    Param.QUEUE_LENGTH: (32, 4096, 16384),
    Param.QUEUE_TIME: (100, 2000, 16000),
    Param.QUEUE_SIZE: (65536, 4194304, 33554432),
}


class Shutdown(IntEnum):
    RECV = 1
    SEND = 2
    BOTH = 3


class Event(IntEnum):
    """WINDIVERT_EVENT_*: the meaning of `Event` depends on the layer."""

    NETWORK_PACKET = 0
    FLOW_ESTABLISHED = 1
    FLOW_DELETED = 2
    SOCKET_BIND = 3
    SOCKET_CONNECT = 4
    SOCKET_LISTEN = 5
    SOCKET_ACCEPT = 6
    SOCKET_CLOSE = 7
    REFLECT_OPEN = 8
    REFLECT_CLOSE = 9


class ChecksumFlag(IntFlag):
    """WINDIVERT_HELPER_NO_*: checksums WinDivertHelperCalcChecksums leaves alone."""

    ALL = 0
    NO_IP = 1
    NO_ICMP = 2
    NO_ICMPV6 = 4
    NO_TCP = 8
    NO_UDP = 16
