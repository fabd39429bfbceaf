"""Streams of JSON values that are not SSE: NDJSON (Ollama) and one JSON array
delivered element by element (Gemini's streamGenerateContent without ``alt=sse``).

Both splitters are incremental and cut-invariant: they hand out each complete
value's bytes as soon as its last byte arrives, whatever the chunking. Both
scan only the bytes fed since the last call, and drop a value larger than
MAX_VALUE_BYTES (reported once to ``on_error``) rather than hold it.
"""

from __future__ import annotations

import re
from typing import Callable

_INTERESTING = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')
MAX_VALUE_BYTES = 8 * 1024 * 1024  # one NDJSON line or array element


def _ignore(message: str) -> None:
    pass


class NDJSONSplitter:
    def __init__(self, on_error: Callable[[str], None] = _ignore) -> None:
        self._on_error = on_error
        self._buf = bytearray()  # the unfinished line: it holds no newline
        self._overlong = False  # the unfinished line passed MAX_VALUE_BYTES: skipped up to its newline

    def feed(self, chunk: bytes) -> list[bytes]:
        *lines, rest = bytes(chunk).split(b"\n")
        out: list[bytes] = []
        for piece in lines:
            if self._overlong:
                self._overlong = False
                continue
            line = (bytes(self._buf) + piece if self._buf else piece).strip()
            self._buf.clear()
            if len(line) > MAX_VALUE_BYTES:
                self._on_error(f"NDJSON line longer than {MAX_VALUE_BYTES} bytes")
            elif line:
                out.append(line)
        if rest and not self._overlong:
            if len(self._buf) + len(rest) > MAX_VALUE_BYTES:
                self._on_error(f"NDJSON line longer than {MAX_VALUE_BYTES} bytes")
                self._overlong = True
                self._buf.clear()
            else:
                self._buf += rest
        return out

    def close(self) -> list[bytes]:
        rest = bytes(self._buf).strip()
        self._buf.clear()
        return [rest] if rest else []


class JSONArraySplitter:
    """Yields the raw bytes of each top-level element of ``[ {...}, {...} ]``."""

    def __init__(self, on_error: Callable[[str], None] = _ignore) -> None:
        self._on_error = on_error
        self._buf = bytearray()
        self._scan = 0  # where scanning resumes in _buf
        self._depth = 0  # 0 outside the array, 1 inside it, >1 inside an element
        self._start = -1  # where the current element began
        self._in_string = False

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        out: list[bytes] = []
        buf, i = self._buf, self._scan
        while True:
            if self._in_string:
                m = _IN_STRING.search(buf, i)
                if m is None:
                    i = len(buf)
                    break
                if m.group() == b"\\":
                    if m.end() >= len(buf):
                        i = m.start()  # the escaped byte has not arrived yet
                        break
                    i = m.end() + 1
                    continue
                self._in_string = False
                i = m.end()
                continue
            m = _INTERESTING.search(buf, i)
            if m is None:
                i = len(buf)
                break
            c, i = m.group(), m.end()
            if c == b'"':
                self._in_string = True
            elif c in b"{[":
                if self._depth == 1:
                    self._start = m.start()
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 1 and self._start >= 0:
                    out.append(bytes(buf[self._start : i]))
                    self._start = -1
        if self._start >= 0 and len(buf) - self._start > MAX_VALUE_BYTES:
            # Dropped: scanning goes on (depth and strings still count) but nothing of it is kept or handed out.
            self._on_error(f"JSON array element larger than {MAX_VALUE_BYTES} bytes")
            self._start = -1
        # Keep only the unfinished element so memory stays bounded by one element.
        keep_from = self._start if self._start >= 0 else i
        del buf[:keep_from]
        if self._start >= 0:
            self._start = 0
        self._scan = i - keep_from
        return out
