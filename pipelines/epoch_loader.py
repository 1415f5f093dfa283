"""What every backend's loader shares: which samples one rank reads in which step, and how it counts corrupt ones.

The order comes from pipelines/sampler.py and nothing else, so every backend keeps the same guarantees: each
sample exactly once per epoch over all ranks, the same number of steps on every rank, a full shuffle, and an
exact resume from any step (set_epoch(epoch, start_step)). Backends differ only in how they cut the views.
Its arguments reach it bound and checked by pipelines/loader_front.py (LoaderArgs).
With a subset (set_subset: a labelled fraction for fine-tuning, pipelines/subset.py) the same holds for the
subset's samples: the sampler orders positions 0..K-1 of the subset, which map to their global indexes.

Corrupt samples: every backend leaves out of its batch a sample whose JPEG fails pipelines/jpeg_check.py or its
decoder. Nothing fills the hole: that batch is one sample shorter, and every rank still takes the same steps.
EpochLoader notices the gap against the sampler's order, names the sample, counts it and stops the epoch with
CorruptSamples past max_skipped_per_epoch.
"""

import sys

import numpy as np

from pirl_trainer.pipelines import batch as B
from pirl_trainer.pipelines.jpeg_check import jpeg_problem
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.pipelines.sampler import epoch_batches, rank_sample_count, steps_per_epoch
from pirl_trainer.pipelines.shard_index import SampleTable, ShardReader, read_labels

# Corrupt samples one rank may skip in an epoch before the loader stops (data.max_skipped_per_epoch): a few
# bad files are normal in web-scale sets; thousands mean damaged shards, better fixed than trained around.
DEFAULT_MAX_SKIPPED = 100


class CorruptSamples(RuntimeError):
    """More corrupt samples in one epoch than the loader's max_skipped_per_epoch; names the last one."""


