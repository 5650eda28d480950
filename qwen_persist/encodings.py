"""Undoing ``Content-Encoding`` (gzip, deflate, br) for storage, bounded in memory.

The client always gets the bytes the app sent; only what is stored is decoded. Output comes in pieces of
at most `PIECE` bytes, so a small compressed body that inflates to gigabytes (a "zip bomb") costs no more
memory than the caller chooses to keep. Brotli comes from Google's ``brotli`` package, zlib from the
standard library.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Protocol

import brotli  # type: ignore[import-untyped]

PIECE = 64 * 1024


class ContentDecodingError(ValueError):
    """The body is not valid for its ``Content-Encoding``, or the encoding is not one we know."""


class _Layer(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...

    def finished(self) -> bool: ...


class _Zlib:
    """gzip (possibly several members) or deflate (zlib-wrapped, or raw as some servers send it)."""

    __slots__ = ("_decoder", "_gzip", "_started")

    def __init__(self, *, gzip: bool) -> None:
        self._gzip = gzip
        self._started = False
        self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            try:
                out = self._decoder.decompress(data, PIECE)
            except zlib.error as exc:
                if self._gzip or self._started:
                    kind = "gzip" if self._gzip else "deflate"
                    raise ContentDecodingError(f"invalid {kind} data: {exc}") from None
                # RFC 9110's deflate is zlib-wrapped, but servers have long sent raw deflate too.
                self._started = True
                self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self._started = True
            if out:
                yield out
            data = self._decoder.unconsumed_tail
            if self._decoder.eof and self._decoder.unused_data:
                # gzip allows several members in a row; each needs a fresh decoder.
                data = self._decoder.unused_data
                if not self._gzip:
                    raise ContentDecodingError("data after the end of the deflate stream")
                self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def finished(self) -> bool:
        return self._decoder.eof


class _Brotli:
    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = brotli.Decompressor()

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            out = self._decoder.process(data, output_buffer_limit=PIECE)
            while out:
                yield out
                if self._decoder.can_accept_more_data():
                    break
                out = self._decoder.process(b"", output_buffer_limit=PIECE)
        except brotli.error as exc:
            raise ContentDecodingError(f"invalid br data: {exc}") from None

    def finished(self) -> bool:
        return bool(self._decoder.is_finished())


def _layer(name: str) -> _Layer:
    if name in ("gzip", "x-gzip"):
        return _Zlib(gzip=True)
    if name == "deflate":
        return _Zlib(gzip=False)
    if name == "br":
        return _Brotli()
    raise ContentDecodingError(f"unsupported content encoding {name!r}")


def parse_content_encoding(value: str) -> list[str]:
    """The codings of a ``Content-Encoding`` header, in the order they were applied."""
    return [
        name for name in (part.strip().lower() for part in value.split(",")) if name != "identity" and name
    ]


class ContentDecoder:
    """Undo a list of content codings incrementally: ``feed`` chunks, get decoded pieces."""

    __slots__ = ("_layers",)

    def __init__(self, codings: list[str]) -> None:
        # The last coding applied is the first to undo.
        self._layers = [_layer(name) for name in reversed(codings)]

    def feed(self, data: bytes) -> Iterator[bytes]:
        return self._through(data, 0)

    def _through(self, data: bytes, depth: int) -> Iterator[bytes]:
        if depth == len(self._layers):
            yield data
            return
        for piece in self._layers[depth].feed(data):
            yield from self._through(piece, depth + 1)

    def finished(self) -> bool:
        """Whether every coding saw the end of its data (a cut body is not)."""
        return all(layer.finished() for layer in self._layers)


def decode_content(data: bytes, codings: list[str], *, limit: int) -> tuple[bytes, bool]:
    """Decode a whole body; returns (at most ``limit`` decoded bytes, whether there was more).

    Raises `ContentDecodingError` for an unknown coding or invalid data.
    """
    decoder = ContentDecoder(codings)
    pieces: list[bytes] = []
    size = 0
    for piece in decoder.feed(data):
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            return b"".join(pieces)[:limit], True
    return b"".join(pieces), False
