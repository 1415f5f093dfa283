"""The loader front: what every backend's make_loader does, so that a backend module names only what differs.

pipelines.make_loader(backend, shard_dir, recipe, **kwargs) calls the backend's make_loader, which hands its
keyword arguments to open_loader here together with what is its own: its options (the reference's decode_device,
DALI's options, FFCV's os_cache) and its loader class. open_loader binds the arguments every backend takes
(LoaderArgs, what EpochLoader keeps), checks them and the recipe, then the backend's options, and only then reads
where the samples are. The order is the same for every backend, so a bad argument gets the same message from
each, before any file is read.
"""

import inspect
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Callable

import torch

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.pipelines.shard_index import build_sample_table


@dataclass(frozen=True)
class LoaderArgs:
    """The keyword arguments every backend's make_loader takes and EpochLoader keeps."""

    batch_size: int  # samples per step on this rank (an epoch's last step may take one more: pipelines/sampler.py)
    num_workers: int  # the backend's workers (processes or threads); 0 = the main process
    rank: int = 0  # this process among world_size (a single process by default)
    world_size: int = 1
    seed: int = 0  # every draw is a function of (seed, epoch, global index): common/rng.py
    mode: str = "pretrain"  # "pretrain": shuffled epochs of both views; "eval": identity order, centre crop
    with_geometry: bool = False  # add what the loader drew (pipelines/batch.py GEOMETRY_KEYS); pretrain only

    @classmethod
    def bind(cls, backend: str, kwargs: dict, own: list[str]) -> "LoaderArgs":
        """The arguments every backend takes, from a make_loader's keyword arguments; any other key must be one of
        the backend's `own` options. A missing or unknown key is a TypeError naming the backend's valid ones."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in kwargs if k not in names and k not in own]
        if unknown:
            got = (f"an unexpected keyword argument {unknown[0]!r}" if len(unknown) == 1
                   else f"unexpected keyword arguments {unknown}")
            raise TypeError(f"make_loader() of the {backend} backend got {got}; it takes {names} (every backend) "
                            f"and {own} (its own)")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in kwargs]
        if missing:
            raise TypeError(f"make_loader() of the {backend} backend is missing required keyword arguments {missing}")
        return cls(**{k: v for k, v in kwargs.items() if k in names})

    def check(self, recipe) -> None:
        """The checks every backend runs before touching the data, with messages naming the bad argument."""
        if not isinstance(recipe, PirlRecipe):
            raise TypeError(f"recipe must be a PirlRecipe (OmegaConf.to_object a structured config), got "
                            f"{type(recipe)}")
        recipe.validate()
        if self.mode not in B.MODES:
            raise ValueError(f"mode must be one of {B.MODES}, got {self.mode!r}")
        if self.with_geometry and self.mode != "pretrain":
            raise ValueError("with_geometry=True only applies to mode='pretrain' (eval draws no geometry)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def open_loader(backend: str, shard_dir: str, recipe: PirlRecipe, kwargs: dict, *, options: Callable[..., dict],
                loader: Callable, read_samples: Callable = build_sample_table,
                require: Callable[[], None] | None = None):
    """The `backend`'s loader over shard_dir, from a make_loader's keyword arguments, in this order:

    1. LoaderArgs bound from `kwargs` (the other keys must be parameters of `options`);
    2. require(): raises BackendUnavailable where the backend's package is missing (FFCV);
    3. LoaderArgs.check(recipe);
    4. options(**the other keys): the backend's own options checked, as the keyword arguments `loader` takes;
    5. read_samples(shard_dir): where the samples are (the shard folder's SampleTable; FFCV: its .beton);
    6. loader(samples, recipe, **options, **LoaderArgs): the backend's EpochLoader.
    """
    own = list(inspect.signature(options).parameters)
    args = LoaderArgs.bind(backend, kwargs, own)
    if require is not None:
        require()
    args.check(recipe)
    checked = options(**{k: v for k, v in kwargs.items() if k in own})
    return loader(read_samples(shard_dir), recipe, **checked, **asdict(args))


def resolve_pin_memory(pin_memory: bool | None) -> bool:
    """A backend's pin_memory argument: None pins where CUDA is available (the batch is copied to a GPU)."""
    return torch.cuda.is_available() if pin_memory is None else pin_memory
