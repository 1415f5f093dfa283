"""Input pipelines: shards on disk -> Batch dicts (pipelines/batch.py). Backends are chosen by name.

Each backend is "module:function" and imported only when chosen: DALI and FFCV are optional installs, and
importing either costs seconds, so `import pipelines` must not pull them in.
"""

import importlib

from pirl_trainer.pipelines.errors import BackendUnavailable
from pirl_trainer.pipelines.recipe import PirlRecipe

BACKENDS = {
    "reference": "pirl_trainer.pipelines.reference:make_loader",
    "dali": "pirl_trainer.pipelines.dali_loader:make_loader",
    "ffcv": "pirl_trainer.pipelines.ffcv_loader:make_loader",
}


def backend_factory(backend: str):
    """The make_loader function of a backend, with a clear error for an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown pipeline backend {backend!r}; valid backends: {sorted(BACKENDS)}")
    module, function = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), function)


def make_loader(backend: str, shard_dir: str, recipe: PirlRecipe, **kwargs):
    """BACKENDS[backend](shard_dir, recipe, **kwargs).

    Every backend takes batch_size, num_workers, rank, world_size, seed, mode ("pretrain" | "eval") and
    with_geometry (pipelines/loader_front.py LoaderArgs, checked there the same way for every backend) plus its
    own options, and returns a loader with the ReferenceLoader interface (len, set_epoch, skip, iteration
    yielding the uint8 loader batch of pipelines/batch.py). A backend whose package is missing raises
    BackendUnavailable (pipelines/errors.py) saying how to install it.
    """
    return backend_factory(backend)(shard_dir, recipe, **kwargs)


__all__ = ["BACKENDS", "BackendUnavailable", "backend_factory", "make_loader"]
