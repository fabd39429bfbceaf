"""Server-Sent Events, parsed as the WHATWG HTML standard's event-stream algorithm says.

Lines end in CRLF, LF or CR (a CR at the end of one chunk and an LF at the start
of the next are one line ending); a leading UTF-8 BOM is dropped; ``:`` starts a
comment; one space after the colon is removed; ``data`` lines join with LF; an
empty line dispatches; an event with no data is not dispatched; ``id`` with a
NUL is ignored; ``retry`` must be all ASCII digits; an unterminated event at the
end of the stream is discarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class SSEEvent:
    event: str
    data: str
    id: str
    retry: int | None = None


class SSEParser:
    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False
        self._bom_checked = False
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else bytes(chunk)
        if self._skip_lf and buf:
            if buf[:1] == b"\n":
                buf = buf[1:]
            self._skip_lf = False
        if not self._bom_checked:
            if len(buf) < 3 and _BOM.startswith(buf):
                self._buf = buf
                return []
            if buf.startswith(_BOM):
                buf = buf[3:]
            self._bom_checked = True
        out: list[SSEEvent] = []
        pos = 0
        for m in _EOL.finditer(buf):
            self._line(buf[pos : m.start()].decode("utf-8", "replace"), out)
            pos = m.end()
            # A CR ending the chunk may be the first half of a CRLF still to come.
            if pos == len(buf) and m.group() == b"\r":
                self._skip_lf = True
        self._buf = buf[pos:]
        return out

    def _line(self, line: str, out: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                out.append(SSEEvent(self._event or "message", "\n".join(self._data), self._last_id, self._retry))
            self._data = []
            self._event = ""
            return
        if line[0] == ":":
            return
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
