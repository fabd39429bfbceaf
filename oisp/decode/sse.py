"""Server-Sent Events, parsed as the WHATWG HTML standard's event-stream algorithm says.

Lines end in CRLF, LF or CR (a CR at the end of one chunk and an LF at the start
of the next are one line ending); a leading UTF-8 BOM is dropped; ``:`` starts a
comment; one space after the colon is removed; ``data`` lines join with LF; an
empty line dispatches; an event with no data is not dispatched; ``id`` with a
NUL is ignored; ``retry`` must be all ASCII digits; an unterminated event at the
end of the stream is discarded.

Bounds: only newly fed bytes are scanned for line ends, so a line arriving in
many pieces costs time linear in its length; a line longer than
MAX_LINE_BYTES, or an event whose data exceed MAX_EVENT_BYTES, is dropped and
reported to ``on_error`` once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
# A whole response object (OpenAI's response.completed, say) travels as one line: room for long answers.
MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_EVENT_BYTES = 8 * 1024 * 1024


def _ignore(message: str) -> None:
    pass


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str
    id: str
    retry: int | None = None


class SSEParser:
    def __init__(self, on_error: Callable[[str], None] = _ignore) -> None:
        self._on_error = on_error
        self._buf = bytearray()  # the unfinished line: it holds no line end
        self._overlong = False  # the unfinished line passed MAX_LINE_BYTES: it is being skipped
        self._skip_lf = False
        self._bom_checked = False
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        data = bytes(chunk)
        if not self._bom_checked:
            data = bytes(self._buf) + data  # at most the first two bytes of a BOM wait here
            self._buf.clear()
            if len(data) < 3 and _BOM.startswith(data):
                self._buf += data
                return []
            if data.startswith(_BOM):
                data = data[3:]
            self._bom_checked = True
        if self._skip_lf and data:
            if data[:1] == b"\n":
                data = data[1:]
            self._skip_lf = False
        out: list[SSEEvent] = []
        pos = 0
        for m in _EOL.finditer(data):
            piece = data[pos : m.start()]
            pos = m.end()
            # A CR ending the chunk may be the first half of a CRLF still to come.
            if pos == len(data) and m.group() == b"\r":
                self._skip_lf = True
            if self._overlong:
                self._overlong = False
                continue
            line = bytes(self._buf) + piece if self._buf else piece
            self._buf.clear()
            if len(line) > MAX_LINE_BYTES:
                self._on_error(f"SSE line longer than {MAX_LINE_BYTES} bytes")
                continue
            self._line(line.decode("utf-8", "replace"), out)
        rest = data[pos:]
        if rest and not self._overlong:
            if len(self._buf) + len(rest) > MAX_LINE_BYTES:
                self._on_error(f"SSE line longer than {MAX_LINE_BYTES} bytes")
                self._overlong = True
                self._buf.clear()
            else:
                self._buf += rest
        return out

    def _line(self, line: str, out: list[SSEEvent]) -> None:
        if not line:
            if self._data and self._data_size <= MAX_EVENT_BYTES:
                out.append(SSEEvent(self._event or "message", "\n".join(self._data), self._last_id, self._retry))
            self._data = []
            self._data_size = 0
            self._event = ""
            return
        if line[0] == ":":
            return
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            if self._data_size > MAX_EVENT_BYTES:
                return  # this event is being dropped
            self._data_size += len(value) + 1
            if self._data_size > MAX_EVENT_BYTES:
                self._on_error(f"SSE event larger than {MAX_EVENT_BYTES} bytes")
                self._data = []
                return
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
