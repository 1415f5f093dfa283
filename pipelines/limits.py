"""Bounds shared by the shard writer (tools/make_shards.py) and every loader backend. No imports: the writer's
worker processes import this without pulling in torch."""

# The most pixels an image may claim: Pillow's own default Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3),
# ~256 MiB of decoded RGB. Far above real photos (the largest in ../shared/data/imagenet-sample is
# 2400x1600 = 3.8 MP) and far below what a forged header can claim (gigapixels). make_shards refuses larger
# images (its --max-pixels default); the loaders check again before decoding, since shards can be altered.
MAX_DECODE_PIXELS = 89_478_485


def too_many_pixels(height: int, width: int) -> str | None:
    """Why an image of height x width is refused as a decompression bomb, or None: the one message every loader
    backend and the JPEG check (pipelines/jpeg_check.py) give."""
    if height * width <= MAX_DECODE_PIXELS:
        return None
    return (f"its header claims {width}x{height} = {height * width:,} pixels, more than {MAX_DECODE_PIXELS:,}: "
            "refused as a decompression bomb")
