"""The reference backend: indexed reads from the shards + torch DataLoader workers cutting uint8 views.

The baseline the DALI and FFCV backends are measured against. Per step: the sampler (pipelines/sampler.py)
picks this rank's global indexes; DataLoader workers read each sample with one pread (pipelines/shard_index.py),
decode it and cut its uint8 views (pipelines/views.py); batches come back in sampler order whatever the worker
count. The photometric work happens later on the training device (pipelines/augment.py).

Randomness: each sample's geometry draws from a torch.Generator seeded by (seed, epoch, global index), so a
view does not depend on the rank, the worker count or the worker that made it, and a resumed epoch sees the
same views. The global torch RNG is never touched (the DataLoader gets its own generator for its base seed).
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from pipelines import batch as B
from pipelines.recipe import PirlRecipe
from pipelines.rng import PURPOSE_LOADER, PURPOSE_SAMPLE, derive_seed, generator_for
from pipelines.sampler import epoch_batches, rank_slice, steps_per_epoch
from pipelines.shard_index import SampleTable, ShardReader, build_sample_table
from pipelines.views import eval_view, pretrain_views

_PRETRAIN_KEYS = (B.IMAGE, B.PATCHES)  # the views' geometry keys are dropped unless asked for


class ShardDataset(Dataset):
    """Map-style dataset over a SampleTable; an item key is (epoch, global index)."""

    def __init__(self, table: SampleTable, recipe: PirlRecipe, *, mode: str, seed: int, with_geometry: bool):
        self.reader = ShardReader(table)
        self.recipe = recipe
        self.mode = mode
        self.seed = seed
        self.keys = _PRETRAIN_KEYS + (B.GEOMETRY_KEYS if with_geometry else ())

    def __len__(self) -> int:
        return self.reader.table.num_samples

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, i = key
        raw = self.reader.read(i)
        try:
            if self.mode == "eval":
                sample = {B.IMAGE: eval_view(raw.jpg, self.recipe)}
            else:
                views = pretrain_views(raw.jpg, self.recipe, generator_for(PURPOSE_SAMPLE, self.seed, epoch, i))
                sample = {k: views[k] for k in self.keys}
        except (RuntimeError, ValueError) as err:
            shard = self.reader.table.tar_paths[int(self.reader.table.shard[i])]
            raise RuntimeError(f"{shard}: cannot decode the JPEG of sample {i:09d}: {err}") from err
        sample[B.INDEX] = raw.index
        if raw.label is not None:
            sample[B.LABEL] = raw.label
        return sample


def collate(samples: list[dict]) -> B.Batch:
    """Stack per-sample dicts into a Batch (runs inside the DataLoader worker).

    Views are stacked as their HWC storage (a plain copy, not a transposing one) and handed back as CHW-shaped
    channels-last views; default_collate writes straight into shared memory, so the batch reaches the main
    process without another copy.
    """
    out: B.Batch = {}
    for key in samples[0]:
        if key in (B.INDEX, B.LABEL):
            out[key] = torch.tensor([s[key] for s in samples], dtype=torch.int64)
        elif key in (B.IMAGE, B.PATCHES):
            out[key] = default_collate([s[key].movedim(-3, -1) for s in samples]).movedim(-1, -3)
        else:
            out[key] = torch.stack([s[key] for s in samples])
    return out


class ReferenceLoader:
    """One rank's loader. len() = steps per epoch, the same on every rank; iterate after set_epoch()."""

    def __init__(
        self,
        table: SampleTable,
        recipe: PirlRecipe,
        *,
        batch_size: int,
        num_workers: int,
        rank: int,
        world_size: int,
        seed: int,
        mode: str,
        with_geometry: bool,
        pin_memory: bool,
    ):
        self.table = table
        self.recipe = recipe
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.mode = mode
        self.pin_memory = pin_memory
        self.dataset = ShardDataset(table, recipe, mode=mode, seed=seed, with_geometry=with_geometry)
        self._steps = steps_per_epoch(table.num_samples, batch_size, world_size)
        start, stop = rank_slice(table.num_samples, world_size, rank)
        self.rank_samples = stop - start  # samples this rank sees per epoch
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

    def __len__(self) -> int:
        return self._steps

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
        """This rank's remaining batches of global indexes for the current epoch and start step."""
        return epoch_batches(
            self.table.num_samples, self.batch_size, rank=self.rank, world_size=self.world_size,
            seed=self.seed, epoch=self.epoch, shuffle=self.mode == "pretrain", start_step=self.start_step,
        )

    def __iter__(self):
        keys = [[(self.epoch, int(i)) for i in batch] for batch in self.batches()]
        loader = DataLoader(
            self.dataset,
            batch_sampler=keys,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            # Its own generator: the DataLoader draws the workers' base seed from it, not the global RNG.
            generator=torch.Generator().manual_seed(derive_seed(PURPOSE_LOADER, self.seed, self.epoch)),
        )
        return iter(loader)


def make_loader(
    shard_dir: str,
    recipe: PirlRecipe,
    *,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    mode: str = "pretrain",
    with_geometry: bool = False,
    pin_memory: bool | None = None,
) -> ReferenceLoader:
    """Reference-backend loader over the shards of tools/make_shards.py.

    Yields the uint8 loader batch (pipelines/batch.py); pipelines.augment.BatchAugment turns it into the model
    batch. mode="pretrain": shuffled epochs of image + patches + index (+ label); mode="eval": identity order,
    image = resize + centre crop, index + label. pin_memory=None pins when CUDA is available.
    """
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
    table = build_sample_table(shard_dir)
    return ReferenceLoader(
        table, recipe, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
        seed=seed, mode=mode, with_geometry=with_geometry,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
