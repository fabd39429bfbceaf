"""HTTP/1.1 on the wire, one direction at a time (RFC 9112): heads and body framing.

A :class:`WireReader` holds the bytes one peer has sent and, when asked, cuts
the next head or the next piece of body out of them. It never decides what
comes next: which message a side is sending, and how its body is framed,
depends on both directions and is decided by :mod:`oisp.decode.http1`.

The grammar is the one h11 accepted before this parser replaced it (h11 is the
tests' reference): bare LF line ends are tolerated in heads, header values may
hold any byte but NUL and whitespace, Content-Length may repeat with one value,
Transfer-Encoding must be exactly ``chunked``. One deliberate difference:
obs-fold (a header line continued on the next line) is rejected, as RFC 9112
§5.2 allows, rather than folded: a passive observer must not read a header
differently from the server it watches.
"""

from __future__ import annotations

import re

from oisp.decode.messages import ProtocolError

MAX_HEAD_BYTES = 256 * 1024  # a head, a chunk-size line or a trailer section larger than this is refused

# Heads are matched as latin-1 text (a byte per character), so that names and
# values come out as the str the messages carry with a single decode per head.
_TOKEN = r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VALUE_CHAR = r"[^\x00\t\n\x0b\x0c\r ]"  # anything but NUL and whitespace, obs-text included
_VALUE = rf"(?:{_VALUE_CHAR}+(?:[ \t]+{_VALUE_CHAR}+)*)?"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_STATUS_LINE = re.compile(r"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: [^\x00\n\x0b\x0c\r]*)?")  # the reason is optional
_FIELD = re.compile(rf"({_TOKEN}):[ \t]*({_VALUE})[ \t]*\r?\n")
# Every line of a field section is a field, then the blank line. Checked as a whole
# before _FIELD.findall pulls the pairs out, because findall alone would skip bad lines.
_FIELD_SECTION = re.compile(rf"(?:{_TOKEN}:[ \t]*{_VALUE}[ \t]*\r?\n)*\r?\n")
_HEAD_END = re.compile(rb"\n\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")  # extensions are ignored
_OWS = " \t"
_FRAMING_NAMES = frozenset({"content-length", "transfer-encoding", "connection", "upgrade", "host"})


def _error(what: str) -> ProtocolError:
    return ProtocolError(f"HTTP/1.1: {what}")


class Head:
    """A parsed request or response head, plus the header facts framing depends on."""

    __slots__ = ("method", "target", "version", "status", "headers", "host", "hosts", "content_length", "chunked", "close",
                 "upgrade", "keep_alive_named")

    def __init__(self) -> None:
        self.method = ""
        self.target = ""
        self.version = ""
        self.status = 0
        self.headers: list[tuple[str, str]] = []  # lower-case names, in order, as h11 normalised them
        self.host: str | None = None  # the first Host header's value
        self.hosts = 0
        self.content_length: int | None = None
        self.chunked = False
        self.close = False  # Connection: close
        self.upgrade = False  # an Upgrade header with a value
        self.keep_alive_named = False  # a Connection header mentions keep-alive (HTTP/1.0 persistence)


def parse_request(text: str) -> Head:
    m, head = _parse_head(text, _REQUEST_LINE, "request line")
    head.method, head.target, head.version = m.groups()
    if head.hosts > 1:
        raise _error("more than one Host header")
    if head.hosts == 0 and head.version == "1.1":
        raise _error("HTTP/1.1 request without a Host header")
    return head


def parse_response(text: str) -> Head:
    m, head = _parse_head(text, _STATUS_LINE, "status line")
    head.version = m.group(1)
    head.status = int(m.group(2))
    if head.status < 100:
        raise _error(f"status {head.status} out of range")
    return head


def _parse_head(text: str, start_line: re.Pattern, what: str) -> tuple[re.Match, Head]:
    """The start line's match and the header fields of a head through its blank line."""
    nl = text.index("\n")
    line = text[:nl]
    line = line[:-1] if line.endswith("\r") else line
    m = start_line.fullmatch(line)
    if m is None:
        raise _error(f"invalid {what} {line[:100]!r}")
    return m, _fields(text[nl + 1 :])


