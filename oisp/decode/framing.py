"""Streams of JSON values that are not SSE: NDJSON (Ollama) and one JSON array
delivered element by element (Gemini's streamGenerateContent without ``alt=sse``).

Both splitters are incremental and cut-invariant: they hand out each complete
value's bytes as soon as its last byte arrives, whatever the chunking.
"""

from __future__ import annotations

import re

_INTERESTING = re.compile(rb'[{}\[\]"]')
_IN_STRING = re.compile(rb'["\\]')


class NDJSONSplitter:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        return [ln.strip() for ln in lines if ln.strip()]

    def close(self) -> list[bytes]:
        rest, self._buf = self._buf.strip(), b""
        return [rest] if rest else []


class JSONArraySplitter:
    """Yields the raw bytes of each top-level element of ``[ {...}, {...} ]``."""

    def __init__(self) -> None:
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
        # Keep only the unfinished element so memory stays bounded by one element.
        keep_from = self._start if self._start >= 0 else i
        del buf[:keep_from]
        if self._start >= 0:
            self._start = 0
        self._scan = i - keep_from
        return out
