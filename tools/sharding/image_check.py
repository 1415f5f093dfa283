"""Verify one image file by decoding it fully, and choose the JPEG bytes that go into the shard.

Runs in the worker processes of make_shards. Never raises for bad input: every failure becomes a skip reason.
A reason starts with a short category ("empty file", "unreadable", "not an image", "decompression bomb",
"truncated", "corrupt", "cannot convert") followed by ": details" where there are any.

EXIF orientation policy: every image in the shards is stored upright, with no orientation tag left to apply.
Decoders disagree about EXIF: Pillow and torchvision.io.decode_jpeg ignore it, DALI's CPU decoder applies it
(both checked on an orientation-6 JPEG with DALI 2.4, torchvision 0.29), so does OpenCV's imread by default.
A JPEG with orientation 2..8 is therefore rotated with ImageOps.exif_transpose and re-encoded without EXIF, so
every backend sees the same pixels, the ones an EXIF-aware viewer shows. Every other re-encoded image (non-JPEG,
CMYK, --max-side) is made upright the same way. Orientation 1, no tag, or an invalid value: the bytes are kept.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pirl_trainer.pipelines.limits import MAX_DECODE_PIXELS

# Re-encoding quality: at 95, Pillow's re-encode of a photo is visually lossless; only the few non-JPEG or
# odd-mode files of a dataset pay the larger size.
JPEG_QUALITY = 95

# --max-pixels' default: the loaders' own bound (pipelines/limits.py), so no kept image is refused at load time.
DEFAULT_MAX_PIXELS = MAX_DECODE_PIXELS

EXIF_ORIENTATION_TAG = 0x0112  # TIFF/EXIF tag "Orientation"; 1 = upright, 2..8 = flips and rotations
# Values outside 1..8 (ImageNet has a file tagged 0) are ignored by every decoder: DALI 2.4 decodes
# n03337140_file.JPEG (orientation 0) to the same pixels as Pillow. Such files keep their bytes.
_ROTATING_ORIENTATIONS = range(2, 9)

WHITE = (255, 255, 255)  # background for images with transparency

# Categories of re-encoding, counted in the manifest's "reencoded".
NOT_JPEG = "not_jpeg"
COLOUR_MODE = "colour_mode"
EXIF_ORIENTATION = "exif_orientation"
MAX_SIDE = "max_side"

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class CheckOptions:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int | None = None
    jpeg_quality: int = JPEG_QUALITY


@dataclass(frozen=True)
class CheckResult:
    data: bytes | None  # JPEG bytes to store; None when skipped
    skip_reason: str | None = None
    reencoded: tuple[str, ...] = ()  # categories above; empty when the original bytes are kept
    source_bytes: int = 0  # size of the input file, for the MB/s figure


def check_file(path: str, options: CheckOptions) -> CheckResult:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return CheckResult(None, f"unreadable: {type(e).__name__}: {e.strerror or e}")
    return check_bytes(data, options)


def check_bytes(data: bytes, options: CheckOptions) -> CheckResult:
    if not data:
        return CheckResult(None, "empty file")
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    # Pillow's own bomb check follows our cap (it errors at twice MAX_IMAGE_PIXELS); truncated data must raise.
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = options.max_pixels, False
    try:
        with warnings.catch_warnings():
            # Corrupt-EXIF and bomb warnings would flood stderr; every real problem is reported as a skip reason.
            warnings.simplefilter("ignore")
            result = _check(data, options)
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return CheckResult(result.data, result.skip_reason, result.reencoded, len(data))


def _check(data: bytes, options: CheckOptions) -> CheckResult:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return CheckResult(None, f"decompression bomb: {e}")
    except UnidentifiedImageError:
        return CheckResult(None, _not_an_image_reason(data))
    except Exception as e:  # plugins raise SyntaxError, ValueError, struct.error... on bad headers
        return CheckResult(None, f"corrupt: bad header: {type(e).__name__}: {e}")
    with img:
        width, height = img.size
        if width * height > options.max_pixels:
            # Checked on the header alone, before any pixel is decoded.
            return CheckResult(
                None,
                f"decompression bomb: header claims {width}x{height} = {width * height} pixels "
                f"> max_pixels {options.max_pixels}",
            )
        try:
            img.load()
        except Image.DecompressionBombError as e:
            return CheckResult(None, f"decompression bomb: {e}")
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            return CheckResult(None, ("truncated: " if "truncated" in str(e) else "corrupt: ") + message)

        orientation = _exif_orientation(img)
        reasons = []
        if img.format != "JPEG":
            reasons.append(NOT_JPEG)
        elif img.mode not in ("RGB", "L"):
            reasons.append(COLOUR_MODE)
        if orientation in _ROTATING_ORIENTATIONS:
            reasons.append(EXIF_ORIENTATION)
        if options.max_side is not None and max(width, height) > options.max_side:
            reasons.append(MAX_SIDE)
        if not reasons:
            return CheckResult(data)
        try:
            jpeg = _reencode(img, orientation, options)
        except Exception as e:
            return CheckResult(None, f"cannot convert: {img.format} mode {img.mode}: {type(e).__name__}: {e}")
        return CheckResult(jpeg, reencoded=tuple(reasons))


def _not_an_image_reason(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
        return "not an image: HTML/XML text (an error page saved as an image?)"
    return f"not an image: unrecognised format (first bytes {data[:8].hex()})"


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:  # unparsable EXIF: treated as no orientation, like viewers do
        return None


def _reencode(img: Image.Image, orientation: int | None, options: CheckOptions) -> bytes:
    if orientation in _ROTATING_ORIENTATIONS:
        img = ImageOps.exif_transpose(img)
    rgb = _to_rgb(img)
    if options.max_side is not None and max(rgb.size) > options.max_side:
        rgb = _shrink(rgb, options.max_side)
    out = io.BytesIO()
    # No exif= and no icc_profile=: the orientation is applied above, and a CMYK source's profile
    # would be wrong for RGB pixels.
    rgb.save(out, "JPEG", quality=options.jpeg_quality)
    return out.getvalue()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert clips 16-bit values at 255 (a near-white image); scale 0..65535 to 0..255 instead.
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray((wide // 257).astype(np.uint8), "L")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    # FFCV's writer (RGBImageField max_resolution): scale so the longer side is max_side, sizes truncated to int,
    # area interpolation (cv2.INTER_AREA; Pillow's BOX filter is the same area average when shrinking).
    ratio = max_side / max(img.size)
    size = (max(1, int(img.width * ratio)), max(1, int(img.height * ratio)))
    return img.resize(size, Image.Resampling.BOX)
