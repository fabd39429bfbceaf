"""Incremental Content-Encoding decoders: gzip, deflate (zlib or raw), br, zstd, chains."""

from __future__ import annotations

import zlib
from typing import Protocol

try:
    import brotli  # type: ignore[import-not-found]
except ImportError:  # brotlicffi offers the same API where brotli has no wheel
    import brotlicffi as brotli  # type: ignore[import-not-found,no-redef]

try:
    import zstandard  # type: ignore[import-not-found]
except ImportError:  # Python 3.14 ships zstd in the standard library
    zstandard = None  # type: ignore[assignment]


class ContentDecodingError(ValueError):
    pass


class _Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class _Identity:
    def decompress(self, data: bytes) -> bytes:
        return data


class _Zlib:
    def __init__(self, wbits: int) -> None:
        self._d = zlib.decompressobj(wbits)

    def decompress(self, data: bytes) -> bytes:
        try:
            return self._d.decompress(data)
        except zlib.error as e:
            raise ContentDecodingError(str(e)) from e


class _Deflate:
    """'deflate' is meant to be zlib-wrapped, but some servers send raw deflate: sniff the header."""

    def __init__(self) -> None:
        self._head = b""
        self._d: _Zlib | None = None

    def decompress(self, data: bytes) -> bytes:
        if self._d is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            b0, b1 = self._head[0], self._head[1]
            zlib_wrapped = (b0 & 0x0F) == 8 and ((b0 << 8) | b1) % 31 == 0
            self._d = _Zlib(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            data, self._head = self._head, b""
        return self._d.decompress(data)


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()

    def decompress(self, data: bytes) -> bytes:
        try:
            return self._d.process(data)
        except brotli.error as e:
            raise ContentDecodingError(str(e)) from e


class _Zstd:
    def __init__(self) -> None:
        if zstandard is not None:
            self._d = zstandard.ZstdDecompressor().decompressobj()
            self._errors: tuple[type[BaseException], ...] = (zstandard.ZstdError,)
        else:
            from compression import zstd  # type: ignore[import-not-found]

            self._d = zstd.ZstdDecompressor()
            self._errors = (zstd.ZstdError,)

    def decompress(self, data: bytes) -> bytes:
        try:
            return self._d.decompress(data)
        except self._errors as e:
            raise ContentDecodingError(str(e)) from e


_FACTORIES = {
    "identity": _Identity,
    "gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: _Zlib(16 + zlib.MAX_WBITS),
    "deflate": _Deflate,
    "br": _Brotli,
    "zstd": _Zstd,
}


class BodyDecoder:
    """Undoes a Content-Encoding header's codings, last applied first."""

    def __init__(self, content_encoding: str | None) -> None:
        names = [n.strip().lower() for n in (content_encoding or "").split(",") if n.strip()]
        unknown = [n for n in names if n not in _FACTORIES]
        if unknown:
            raise ContentDecodingError(f"unsupported content-encoding {unknown[0]!r}")
        self._chain: list[_Decoder] = [_FACTORIES[n]() for n in reversed(names) if n != "identity"]

    def decompress(self, data: bytes) -> bytes:
        for d in self._chain:
            data = d.decompress(data)
        return data
