"""Input pipelines: shards on disk -> Batch dicts (pipelines/batch.py). Backends are chosen by name."""

from pipelines import reference
from pipelines.recipe import PirlRecipe

BACKENDS = {"reference": reference.make_loader}


def make_loader(backend: str, shard_dir: str, recipe: PirlRecipe, **kwargs):
    """BACKENDS[backend](shard_dir, recipe, **kwargs), with a clear error for an unknown backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown pipeline backend {backend!r}; valid backends: {sorted(BACKENDS)}")
    return BACKENDS[backend](shard_dir, recipe, **kwargs)