def _fields(section: str) -> Head:
    """Header (or trailer) lines through the blank line: validated, names lower-cased."""
    if _FIELD_SECTION.fullmatch(section) is None:
        bad = next((ln for ln in section.split("\n") if ln.rstrip("\r") and not _FIELD.fullmatch(ln + "\n")), "")
        if bad[:1] in (" ", "\t"):
            raise _error(f"obs-fold (a header continued on the next line) is not accepted: {bad[:100]!r}")
        raise _error(f"invalid header line {bad[:100]!r}")
    head = Head()
    headers = head.headers
    length_text = None
    for name, value in _FIELD.findall(section):
        name = name.lower()
        if name in _FRAMING_NAMES:
            if name == "content-length":
                # h11 keeps one Content-Length, its value trimmed: "5, 5" and two equal headers are one 5.
                if "," in value:
                    values = {v.strip(_OWS) for v in value.split(",")}
                    if len(values) > 1:
                        raise _error("conflicting Content-Length values")
                    value = values.pop()
                if not (value.isdigit() and value.isascii()) or len(value) > 20:
                    raise _error(f"invalid Content-Length {value[:40]!r}")
                if length_text is not None:
                    if value != length_text:
                        raise _error("conflicting Content-Length headers")
                    continue
                length_text, head.content_length = value, int(value)
            elif name == "transfer-encoding":
                if head.chunked:
                    raise _error("more than one Transfer-Encoding header")
                value = value.lower()
                if value != "chunked":
                    raise _error(f"unsupported Transfer-Encoding {value[:40]!r}")
                head.chunked = True
            elif name == "connection":
                lowered = value.lower()
                head.close = head.close or "close" in [t.strip(_OWS) for t in lowered.split(",")]
                head.keep_alive_named = head.keep_alive_named or "keep-alive" in lowered
            elif name == "upgrade":
                head.upgrade = head.upgrade or any(t.strip(_OWS) for t in value.split(","))
            else:  # host
                head.hosts += 1
                if head.host is None:
                    head.host = value
        headers.append((name, value))
    return head


# Body framings and chunked-decoding steps.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = "length", "chunked", "until-close"
_SIZE, _DATA, _DATA_END, _TRAILER = "size", "data", "data-end", "trailer"
END = object()  # read_body: the message is complete


