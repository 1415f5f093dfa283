"""The reference backend: indexed reads from the shards + torch DataLoader workers cutting uint8 views.

The baseline the DALI and FFCV backends are measured against. Per step: the sampler (pipelines/sampler.py)
picks this rank's global indexes; DataLoader workers read each sample with one pread (pipelines/shard_index.py),
decode it and cut its uint8 views (pipelines/views.py); batches come back in sampler order whatever the worker
count. The photometric work happens later on the training device (pipelines/augment.py).

Randomness: each sample's geometry draws from a torch.Generator seeded by (seed, epoch, global index), so a
view does not depend on the rank, the worker count or the worker that made it, and a resumed epoch sees the
same views. The global torch RNG is never touched (the DataLoader gets its own generator for its base seed).

decode_device="cpu" or "cuda" (data.decode_device): the workers only read, check and draw; the main process
decodes each batch on that device and cuts its views there (pipelines/device_decode.py).
"""

import torch
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset, default_collate

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.pipelines.epoch_loader import EpochLoader
from pirl_trainer.pipelines.device_decode import EncodedDataset, collate_encoded, decode_and_cut, decode_device_of
from pirl_trainer.pipelines.jpeg_check import jpeg_problem
from pirl_trainer.pipelines.loader_front import open_loader, resolve_pin_memory
from pirl_trainer.common.rng import PURPOSE_LOADER, PURPOSE_SAMPLE, derive_seed, generator_for
from pirl_trainer.pipelines.shard_index import SampleTable, ShardReader
from pirl_trainer.pipelines.views import eval_view, pretrain_views

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

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        """The sample's views, or None for a corrupt sample (collate leaves it out; EpochLoader counts it)."""
        epoch, i = key
        raw = self.reader.read(i)
        if jpeg_problem(raw.jpg) is not None:
            return None
        try:
            if self.mode == "eval":
                sample = {B.IMAGE: eval_view(raw.jpg, self.recipe)}
            else:
                views = pretrain_views(raw.jpg, self.recipe, generator_for(PURPOSE_SAMPLE, self.seed, epoch, i))
                sample = {k: views[k] for k in self.keys}
        except (RuntimeError, ValueError):  # sound structure, undecodable data: skipped as well
            return None
        sample[B.INDEX] = raw.index
        if raw.label is not None:
            sample[B.LABEL] = raw.label
        return sample


def collate(samples: list[dict | None]) -> B.Batch:
    """Stack per-sample dicts into a Batch (runs inside the DataLoader worker), leaving out corrupt samples
    (None); a batch of nothing but corrupt samples is an empty `index`.

    Views are stacked as their HWC storage (a plain copy, not a transposing one) and handed back as CHW-shaped
    channels-last views; default_collate writes straight into shared memory, so the batch reaches the main
    process without another copy.
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return {B.INDEX: torch.empty(0, dtype=torch.int64)}
    out: B.Batch = {}
    for key in samples[0]:
        if key in (B.INDEX, B.LABEL):
            out[key] = torch.tensor([s[key] for s in samples], dtype=torch.int64)
        elif key in (B.IMAGE, B.PATCHES):
            out[key] = default_collate([s[key].movedim(-3, -1) for s in samples]).movedim(-1, -3)
        else:
            out[key] = torch.stack([s[key] for s in samples])
    return out


class ReferenceLoader(EpochLoader):
    """One rank's loader: DataLoader workers cut each batch of self.batches()."""

    collate_fn = staticmethod(collate)

    def __init__(self, table: SampleTable, recipe: PirlRecipe, *, pin_memory: bool, **kwargs):
        super().__init__(table, recipe, **kwargs)
        self.pin_memory = pin_memory
        self.dataset = self._dataset()

    def _dataset(self) -> Dataset:
        return ShardDataset(self.table, self.recipe, mode=self.mode, seed=self.seed,
                            with_geometry=self.with_geometry)

    def _iterate(self, batches):
        keys = [[(self.epoch, int(i)) for i in batch] for batch in batches]
        loader = DataLoader(
            self.dataset,
            batch_sampler=keys,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            # Its own generator: the DataLoader draws the workers' base seed from it, not the global RNG.
            generator=torch.Generator().manual_seed(derive_seed(PURPOSE_LOADER, self.seed, self.epoch)),
        )
        yield from loader


class MainProcessDecodeLoader(ReferenceLoader):
    """One rank's loader whose workers read, check and draw each sample, and whose main process decodes every
    batch on `device` and cuts its views there (pipelines/device_decode.py)."""

    collate_fn = staticmethod(collate_encoded)

    def __init__(self, table: SampleTable, recipe: PirlRecipe, *, device: torch.device, **kwargs):
        self.device = device
        super().__init__(table, recipe, pin_memory=False, **kwargs)  # the workers hand over bytes: nothing to pin

    def _dataset(self) -> Dataset:
        return EncodedDataset(self.table, self.recipe, mode=self.mode, seed=self.seed)

    def _iterate(self, batches):
        for encoded in super()._iterate(batches):
            with record_function("decode"):  # inside the training loop's data_wait
                yield decode_and_cut(encoded, self.recipe, mode=self.mode, with_geometry=self.with_geometry,
                                     device=self.device)


def make_loader(shard_dir: str, recipe: PirlRecipe, **kwargs) -> ReferenceLoader:
    """Reference-backend loader over the shards of tools/make_shards.py.

    Yields the uint8 loader batch (pipelines/batch.py); pipelines.augment.BatchAugment turns it into the model
    batch. mode="pretrain": shuffled epochs of image + patches + index (+ label); mode="eval": identity order,
    image = resize + centre crop, index + label.

    kwargs: the arguments of every backend (pipelines/loader_front.py LoaderArgs: batch_size, num_workers, rank=0,
    world_size=1, seed=0, mode="pretrain", with_geometry=False) and this backend's own (_own_options):
    pin_memory=None pins when CUDA is available. decode_device="workers" (the DataLoader workers decode and cut),
    or "cpu", "cuda" or a torch.device (e.g. the rank's GPU): the main process decodes each batch there and cuts
    its views there; `image` and `patches` then live on that device, index, label and geometry on the host.
    """
    return open_loader("reference", shard_dir, recipe, kwargs, options=_own_options, loader=_loader)


def _own_options(*, pin_memory: bool | None = None, decode_device: str | torch.device = "workers") -> dict:
    """The reference backend's own make_loader options, checked, as _loader's keyword arguments."""
    return {"device": decode_device_of(decode_device), "pin_memory": pin_memory}


def _loader(table: SampleTable, recipe: PirlRecipe, *, device: torch.device | None, pin_memory: bool | None,
            **kwargs) -> ReferenceLoader:
    """The loader of the decode device: the workers' (device None), else the main process decoding on it."""
    if device is not None:
        return MainProcessDecodeLoader(table, recipe, device=device, **kwargs)
    return ReferenceLoader(table, recipe, pin_memory=resolve_pin_memory(pin_memory), **kwargs)
