"""WebSocket sessions observed passively (RFC 6455, permessage-deflate RFC 7692), sans-IO.

After an HTTP/1.1 ``Upgrade: websocket`` answered by ``101``, each side's bytes
are WebSocket frames. wsproto does the framing: one wsproto frame parser per
direction, each configured as the *receiving* end of that direction (a
server-role parser reads the client's masked frames, a client-role parser the
server's), with permessage-deflate set up from what the 101 accepted.

Bounds, so hostile input costs a count and never memory:

- a message is kept up to ``max_message`` bytes; the rest is counted, not kept,
  and the message is marked truncated;
- inflation goes through :class:`BoundedDeflate`, which inflates in steps of at
  most ``_STEP`` bytes and stops a message that inflates past ``max_inflate``
  (a deflate bomb): that direction is then no longer decoded, an error is counted;
- wsproto streams a frame's payload as it arrives, so a frame's declared length
  never makes it buffer more than one ``feed``;
- a protocol violation (bad opcode, unmasked client frame, invalid UTF-8 in a
  text message, bad deflate data …) stops decoding that direction, counted.

The bytes themselves are relayed by the caller whatever happens here.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import cast

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, ParseFailed

from oisp.decode.context import Direction
from oisp.decode.messages import Headers, header

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_INFLATE_BYTES = 64 * 1024 * 1024
_STEP = 64 * 1024  # the most one zlib call may inflate at once
_SYNC_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 §7.2.2: the sender strips it from each message


def _utf8_cut(data: bytes) -> bytes:
    """``data`` without a trailing partial UTF-8 sequence, so a truncated text message still decodes."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return data
        if b >= 0xC0:  # a lead byte: keep it only if its whole sequence is there
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


class BoundedDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate with inflation bounded per message.

    wsproto inflates a frame's payload in one ``decompress`` call, whatever it
    grows to, and a ping between two fragments of a compressed message makes it
    read the rest of that message as uncompressed. Here each call inflates at most ``_STEP`` bytes; output past
    ``keep`` bytes of a message is dropped (``truncated`` says so) and a
    message inflating past ``cap`` is refused as too big.
    """

    inflated: int  # set by message_done
    _kept: int

    def __init__(self, keep: int, cap: int) -> None:
        super().__init__()
        self.keep, self.cap = keep, cap
        self.message_done()

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        d = self._decompressor
        assert d is not None
        out = bytearray()
        try:
            while True:
                piece = d.decompress(data, _STEP)
                data = d.unconsumed_tail
                n = len(piece)
                self.inflated += n
                if self.inflated > self.cap:
                    return CloseReason.MESSAGE_TOO_BIG
                if n > self.keep - self._kept:
                    self.truncated = True
                    piece = _utf8_cut(piece[: self.keep - self._kept]) if self._kept < self.keep else b""
                    self._kept = self.keep  # nothing after the cut is kept
                else:
                    self._kept += n
                out += piece
                if not data and n < _STEP:  # input used up and zlib had no more to give
                    break
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        return bytes(out)

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(bytes(data))

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol, fin: bool) -> bytes | CloseReason | None:
        if not self._inbound_is_compressible:
            # A control frame, maybe between a message's fragments: the message stays compressed.
            # (wsproto forgets it here, and reads the next fragment as uncompressed.)
            return None
        if not fin:
            return None
        if not self._inbound_compressed:
            self._inbound_compressed = None
            return None
        data = self._inflate(_SYNC_TAIL)
        no_takeover = self.server_no_context_takeover if proto.client else self.client_no_context_takeover
        if no_takeover:
            self._decompressor = None
        self._inbound_compressed = None
        return data

    def message_done(self) -> None:
        self.truncated = False
        self.inflated = 0  # bytes of the current message inflated so far, kept or not
        self._kept = 0


def negotiated(response_headers: Headers) -> tuple[list[str], str | None]:
    """The extensions (each as the 101 accepted it, parameters included) and the subprotocol."""
    exts: list[str] = []
    for k, v in response_headers:
        if k == "sec-websocket-extensions":
            exts += [e.strip() for e in v.split(",") if e.strip()]
    return exts, header(response_headers, "sec-websocket-protocol")


@dataclass(frozen=True)
class WSMessage:
    direction: Direction
    text: bool
    data: bytes  # the payload as the application sees it (UTF-8 for text), at most max_message bytes
    size: int  # the whole message's payload size, kept or not
    truncated: bool
    ts: float


@dataclass
class SideStats:
    messages: int = 0
    text_messages: int = 0
    binary_messages: int = 0
    wire_bytes: int = 0  # frames as sent, headers and compression included
    payload_bytes: int = 0  # messages' payloads, inflated
    pings: int = 0
    pongs: int = 0
    truncated: int = 0
    audio_bytes: int = 0  # audio the AI protocol carried (decoded size), counted and never kept


@dataclass
class SessionStats:
    client: SideStats = field(default_factory=SideStats)
    server: SideStats = field(default_factory=SideStats)
    close_code: int | None = None
    close_reason: str | None = None
    closed_by: str | None = None  # "client" or "server": who sent the first close frame
    decode_errors: int = 0


class _Side:
    """One direction: a wsproto frame parser acting as that direction's receiver."""

    def __init__(self, direction: Direction, extensions: list[str], max_message: int, max_inflate: int, on_error) -> None:
        self.direction = direction
        self.deflate: BoundedDeflate | None = None
        for ext in extensions:
            name = ext.split(";", 1)[0].strip().lower()
            if name == PerMessageDeflate.name and self.deflate is None:
                self.deflate = BoundedDeflate(max_message, max_inflate)
                try:
                    self.deflate.finalize(ext)
                except (ValueError, IndexError):
                    on_error(f"WebSocket: unreadable permessage-deflate parameters {ext!r}")
                    self.deflate = None
        # The client-role parser reads what the server sent; the server-role one the client's masked frames.
        self.proto = FrameProtocol(direction is Direction.RESPONSE, [self.deflate] if self.deflate else [])
        self.max_message = max_message
        self.parts: list[bytes] = []
        self.kept = 0
        self.size = 0
        self.truncated = False
        self.text = False
        self.done = False  # closed or failed: nothing more from this side is parsed

    def feed(self, data: bytes, ts: float, stats: SideStats, session: SessionStats) -> list[WSMessage]:
        out: list[WSMessage] = []
        self.proto.receive_bytes(data)
        for frame in self.proto.received_frames():
            op = frame.opcode
            if op is Opcode.PING:
                stats.pings += 1
            elif op is Opcode.PONG:
                stats.pongs += 1
            elif op is Opcode.CLOSE:
                # wsproto types a frame's payload as every opcode's at once; a CLOSE's is (code, reason)
                code, reason = cast("tuple[int, str]", frame.payload)
                if session.close_code is None:
                    session.close_code, session.close_reason = int(code), reason
                    session.closed_by = "client" if self.direction is Direction.REQUEST else "server"
                self.done = True
            else:
                self._piece(cast("bytes | str", frame.payload), op is Opcode.TEXT)
                if frame.message_finished:
                    out.append(self._finish(ts, stats))
        return out

    def _piece(self, payload: bytes | str, text: bool) -> None:
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        if not self.size and not self.parts:
            self.text = text
        self.size += len(data)
        room = self.max_message - self.kept
        if len(data) > room:
            self.truncated = True
            data = data[:room]
            if self.text:
                data = _utf8_cut(data)
        if data:
            self.parts.append(data)
            self.kept += len(data)

    def _finish(self, ts: float, stats: SideStats) -> WSMessage:
        deflate = self.deflate
        truncated = self.truncated or bool(deflate and deflate.truncated)
        size = max(self.size, deflate.inflated if deflate else 0)
        msg = WSMessage(self.direction, self.text, b"".join(self.parts), size, truncated, ts)
        self.parts, self.kept, self.size, self.truncated = [], 0, 0, False
        if deflate is not None:
            deflate.message_done()
        stats.messages += 1
        stats.payload_bytes += msg.size
        if msg.text:
            stats.text_messages += 1
        else:
            stats.binary_messages += 1
        if truncated:
            stats.truncated += 1
        return msg


class WebSocketSession:
    """Both directions of one WebSocket: bytes in, whole messages out.

    ``feed`` never raises: a direction that breaks the protocol is counted
    once (``stats.decode_errors`` and ``on_error``) and no longer parsed.
    """

    def __init__(
        self,
        response_headers: Headers,
        on_error,
        *,
        max_message: int = MAX_MESSAGE_BYTES,
        max_inflate: int = MAX_INFLATE_BYTES,
    ) -> None:
        self.extensions, self.subprotocol = negotiated(response_headers)
        self.stats = SessionStats()
        self._on_error = on_error
        self._sides = {d: _Side(d, self.extensions, max_message, max_inflate, self._error) for d in Direction}

    def feed(self, direction: Direction, data: bytes, ts: float) -> list[WSMessage]:
        stats = self.stats.client if direction is Direction.REQUEST else self.stats.server
        stats.wire_bytes += len(data)
        side = self._sides[direction]
        if side.done or not data:
            return []
        try:
            return side.feed(data, ts, stats, self.stats)
        except ParseFailed as e:
            self._error(f"WebSocket {direction.value}: {e} (close code {int(e.code)})")
        except Exception as e:  # noqa: BLE001 - a parser bug costs this direction, counted, not the flow
            self._error(f"WebSocket {direction.value}: {type(e).__name__}: {e}")
        side.done = True
        return []

    @property
    def finished(self) -> bool:
        """Both sides sent a close frame or broke the protocol: nothing more will be parsed."""
        return all(side.done for side in self._sides.values())

    def _error(self, message: str) -> None:
        self.stats.decode_errors += 1
        self._on_error(message)
