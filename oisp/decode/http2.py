"""HTTP/2 observed passively: hyperframe splits frames, one HPACK decoder per direction.

h2's connection object enforces the rules for an endpoint taking part; an
observer only needs frames and header blocks, so we use its two building
blocks directly. Every header block — HEADERS, CONTINUATION and PUSH_PROMISE —
is decoded, even ones we ignore, because HPACK state depends on all of them.
"""

from __future__ import annotations

import hpack
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
)

from oisp.decode.context import Direction
from oisp.decode.messages import Body, End, HttpMessage, ProtocolError, RequestHead, ResponseHead

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = 9
# A header block (HEADERS or PUSH_PROMISE and its CONTINUATIONs) larger than this is refused, as an
# HTTP/1.1 head is past MAX_HEAD_BYTES. Skipping it is not an option: HPACK state depends on every block.
MAX_HEADER_BLOCK_BYTES = 256 * 1024


def _extend(block: bytearray, data: bytes) -> None:
    if len(block) + len(data) > MAX_HEADER_BLOCK_BYTES:
        raise ProtocolError(f"HTTP/2: header block larger than {MAX_HEADER_BLOCK_BYTES} bytes")
    block += data


class Http2Decoder:
    protocol = "HTTP/2"

    def __init__(self) -> None:
        self._buf = {Direction.REQUEST: bytearray(), Direction.RESPONSE: bytearray()}
        self._hpack = {Direction.REQUEST: hpack.Decoder(), Direction.RESPONSE: hpack.Decoder()}
        self._preface_seen = False
        # A header block split over CONTINUATION frames: (stream, flags of the first frame, bytes, is push).
        self._partial: dict[Direction, tuple[int, set[str], bytearray, bool] | None] = {
            Direction.REQUEST: None, Direction.RESPONSE: None}
        self._heads_seen: dict[Direction, set[int]] = {Direction.REQUEST: set(), Direction.RESPONSE: set()}

    def feed(self, direction: Direction, data: bytes, ts: float) -> list[HttpMessage]:
        buf = self._buf[direction]
        buf += data
        out: list[HttpMessage] = []
        if direction is Direction.REQUEST and not self._preface_seen:
            if len(buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(buf)):
                    raise ProtocolError("HTTP/2: bad connection preface")
                return out
            if not buf.startswith(PREFACE):
                raise ProtocolError("HTTP/2: bad connection preface")
            del buf[: len(PREFACE)]
            self._preface_seen = True
        try:
            while len(buf) >= _FRAME_HEADER:
                frame, length = Frame.parse_frame_header(memoryview(buf)[:_FRAME_HEADER])
                if len(buf) < _FRAME_HEADER + length:
                    break
                frame.parse_body(memoryview(bytes(buf[_FRAME_HEADER : _FRAME_HEADER + length])))
                del buf[: _FRAME_HEADER + length]
                self._frame(direction, frame, ts, out)
        except (HyperframeError, hpack.HPACKError, ValueError) as e:
            raise ProtocolError(f"HTTP/2: {e}") from e
        return out

    def close(self, ts: float) -> list[HttpMessage]:
        return []

    def _frame(self, direction: Direction, frame: Frame, ts: float, out: list[HttpMessage]) -> None:
        partial = self._partial[direction]
        if partial is not None and not isinstance(frame, ContinuationFrame):
            raise ProtocolError("HTTP/2: header block interrupted")
        if isinstance(frame, (HeadersFrame, PushPromiseFrame)):
            block = bytearray()
            self._partial[direction] = (frame.stream_id, set(frame.flags), block, isinstance(frame, PushPromiseFrame))
            _extend(block, frame.data)
            if "END_HEADERS" in frame.flags:
                self._header_block(direction, ts, out)
        elif isinstance(frame, ContinuationFrame):
            if partial is None or partial[0] != frame.stream_id:
                raise ProtocolError("HTTP/2: CONTINUATION without HEADERS")
            _extend(partial[2], frame.data)
            if "END_HEADERS" in frame.flags:
                self._header_block(direction, ts, out)
        elif isinstance(frame, DataFrame):
            if frame.data:
                out.append(Body(frame.stream_id, direction, bytes(frame.data), ts))
            if "END_STREAM" in frame.flags:
                out.append(End(frame.stream_id, direction, ts))
        elif isinstance(frame, RstStreamFrame):
            out.append(End(frame.stream_id, Direction.REQUEST, ts, aborted=True))
            out.append(End(frame.stream_id, Direction.RESPONSE, ts, aborted=True))
        elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            size = frame.settings.get(SettingsFrame.HEADER_TABLE_SIZE)
            if size is not None:
                # The sender of SETTINGS decodes what the other side encodes.
                other = Direction.RESPONSE if direction is Direction.REQUEST else Direction.REQUEST
                self._hpack[other].max_allowed_table_size = max(size, self._hpack[other].max_allowed_table_size)

    def _header_block(self, direction: Direction, ts: float, out: list[HttpMessage]) -> None:
        partial = self._partial[direction]
        assert partial is not None
        stream, flags, block, is_push = partial
        self._partial[direction] = None
        headers = [(k.lower(), v) for k, v in self._hpack[direction].decode(bytes(block), raw=False)]
        if is_push:
            return  # pushed promises carry no request the client made
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        regular = [(k, v) for k, v in headers if not k.startswith(":")]
        seen = self._heads_seen[direction]
        if stream not in seen:
            if direction is Direction.REQUEST:
                seen.add(stream)
                out.append(RequestHead(stream, pseudo.get(":method", "GET"), pseudo.get(":path", "/"), pseudo.get(":authority"),
                                       regular, "2", ts))
            else:
                status = int(pseudo.get(":status", "0"))
                if status >= 200 or status < 100:  # 1xx are interim: the final head follows
                    seen.add(stream)
                    out.append(ResponseHead(stream, status, regular, ts))
        if "END_STREAM" in flags:
            out.append(End(stream, direction, ts))
