"""Bounds shared by the shard writer (tools/make_shards.py) and every loader backend. No imports: the writer's
worker processes import this without pulling in torch."""

# The most pixels an image may claim: Pillow's own default Image.MAX_IMAGE_PIXELS (1024 * 1024 * 1024 // 4 // 3),
# ~256 MiB of decoded RGB. Far above real photos (the largest in ../shared/data/imagenet-sample is
# 2400x1600 = 3.8 MP) and far below what a forged header can claim (gigapixels). make_shards refuses larger
# images (its --max-pixels default); the loaders check again before decoding, since shards can be altered.
MAX_DECODE_PIXELS = 89_478_485
