"""Small generated images, good and bad, for the make_shards tests (nothing here is read from disk)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112


def pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus a seed-dependent offset: distinct per seed, compresses like a photo."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return ((base + seed * 37) % 256).astype(np.uint8)  # (H, W, 3)


def encode(img: Image.Image, fmt: str, **save_args) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **save_args)
    return out.getvalue()


def rgb_jpeg(width: int = 48, height: int = 32, seed: int = 0, orientation: int | None = None) -> bytes:
    img = Image.fromarray(pixels(width, height, seed))
    if orientation is None:
        return encode(img, "JPEG", quality=90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def grey_jpeg(width: int = 40, height: int = 30, seed: int = 1) -> bytes:
    return encode(Image.fromarray(pixels(width, height, seed)[..., 0], "L"), "JPEG", quality=90)


def cmyk_jpeg(width: int = 40, height: int = 30) -> bytes:
    return encode(Image.fromarray(pixels(width, height)).convert("CMYK"), "JPEG", quality=90)


def rgba_png(width: int = 40, height: int = 30) -> bytes:
    """Red; the left half fully transparent."""
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, width // 2 :, 3] = 255
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def palette_gif(width: int = 40, height: int = 30) -> bytes:
    return encode(Image.fromarray(pixels(width, height)).convert("P", palette=Image.Palette.ADAPTIVE), "GIF")


def sixteen_bit_png(width: int = 40, height: int = 30, value: int = 32768) -> bytes:
    return encode(Image.fromarray(np.full((height, width), value, np.uint16)), "PNG")


def truncated(jpeg: bytes) -> bytes:
    return jpeg[: len(jpeg) // 2]


def header_only(jpeg: bytes) -> bytes:
    """Everything up to and including the start-of-scan header, no entropy-coded data."""
    sos = jpeg.index(b"\xff\xda")
    (length,) = struct.unpack(">H", jpeg[sos + 2 : sos + 4])
    return jpeg[: sos + 2 + length]


HTML_PAGE = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
TEXT = b"just some notes, not an image\n"
DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(range(256)) * 4  # the magic of a macOS .DS_Store file


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with no pixel data: nothing large is allocated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, deflate, no filter, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jpeg_bomb(side: int = 65000) -> bytes:
    """A real small JPEG whose start-of-frame header is patched to claim side x side pixels."""
    data = bytearray(rgb_jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)  # height, width
    return bytes(data)
