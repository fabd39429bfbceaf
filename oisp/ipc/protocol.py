"""The redirector↔sensor protocol, sans-IO: messages, their schema, framing.

The redirector runs elevated; the sensor runs as a user and asks it, over one
local connection, where an accepted connection was going, which of its own
upstream ports to leave alone, the counters and the notes for its status line.
This module turns messages into bytes and bytes (in pieces of any size) into
messages; sockets and pipes are the transports' business (docs/ipc.md has the
wire format for anyone writing another peer).

Frame: a 4-byte big-endian length N (1 ≤ N ≤ MAX_FRAME), then N bytes of one
UTF-8 JSON object whose "type" names the message. Why JSON, checked by msgspec,
rather than a struct layout:
- the messages carry strings (process names, notes, errors) and a variable set
  of counters; a struct layout would need a hand-written TLV for those, which is
  exactly the kind of parser the elevated side should not grow;
- msgspec decodes and checks the schema in one pass in C (types, ranges,
  lengths, unknown fields refused, the type tag), so a frame is either a valid
  message or an error, never a half-checked dict; a lookup decodes in about a
  microsecond, far below the socket round trip;
- it reads in `socat` and in a test, and another language can speak it.

Bounds: a frame is refused as soon as its length prefix says it is larger than
MAX_FRAME, before its body is read, so a decoder holds at most MAX_FRAME + 3
bytes; every string and collection in the schema has its own limit. A decoder
that has refused a frame stays failed: the connection must be closed, since
after a bad length nothing that follows can be trusted to start a frame.

Versioning: the client's `hello` lists the versions it speaks; the server picks
the highest it also speaks and names it in `welcome`, or answers
`error(unsupported_version)` and closes. A change to any message's fields is a
new version.
"""

from __future__ import annotations

import socket
import struct
from typing import Annotated, Literal, Union

import msgspec

PROTO = "oisp-ipc"
VERSION = 2
# Version 1 had no listeners.set: a redirector that must not reflect before a sensor has
# shown it holds the listening ports cannot serve a client of version 1 usefully.
SUPPORTED_VERSIONS = (2,)
MAX_LISTENERS = 64  # the HTTPS proxy port and one per plaintext model-server port
MAX_FRAME = 65536  # bytes of one message's JSON; the largest (counters) stays well under
HEADER = struct.Struct(">I")