class EpochLoader:
    """One rank's view of the epochs. len() = steps per epoch, the same on every rank; iterate after set_epoch().

    Subclasses implement _iterate(batches): the loader batches of `batches` (self.batches()), in order, each
    without the samples that turned out corrupt. `skipped` lists the global indexes skipped so far in the
    current iteration (this rank, this epoch from its start step); `batch_skipped` those of the last batch.
    """

    max_skipped_per_epoch = DEFAULT_MAX_SKIPPED
    # select() and set_subset() work where _iterate reads its order from batches(); DALI's source plans its epochs
    # itself.
    selectable = True

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
        # an eval loader may be shuffled too (the online probe's training on eval views); DALI's plans its own order
        self.shuffle = mode == "pretrain"
        self.with_geometry = with_geometry
        self._steps = steps_per_epoch(table.num_samples, batch_size, world_size)
        self.rank_samples = rank_sample_count(table.num_samples, batch_size, world_size, rank)  # per epoch
        self.epoch = 0
        self.start_step = 0
        self.skipped: list[int] = []
        self.batch_skipped = 0
        self._reader: ShardReader | None = None  # opened for a skipped sample's reason only
        self._selection: list[np.ndarray] | None = None  # select(): a fixed plan replacing the sampler's
        self.subset: np.ndarray | None = None  # set_subset(): the sorted global indexes an epoch covers

    @property
    def num_samples(self) -> int:
        """Samples in the shards: global indexes run over 0..num_samples-1, subset or not (bank rows, labels)."""
        return self.table.num_samples

    @property
    def epoch_samples(self) -> int:
        """Samples one epoch reads over all ranks: the subset's, else every sample."""
        return self.num_samples if self.subset is None else len(self.subset)

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
        return self._steps if self._selection is None else len(self._selection)

    def select(self, indexes) -> None:
        """From now on read only these global sample indexes, in this order, batch_size at a time, every epoch: an
        eval loader over a fixed subset (the kNN monitor's), where only the selected samples are read and decoded."""
        if self.mode != "eval":
            raise ValueError("select() is for eval loaders: a pretraining epoch reads every sample once")
        if self.world_size != 1:
            raise ValueError(f"select() reads the subset on one process, this loader is rank {self.rank} of "
                             f"{self.world_size}")
        if not self.selectable:
            raise NotImplementedError(f"{type(self).__name__} plans its epochs itself and cannot read a subset")
        indexes = np.asarray(indexes, dtype=np.int64).reshape(-1)
        if len(indexes) == 0 or indexes.min() < 0 or indexes.max() >= self.num_samples:
            raise IndexError(f"select() needs a non-empty set of indexes in [0, {self.num_samples}), got "
                             f"{len(indexes)} in [{indexes.min() if len(indexes) else '-'}, "
                             f"{indexes.max() if len(indexes) else '-'}]")
        self._selection = [indexes[i : i + self.batch_size] for i in range(0, len(indexes), self.batch_size)]
        self.set_epoch(self.epoch)

    def set_subset(self, indexes) -> None:
        """From now on every epoch covers only these global sample indexes: each exactly once per epoch over all
        ranks, shuffled per (seed, epoch) in pretrain mode, the same steps on every rank, exact resume; len() and
        global_batch_size() count the subset. A sample keeps its global index (its label, its bank row)."""
        if not self.selectable:
            raise NotImplementedError(f"{type(self).__name__} plans its epochs itself and cannot read a subset: "
                                      "use the reference or the ffcv backend")
        if self._selection is not None:
            raise ValueError("set_subset() on a loader that select() has fixed to a plan")
        indexes = np.asarray(indexes, dtype=np.int64).reshape(-1)
        if len(indexes) == 0 or indexes.min() < 0 or indexes.max() >= self.num_samples:
            raise IndexError(f"set_subset() needs a non-empty set of indexes in [0, {self.num_samples}), got "
                             f"{len(indexes)}" + (f" in [{indexes.min()}, {indexes.max()}]" if len(indexes) else ""))
        indexes = np.unique(indexes)
        self._steps = steps_per_epoch(len(indexes), self.batch_size, self.world_size)
        self.rank_samples = rank_sample_count(len(indexes), self.batch_size, self.world_size, self.rank)
        self.subset = indexes
        self.set_epoch(self.epoch)

    def sample_labels(self, indexes) -> np.ndarray:
        """(n,) int64 labels of these global sample indexes, read without decoding any image."""
        return read_labels(self.table, indexes)

    def global_batch_size(self, step: int) -> int:
        """Samples all ranks read together at step `step` of an epoch: W*B, the rest of the epoch at the last."""
        if not 0 <= step < self._steps:
            raise ValueError(f"step must be in [0, {self._steps}), got {step}")
        window = self.world_size * self.batch_size
        return window if step < self._steps - 1 else self.epoch_samples - (self._steps - 1) * window

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (its order and its augmentations) and the step to start from (exact resume)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step must be in [0, {len(self)}], got {start_step}")
        self.epoch = epoch
        self.start_step = start_step

    def skip(self, steps: int) -> None:
        """Start the current epoch `steps` batches later."""
        self.set_epoch(self.epoch, self.start_step + steps)

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of global indexes for the current epoch, from its start step."""
        if self._selection is not None:
            return self._selection[self.start_step:]
        batches = epoch_batches(
            self.epoch_samples, self.batch_size, rank=self.rank, world_size=self.world_size,
            seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, start_step=self.start_step,
        )
        return batches if self.subset is None else [self.subset[positions] for positions in batches]

    def __iter__(self):
        batches = self.batches()
        self.skipped, self.batch_skipped = [], 0
        for offset, batch in enumerate(self._iterate(batches)):  # run to its end: backends finish epochs there
            want, got = batches[offset], batch[B.INDEX]
            self.batch_skipped = len(want) - len(got)
            if self.batch_skipped:
                self._count_skipped(self.start_step + offset, want, got.cpu().numpy())
            yield batch

    def _iterate(self, batches: list[np.ndarray]):
        raise NotImplementedError

    def _count_skipped(self, step: int, want: np.ndarray, got: np.ndarray) -> None:
        for i in np.setdiff1d(want, got).tolist():
            self.skipped.append(i)
            where, why = self.sample_location(i), self.skip_reason(i)
            if len(self.skipped) > self.max_skipped_per_epoch:
                raise CorruptSamples(
                    f"{where}: {why}: corrupt sample {len(self.skipped)} of epoch {self.epoch} on rank {self.rank}, "
                    f"more than max_skipped_per_epoch = {self.max_skipped_per_epoch} (data.max_skipped_per_epoch): "
                    "check the shards with tools/make_shards.py --verify, or remake them"
                )
            print(f"warning: skipped {where} ({why}): {len(self.skipped)} skipped in epoch {self.epoch} on rank "
                  f"{self.rank}", file=sys.stderr, flush=True)
        if len(got) == 0:
            raise CorruptSamples(f"every sample of step {step} of epoch {self.epoch} on rank {self.rank} is corrupt "
                                 f"(e.g. {self.sample_location(int(want[0]))}): no batch to train on")

    def sample_location(self, i: int) -> str:
        """Where sample i is stored, for messages: its shard and index."""
        return f"{self.table.tar_paths[int(self.table.shard[i])]} sample {i:09d}"

    def skip_reason(self, i: int) -> str:
        """Why sample i was skipped: its bytes re-read and checked here (a worker's exception stays there)."""
        if self._reader is None:
            self._reader = ShardReader(self.table)
        return jpeg_problem(self._reader.read(i).jpg) or "its JPEG could not be decoded"
