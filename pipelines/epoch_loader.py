"""What every backend's loader shares: the argument checks, and which samples one rank reads in which step.

The order comes from pipelines/sampler.py and nothing else, so every backend keeps the same guarantees: each
sample exactly once per epoch over all ranks, the same number of steps on every rank, a full shuffle, and an
exact resume from any step (set_epoch(epoch, start_step)). Backends differ only in how they cut the views.
"""

import numpy as np

from pipelines import batch as B
from pipelines.recipe import PirlRecipe
from pipelines.sampler import epoch_batches, rank_sample_count, steps_per_epoch
from pipelines.shard_index import SampleTable


def check_loader_args(recipe, *, mode: str, with_geometry: bool, num_workers: int, seed: int) -> None:
    """The checks every make_loader runs before touching the shards, with messages naming the bad argument."""
    if not isinstance(recipe, PirlRecipe):
        raise TypeError(f"recipe must be a PirlRecipe (OmegaConf.to_object a structured config), got {type(recipe)}")
    recipe.validate()
    if mode not in B.MODES:
        raise ValueError(f"mode must be one of {B.MODES}, got {mode!r}")
    if with_geometry and mode != "pretrain":
        raise ValueError("with_geometry=True only applies to mode='pretrain' (eval draws no geometry)")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


class EpochLoader:
    """One rank's view of the epochs. len() = steps per epoch, the same on every rank; iterate after set_epoch().

    Subclasses implement __iter__ over self.batches().
    """

    def __init__(self, table: SampleTable, recipe: PirlRecipe, *, batch_size: int, num_workers: int, rank: int,
                 world_size: int, seed: int, mode: str, with_geometry: bool):
        self.table = table
        self.recipe = recipe
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.mode = mode
        self.with_geometry = with_geometry
        self._steps = steps_per_epoch(table.num_samples, batch_size, world_size)
        self.rank_samples = rank_sample_count(table.num_samples, batch_size, world_size, rank)  # per epoch
        self.epoch = 0
        self.start_step = 0

    @property
    def num_samples(self) -> int:
        return self.table.num_samples

    @property
    def classes(self) -> list[str] | None:
        return self.table.classes

    @property
    def labelled(self) -> bool:
        return self.table.labelled

    @property
    def max_batch_size(self) -> int:
        """The last batch of an epoch takes the rest of the rank's samples: up to batch_size + 1 (sampler.py)."""
        return self.batch_size + 1

    def __len__(self) -> int:
        return self._steps

    def global_batch_size(self, step: int) -> int:
        """Samples all ranks read together at step `step` of an epoch: W*B, the rest of the epoch at the last."""
        if not 0 <= step < self._steps:
            raise ValueError(f"step must be in [0, {self._steps}), got {step}")
        window = self.world_size * self.batch_size
        return window if step < self._steps - 1 else self.table.num_samples - (self._steps - 1) * window

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (its order and its augmentations) and the step to start from (exact resume)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= self._steps:
            raise ValueError(f"start_step must be in [0, {self._steps}], got {start_step}")
        self.epoch = epoch
        self.start_step = start_step

    def skip(self, steps: int) -> None:
        """Start the current epoch `steps` batches later."""
        self.set_epoch(self.epoch, self.start_step + steps)

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of global indexes for the current epoch, from its start step."""
        return epoch_batches(
            self.table.num_samples, self.batch_size, rank=self.rank, world_size=self.world_size,
            seed=self.seed, epoch=self.epoch, shuffle=self.mode == "pretrain", start_step=self.start_step,
        )