class WireReader:
    """One direction's bytes, with an offset past what has been consumed.

    Searches resume where the last one stopped (``_scan``), so a head or a line
    arriving a byte at a time costs linear time, and consumed bytes are dropped
    from the front of the buffer only when new bytes arrive.
    """

    __slots__ = ("buf", "pos", "eof", "_scan", "_framing", "_remaining", "_step", "_crlf")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.eof = False
        self._scan = 0
        self._framing = _LENGTH
        self._remaining = 0  # bytes left of a Content-Length body or of the current chunk
        self._step = _SIZE
        self._crlf = b""  # what is still owed of the CRLF that ends a chunk's data

    def receive(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        if self.eof:
            raise _error("data after the end of the stream")
        if self.pos:
            # Deleting from the front of a bytearray only moves its start: no copy.
            del self.buf[: self.pos]
            self._scan = max(self._scan - self.pos, 0)
            self.pos = 0
        self.buf += data

    def discard(self) -> None:
        """Forget everything buffered: nothing on this side will be decoded again."""
        del self.buf[:]
        self.pos = self._scan = 0

    def pending(self) -> int:
        return len(self.buf) - self.pos

    def read_head(self) -> str | None:
        """The next head, start line through the blank line, as latin-1 text; None until it is complete."""
        buf, pos = self.buf, self.pos
        if pos == len(buf):
            return None
        if buf[pos] < 0x21:
            # h11's early check: a head starts with a visible character, so TLS bytes or a stray CRLF fail now.
            raise _error(f"no start line: {bytes(buf[pos : pos + 16])!r}")
        m = _HEAD_END.search(buf, max(self._scan, pos))
        if m is None:
            if len(buf) - pos > MAX_HEAD_BYTES:
                raise _error(f"head larger than {MAX_HEAD_BYTES} bytes")
            self._scan = max(len(buf) - 2, pos)  # "\n\r\n" may straddle the next feed
            return None
        end = m.end()
        if end - pos > MAX_HEAD_BYTES:
            raise _error(f"head larger than {MAX_HEAD_BYTES} bytes")
        self.pos = self._scan = end
        return buf[pos:end].decode("latin-1")

    def start_body(self, length: int | None, chunked: bool) -> None:
        """Frame the body that follows the head just read: chunked, ``length`` bytes, or up to the close."""
        if chunked:
            self._framing, self._step = _CHUNKED, _SIZE
        elif length is not None:
            self._framing, self._remaining = _LENGTH, length
        else:
            self._framing = _UNTIL_CLOSE

    def read_body(self) -> bytes | object | None:
        """The next piece of body, END once the message is complete, or None until more bytes arrive."""
        framing = self._framing
        if framing is _LENGTH:
            if self._remaining == 0:
                return END
            piece = self._take()
        elif framing is _CHUNKED:
            piece = self._read_chunked()  # type: ignore[assignment]  # bytes, or None: more data is needed
        elif self.pos < len(self.buf):
            piece = bytes(self.buf[self.pos :])
            self.pos = len(self.buf)
            return piece
        else:
            return END if self.eof else None
        if piece is None and self.eof:
            raise _error("connection closed inside a message body")
        return piece

    def _take(self) -> bytes | None:
        buf, pos = self.buf, self.pos
        n = min(self._remaining, len(buf) - pos)
        if n == 0:
            return None
        self.pos = self._scan = pos + n
        self._remaining -= n
        return bytes(buf[pos : pos + n])

    def _read_chunked(self) -> bytes | object | None:
        while True:
            step = self._step
            if step is _DATA:
                piece = self._take()
                if self._remaining == 0:
                    self._step, self._crlf = _DATA_END, b"\r\n"
                return piece
            buf, pos = self.buf, self.pos
            if step is _DATA_END:
                # Checked as it arrives, so a wrong byte fails at once rather than after more data.
                owed = self._crlf
                got = bytes(buf[pos : pos + len(owed)])
                if not got:
                    return None
                if not owed.startswith(got):
                    raise _error(f"chunk data not followed by CRLF: {got!r}")
                self.pos = self._scan = pos + len(got)
                self._crlf = owed[len(got) :]
                if self._crlf:
                    return None
                self._step = _SIZE
            elif step is _SIZE:
                end = buf.find(b"\r\n", max(self._scan, pos))
                if end < 0:
                    self._incomplete_line(1)
                    return None
                m = _CHUNK_SIZE.fullmatch(buf, pos, end + 2)
                if m is None:
                    raise _error(f"invalid chunk header {bytes(buf[pos : end + 2])[:60]!r}")
                self.pos = self._scan = end + 2
                self._remaining = int(m.group(1), 16)
                self._step = _DATA if self._remaining else _TRAILER
            else:  # _TRAILER: header lines after the last chunk, through a blank line
                if buf[pos : pos + 1] == b"\n" or buf[pos : pos + 2] == b"\r\n":
                    end = pos + (1 if buf[pos] == 0x0A else 2)
                else:
                    m = _HEAD_END.search(buf, max(self._scan, pos))
                    if m is None:
                        self._incomplete_line(2)
                        return None
                    end = m.end()
                    _fields(buf[pos:end].decode("latin-1"))  # validated like headers, then dropped
                self.pos = self._scan = end
                self._step = _SIZE
                return END

    def _incomplete_line(self, overlap: int) -> None:
        if len(self.buf) - self.pos > MAX_HEAD_BYTES:
            raise _error(f"line larger than {MAX_HEAD_BYTES} bytes")
        # The terminator may straddle the next feed: resume `overlap` bytes back.
        self._scan = max(len(self.buf) - overlap, self.pos)