# Field types with their bounds, shared by the messages.
RequestId = Annotated[int, msgspec.Meta(ge=1, le=2**32 - 1)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Pid = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Token = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Family = Literal[4, 6]
IpText = Annotated[str, msgspec.Meta(min_length=2, max_length=45)]  # the longest IPv6 literal is 45
Seconds = Annotated[float, msgspec.Meta(ge=0, le=2**40)]  # Unix time, seconds
ShortText = Annotated[str, msgspec.Meta(max_length=64)]
Reason = Annotated[str, msgspec.Meta(max_length=256)]
MAX_PROCESS_NAME, MAX_NOTE = 255, 512
ProcessName = Annotated[str, msgspec.Meta(max_length=MAX_PROCESS_NAME)]
NoteText = Annotated[str, msgspec.Meta(max_length=MAX_NOTE)]
CounterName = Annotated[str, msgspec.Meta(min_length=1, max_length=96, pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")]
CounterValue = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
MAX_COUNTERS = 512
ErrorCode = Literal[
    "malformed",            # not JSON, not an object, or no known "type"
    "too_large",            # the length prefix exceeds MAX_FRAME (or is 0)
    "unknown_type",         # a type this side does not accept
    "bad_field",            # a known type whose fields break the schema
    "unsupported_version",  # hello offered no version the server speaks
    "not_ready",            # anything but hello before the welcome
    "busy",                 # the server has as many clients as it takes
    "refused",              # listeners.set named a port the sensor does not hold (the connection stays)
    "internal",             # the server failed answering this request (the connection stays)
]
NoteLevel = Literal["info", "degraded", "failure"]
NOTE_LEVELS = frozenset(NoteLevel.__args__)


class Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, frozen=True):
    """Base of every message; `type` on the wire is the class's tag."""


# -- client (sensor) → server (redirector) ---------------------------------------------------
class Hello(Message, tag="hello"):
    versions: Annotated[tuple[Annotated[int, msgspec.Meta(ge=1, le=255)], ...], msgspec.Meta(min_length=1, max_length=8)]
    proto: Literal["oisp-ipc"] = PROTO
    role: Literal["sensor"] = "sensor"
    software: ShortText = ""  # e.g. "oisp 0.1.0", for the server's log


class PortRef(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A local TCP port in one address family."""
    port: Port
    family: Family


class Listen(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Connections to `server_port` are reflected to the sensor's `listener_port`."""
    server_port: Port
    listener_port: Port


class FlowLookup(Message, tag="flow.lookup"):
    """Where the connection the proxy accepted from (peer_addr, peer_port) on its local
    proxy_port was going. With `hold`, the flow is kept while the sensor holds the token
    (a pooled keep-alive connection may idle far longer than a packet timeout); with
    `name_owner`, a flow whose process was not named yet is named now (slower: /proc).
    With `upstream` (version 2), the port of the upstream socket the sensor has bound for
    this connection is registered as port.register would, before the answer, when the
    flow is found: one round trip per new connection instead of two. It stays registered
    until port.unregister (a miss registers nothing)."""
    id: RequestId
    peer_addr: IpText
    peer_port: Port
    proxy_port: Port
    hold: bool = True
    name_owner: bool = False
    upstream: PortRef | None = None

    def __post_init__(self):
        _check_ip(self.peer_addr)


class FlowRelease(Message, tag="flow.release"):
    """The proxy closed its connection on a held flow (no answer)."""
    token: Annotated[int, msgspec.Meta(ge=1, le=2**32 - 1)]


class PortRegister(Message, tag="port.register"):
    """An upstream socket bound to `port` is about to connect: leave its packets alone.
    Answered with `ok` once in force, so the SYN that follows is never reflected."""
    id: RequestId
    port: Port
    family: Family


class PortUnregister(Message, tag="port.unregister"):
    """That upstream socket is closed (no answer)."""
    port: Port
    family: Family


class ListenersSet(Message, tag="listeners.set"):
    """Where this sensor listens (version 2): the redirector reflects new connections to
    these ports only once it has checked that the sensor's own process holds each
    listening socket; answered `ok`, or `error` `refused` (nothing changes). An empty list
    stops the reflecting of new connections (a sensor that is stopping)."""
    id: RequestId
    listeners: Annotated[tuple[Listen, ...], msgspec.Meta(max_length=MAX_LISTENERS)]


class CountersGet(Message, tag="counters.get"):
    id: RequestId


class Goodbye(Message, tag="goodbye"):
    """Either side: it is closing on purpose (the other need not report an error)."""
    reason: Reason = ""


# -- server (redirector) → client (sensor) ---------------------------------------------------
class Welcome(Message, tag="welcome"):
    version: Annotated[int, msgspec.Meta(ge=1, le=255)]
    proto: Literal["oisp-ipc"] = PROTO
    software: ShortText = ""
    max_frame: Annotated[int, msgspec.Meta(ge=1024, le=MAX_FRAME)] = MAX_FRAME
    # Version 2: where the redirector reflects each server port; the sensor listens there.
    listen: Annotated[tuple[Listen, ...], msgspec.Meta(max_length=MAX_LISTENERS)] = ()


class FlowInfo(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One reflected flow, as the sensor needs it for its events."""
    client_addr: IpText
    client_port: Port
    server_addr: IpText  # the original destination
    server_port: Port
    created: Seconds  # when the flow's SYN was seen (Unix time)
    token: Token = 0  # for flow.release when held; 0 when not held
    pid: Pid | None = None
    process_name: ProcessName | None = None
    process_created: Seconds | None = None  # with pid: tells a reused pid apart

    def __post_init__(self):
        _check_ip(self.client_addr)
        _check_ip(self.server_addr)


class FlowAnswer(Message, tag="flow.answer"):
    id: RequestId
    flow: FlowInfo | None = None  # None: no such flow (not reflected, or already gone)


class Ok(Message, tag="ok"):
    id: RequestId


class Counters(Message, tag="counters"):
    """Flat counters: dotted names ("reflector.engine.dropped") to non-negative integers."""
    id: RequestId
    values: Annotated[dict[CounterName, CounterValue], msgspec.Meta(max_length=MAX_COUNTERS)]


class Note(Message, tag="note"):
    """A line for the status line and the UI: what runs degraded and why (pushed, also
    all current ones right after the welcome)."""
    text: NoteText
    level: NoteLevel = "info"
    ts: Seconds = 0.0


class QuicRefused(Message, tag="quic.refused"):
    """Version 2, pushed: a QUIC connection attempt to an AI address was refused (the
    client falls back to TCP, where it is recorded); the sensor records it as an event."""
    client_addr: IpText
    client_port: Port
    server_addr: IpText
    server_port: Port
    ts: Seconds

    def __post_init__(self):
        _check_ip(self.client_addr)
        _check_ip(self.server_addr)


class Error(Message, tag="error"):
    """`id` names the request it answers; None: about the connection, which then closes."""
    code: ErrorCode
    message: Reason = ""
    id: RequestId | None = None


ClientMessage = Union[Hello, FlowLookup, FlowRelease, PortRegister, PortUnregister, ListenersSet, CountersGet, Goodbye]
ServerMessage = Union[Welcome, FlowAnswer, Ok, Counters, Note, QuicRefused, Error, Goodbye]
CLIENT_TYPES = frozenset(t.__struct_config__.tag for t in ClientMessage.__args__)
SERVER_TYPES = frozenset(t.__struct_config__.tag for t in ServerMessage.__args__)


class ProtocolError(Exception):
    """A frame this side refuses; `code` is one of ErrorCode, for the Error to send back."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message[:256]


def _check_ip(text: str) -> None:
    # inet_pton rather than ipaddress: the same answer for the literals getpeername gives
    # (no scope suffix), at a tenth of the cost on every lookup.
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        raise ValueError(f"not an IP address: {text[:45]!r}") from None


_encoder = msgspec.json.Encoder()


def encode(message: Message) -> bytes:
    """One frame. Raises ProtocolError(too_large) rather than send what no peer accepts."""
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME:
        raise ProtocolError("too_large", f"{type(message).__name__} encodes to {len(body)} bytes")
    return HEADER.pack(len(body)) + body


class _Tag(msgspec.Struct):
    type: str  # required: an object without one is malformed, not of an unknown type


_tag_decoder = msgspec.json.Decoder(_Tag)


class Decoder:
    """Bytes in, in pieces of any size; messages out. One per connection and direction:
    `Decoder("server")` reads what clients send, `Decoder("client")` what servers send."""

    def __init__(self, side: Literal["server", "client"], *, max_frame: int = MAX_FRAME):
        accepted = ClientMessage if side == "server" else ServerMessage
        self._decoder = msgspec.json.Decoder(accepted)
        self._types = CLIENT_TYPES if side == "server" else SERVER_TYPES
        self._max = max_frame
        self._buf = bytearray()
        # (code, message) of the refusal, not the exception: an exception kept here would hold
        # its traceback, whose frames hold this decoder and the refused frame (a cycle that
        # keeps 64 KiB per dead connection until the garbage collector runs).
        self.failed: tuple[str, str] | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (never more than max_frame + 3)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        """The messages completed by `data`. Raises ProtocolError on the first bad frame,
        and again on any later call: the stream cannot be resynchronised."""
        if self.failed is not None:
            raise ProtocolError(*self.failed)
        out: list[Message] = []
        view = memoryview(data)
        # The common case first: nothing held, and whole frames in `data` (a lookup's
        # request or answer arrives in one read): decoded in place, never copied.
        while not self._buf and len(view) >= HEADER.size:
            size = HEADER.unpack_from(view)[0]
            if not 1 <= size <= self._max:
                raise self._fail("too_large", f"frame of {size} bytes (limit {self._max})")
            if len(view) < HEADER.size + size:
                break
            out.append(self._decode(view[HEADER.size:HEADER.size + size]))
            view = view[HEADER.size + size:]
        while view:
            if len(self._buf) < HEADER.size:
                take = HEADER.size - len(self._buf)
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < HEADER.size:
                    break
                size = HEADER.unpack_from(self._buf)[0]
                if not 1 <= size <= self._max:
                    raise self._fail("too_large", f"frame of {size} bytes (limit {self._max})")
            size = HEADER.unpack_from(self._buf)[0]
            take = HEADER.size + size - len(self._buf)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == HEADER.size + size:
                body = bytes(self._buf[HEADER.size:])
                self._buf.clear()
                out.append(self._decode(body))
        return out

    def _decode(self, body) -> Message:
        try:
            return self._decoder.decode(body)
        except msgspec.ValidationError as e:
            raise self._fail(*self._classify(body, e)) from None
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as e:
            raise self._fail("malformed", str(e)) from None

    def _classify(self, body, error: Exception) -> tuple[str, str]:
        try:
            tag = _tag_decoder.decode(body).type
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            return "malformed", str(error)
        if tag not in self._types:
            return "unknown_type", f"type {tag[:64]!r} is not accepted here"
        return "bad_field", f"{tag}: {error}"

    def _fail(self, code: str, message: str) -> ProtocolError:
        self.failed = (code, message)
        self._buf = bytearray()
        return ProtocolError(code, message)


def negotiate(offered) -> int | None:
    """The version both speak (the highest), or None."""
    common = set(offered) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None


def clip(text: str, limit: int) -> str:
    """Outside text (a process name, a note) cut to what the schema takes."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def flatten_counters(tree: dict, prefix: str = "") -> dict[str, int]:
    """The redirector's nested counters as the flat names Counters carries: integers
    (and booleans as 0/1) only, names lower-cased to the schema's alphabet, at most
    MAX_COUNTERS (the first ones in order)."""
    out: dict[str, int] = {}

    def walk(node: dict, path: str) -> None:
        for key, value in node.items():
            name = _counter_name(f"{path}.{key}" if path else str(key))
            if isinstance(value, dict):
                walk(value, name)
            elif isinstance(value, (int, bool)) and name and len(out) < MAX_COUNTERS and 0 <= value < 2**63:
                out[name[:96].rstrip(".")] = int(value)

    walk(tree, prefix)
    return out


def _counter_name(text: str) -> str:
    chars = [c if c.isascii() and (c.isalnum() or c in "._") else "_" for c in text.lower()]
    return ".".join(part for part in "".join(chars).split(".") if part)
