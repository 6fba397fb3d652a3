"""A minimal PNG encoder (8-bit RGB, no filtering), so the runtime needs no imaging
library. PNG is a signature and chunks: IHDR (size, depth, colour type), IDAT (zlib of the
rows, each led by a filter byte), IEND."""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + \
        struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_rgb(image: np.ndarray, level: int = 6) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {image.shape} {image.dtype}")
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)],
                          axis=1)  # filter type 0 (None) before every row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + _chunk(b"IEND", b""))


def decode_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR."""
    if png[:8] != _SIGNATURE or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])
