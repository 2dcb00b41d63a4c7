"""A PNG encoder in the standard library alone (zlib and struct): 8-bit RGB, no filtering."""

from __future__ import annotations

import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_rgb(width: int, height: int, rgb: bytes) -> bytes:
    """`rgb` is `height` rows of `width` pixels, three bytes each."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"{len(rgb)} bytes are not {width}x{height} RGB pixels")
    stride = width * 3
    # Each row starts with its filter type, 0 (none).
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")
