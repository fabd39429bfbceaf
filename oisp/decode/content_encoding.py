"""Incremental Content-Encoding decoders: gzip, deflate (zlib or raw), br, zstd, chains.

Output is pulled, never pushed: ``feed`` hands over encoded bytes and
``read(n)`` returns at most ``n`` decoded bytes, leaving the rest of the work
for the next ``read``. A few hundred bytes can inflate to gigabytes (a
decompression bomb), so nothing is inflated that the caller has not asked for;
the caller decides how much it wants in all.
"""

from __future__ import annotations

import zlib
from typing import Callable, Protocol

try:
    import brotli
except ImportError:  # brotlicffi offers the same API (>= 1.2: output_buffer_limit) where brotli has no wheel
    import brotlicffi as brotli

try:  # Python 3.14 ships zstd in the standard library; backports.zstd is the same module for older ones
    from compression import zstd
except ImportError:
    from backports import zstd


class ContentDecodingError(ValueError):
    pass


class _Stage(Protocol):
    def feed(self, data: bytes) -> None: ...

    def read(self, n: int) -> bytes:
        """At most ``n`` (>= 1) decoded bytes; ``b""`` once the input fed so far is used up."""
        ...


class _Identity:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else bytes(data)

    def read(self, n: int) -> bytes:
        out, self._buf = (self._buf, b"") if len(self._buf) <= n else (self._buf[:n], self._buf[n:])
        return out


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._d = zlib.decompressobj(wbits)
        self._in = b""

    def feed(self, data: bytes) -> None:
        self._in = self._in + data if self._in else bytes(data)

    def read(self, n: int) -> bytes:
        if self._d.eof:
            return b""  # what follows the end of the stream is not body (as before: ignored)
        try:
            out = self._d.decompress(self._in, n)
        except zlib.error as e:
            raise ContentDecodingError(str(e)) from e
        self._in = self._d.unconsumed_tail
        return out


class _Deflate:
    """'deflate' is meant to be zlib-wrapped, but some servers send raw deflate: sniff the header."""

    def __init__(self) -> None:
        self._head = b""
        self._d: _Zlib | None = None

    def feed(self, data: bytes) -> None:
        if self._d is not None:
            self._d.feed(data)
            return
        self._head += data
        if len(self._head) >= 2:
            b0, b1 = self._head[0], self._head[1]
            zlib_wrapped = (b0 & 0x0F) == 8 and ((b0 << 8) | b1) % 31 == 0
            self._d = _Zlib(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            self._d.feed(self._head)
            self._head = b""

    def read(self, n: int) -> bytes:
        return self._d.read(n) if self._d is not None else b""


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()
        self._in = b""
        self._out = b""  # output_buffer_limit is a soft limit: what came beyond n waits here

    def feed(self, data: bytes) -> None:
        self._in = self._in + data if self._in else bytes(data)

    def read(self, n: int) -> bytes:
        if not self._out:
            # More input may be given only once the decoder has taken what it was given before.
            data = b""
            if self._in and self._d.can_accept_more_data():
                data, self._in = self._in, b""
            try:
                self._out = self._d.process(data, output_buffer_limit=n)
            except brotli.error as e:
                raise ContentDecodingError(str(e)) from e
        out, self._out = (self._out, b"") if len(self._out) <= n else (self._out[:n], self._out[n:])
        return out


class _Zstd:
    def __init__(self) -> None:
        self._d = zstd.ZstdDecompressor()
        self._in = b""

    def feed(self, data: bytes) -> None:
        self._in = self._in + data if self._in else bytes(data)

    def read(self, n: int) -> bytes:
        if self._d.eof:
            return b""
        data, self._in = self._in, b""  # the decompressor keeps what max_length left unread
        try:
            return self._d.decompress(data, n)
        except zstd.ZstdError as e:
            raise ContentDecodingError(str(e)) from e


_FACTORIES: dict[str, Callable[[], _Stage]] = {
    "identity": _Identity,
    "gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "deflate": _Deflate,
    "br": _Brotli,
    "zstd": _Zstd,
}

_STEP = 64 * 1024  # how much one coding of a chain inflates for the next at a time


class BodyDecoder:
    """Undoes a Content-Encoding header's codings, last applied first."""

    def __init__(self, content_encoding: str | None) -> None:
        names = [n.strip().lower() for n in (content_encoding or "").split(",") if n.strip()]
        unknown = [n for n in names if n not in _FACTORIES]
        if unknown:
            raise ContentDecodingError(f"unsupported content-encoding {unknown[0]!r}")
        self._chain: list[_Stage] = [_FACTORIES[n]() for n in reversed(names) if n != "identity"] or [_Identity()]

    def feed(self, data: bytes) -> None:
        self._chain[0].feed(data)

    def read(self, n: int) -> bytes:
        """At most ``n`` decoded bytes of what was fed; ``b""`` when more input is needed."""
        return self._pull(len(self._chain) - 1, max(n, 1))

    def _pull(self, i: int, n: int) -> bytes:
        stage = self._chain[i]
        while True:
            out = stage.read(n)
            if out or i == 0:
                return out
            more = self._pull(i - 1, _STEP)
            if not more:
                return b""
            stage.feed(more)
