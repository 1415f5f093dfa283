"""The decode limit: JPEGs per second that one core fully decodes, with every decoder that imports here.

It is the yardstick for the loaders (ratio_to_decode): a loader that does nothing but decode reaches about 1;
decoding at reduced scale inside the IDCT (pipelines/views.py) can take it above 1.
"""

import io
import time

import numpy as np
import torch

from pirl_trainer.pipelines.shard_index import ShardIndexError, ShardReader, build_sample_table
from pirl_trainer.tools.profiling import UsageError

MAX_SAMPLES = 400  # enough for a stable rate, few enough to hold in memory and decode 3 times per decoder


def _torchvision():
    from torchvision.io import ImageReadMode, decode_jpeg

    return lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _simplejpeg():
    import simplejpeg

    return lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")


def _pillow():
    from PIL import Image

    def decode(b):
        image = Image.open(io.BytesIO(b)).convert("RGB")
        image.load()
        return image

    return decode


def _opencv():
    import cv2

    cv2.setNumThreads(1)  # its own thread pool would make it the only decoder using more than one core

    def decode(b):
        if cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) is None:  # cv2 reports failure, not raises
            raise ValueError("cv2.imdecode returned None")

    return decode


def _turbojpeg():
    from turbojpeg import TurboJPEG

    return TurboJPEG().decode  # raises where libturbojpeg is missing


DECODERS = {"torchvision": _torchvision, "simplejpeg": _simplejpeg, "pillow": _pillow, "opencv": _opencv,
            "pyturbojpeg": _turbojpeg}


def read_jpegs(shard_dir: str, limit: int = MAX_SAMPLES) -> tuple[list[bytes], int]:
    """The JPEG bytes of the first `limit` samples in memory (so disk reads are not timed), and the sample count."""
    try:
        table = build_sample_table(shard_dir)
    except (ShardIndexError, OSError) as err:
        raise UsageError(f"--shards {shard_dir}: {err}") from None
    reader = ShardReader(table)
    try:
        return [bytes(reader.read(i).jpg) for i in range(min(table.num_samples, limit))], table.num_samples
    finally:
        reader.close()


def decode_rates(jpegs: list[bytes], passes: int = 3) -> tuple[dict[str, float], dict[str, str]]:
    """({decoder: samples/s on one core, best of `passes`}, {decoder: why it was left out})."""
    rates, skipped = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, factory in DECODERS.items():
            try:
                decode = factory()
                best = min(_one_pass(decode, jpegs) for _ in range(passes))
            except Exception as err:  # not installed, no native library, or an image it cannot read
                skipped[name] = f"{type(err).__name__}: {err}"
                continue
            rates[name] = len(jpegs) / best
    finally:
        torch.set_num_threads(threads)
    return rates, skipped


def _one_pass(decode, jpegs: list[bytes]) -> float:
    start = time.perf_counter()
    for b in jpegs:
        decode(b)
    return time.perf_counter() - start


def decode_limit(before: dict[str, float], after: dict[str, float], skipped: dict[str, str]) -> dict:
    """The limit from two measurements, one before and one after the loaders.

    The machine is shared and noisy, and other load only ever slows a decoder down: of the two, the faster
    rate is the nearer to what one core can do.
    """
    best = {name: max(before.get(name, 0.0), after.get(name, 0.0)) for name in {**before, **after}}
    if not best:
        raise UsageError(f"no JPEG decoder works here: {skipped}")
    decoder = max(best, key=best.get)
    return {"decoder": decoder, "samples_per_s_per_core": best[decoder], "all": best,
            "before": before, "after": after, "skipped": skipped}
