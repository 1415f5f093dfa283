"""kNN monitor: weighted k-nearest-neighbour top-1 of the trunk's res5 features, cheap enough to run while pretraining.

    monitor = KnnMonitor(train_shards, test_shards, recipe, backend="reference", batch_size=256, num_workers=4)
    monitor.evaluate(trunk, device)   # {"knn_top1": 41.3, "knn_k": 20, "knn_num_train": ..., "knn_num_test": ...}

Wu et al. 2018 (NPID), section 3.4: features are the L2-normalised pooled res5 v of the centre-cropped eval view
(the same extraction as train/linear_probe.py, shared code); each test image takes its k most cosine-similar
training images and every neighbour votes for its class with weight exp(sim / T); top-1 = the class with the
largest vote. No training, no hyperparameters to tune: a trend line for the representation during pretraining,
not a replacement for the linear probe. The training and test shards must have equal manifest `classes`, as for
the probe: the monitor refuses others when it is built, naming the first difference (pipelines/class_index.py).

Defaults: T = 0.07 is NPID's temperature (the same tau as its NCE loss and PIRL's: docs PIRL.md, "Loss").
k = 20 follows DINO (Caron et al. 2021: "20 NN consistently works best" with T = 0.07); NPID's own code uses
k = 200, which outvotes a small class with its neighbours of other classes when a class has far fewer than 200
training images. k is capped at the number of training features, so tiny labelled sets still work.

BatchNorm: the trunk's running statistics (eval mode); a precise-BN pass would overwrite the training model's
statistics. Every module's train/eval flag is restored afterwards.

Distributed runs: call evaluate on the main process only, with the unwrapped trunk
(accelerator.unwrap_model(net).trunk): a DDP-wrapped module would wait on a collective the other ranks never join.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from pirl_trainer import pipelines
from pirl_trainer.pipelines.class_index import check_same_classes
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.train.linear_probe import extract_features

CHUNK = 4096  # rows per similarity block: a (CHUNK, CHUNK) fp32 block is 64 MiB, whatever the set sizes


def subsample_indexes(num_samples: int, cap: int | None) -> torch.Tensor | None:
    """`cap` evenly spaced global sample indexes (None = all). Spread over the whole set, not its first `cap`:
    tools/make_shards.py writes the samples class by class, so a prefix would hold a few classes only."""
    if cap is None or cap >= num_samples:
        return None
    if cap < 1:
        raise ValueError(f"a sample cap must be >= 1 or None, got {cap}")
    return torch.arange(cap, dtype=torch.int64) * num_samples // cap  # floor(i * N / cap): distinct, sorted


def knn_votes(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int, k: int,
              temperature: float, chunk: int = CHUNK) -> torch.Tensor:
    """(T, num_classes) votes: the sum of exp(sim / temperature) over each test row's k most similar train rows.

    train (N, D) and test (T, D) are L2-normalised, so sim is the cosine. Blocks of `chunk` x `chunk` similarities
    keep memory bounded for any N: each test block keeps a running top-k merged with every train block's.
    """
    k = min(k, len(train))
    votes = []
    for query in test.split(chunk):
        best_sim = query.new_empty(len(query), 0)
        best_idx = torch.empty(len(query), 0, dtype=torch.int64, device=query.device)
        for start in range(0, len(train), chunk):
            sim = query @ train[start:start + chunk].T  # (q, c)
            sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
            best_sim, best_idx = torch.cat([best_sim, sim], 1), torch.cat([best_idx, idx + start], 1)
            best_sim, pos = best_sim.topk(min(k, best_sim.shape[1]), dim=1)
            best_idx = best_idx.gather(1, pos)
        weight = (best_sim / temperature).exp()  # (q, k); sim <= 1 so at most exp(1/T) = 1.6e6 at T=0.07
        votes.append(weight.new_zeros(len(query), num_classes).scatter_add_(1, train_labels[best_idx], weight))
    return torch.cat(votes)


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             k: int, temperature: float, chunk: int = CHUNK) -> float:
    """Top-1 in percent of the weighted kNN vote (knn_votes) against test_labels."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = knn_votes(train, train_labels, test, num_classes, k, temperature, chunk)
    return 100.0 * (votes.argmax(1) == test_labels).float().mean().item()


class KnnMonitor:
    """Holds the two eval-mode loaders; evaluate() extracts both feature sets afresh (the trunk moves) and votes.

    recipe: the run's PirlRecipe (mean, std, image_size); image_size overrides its centre-crop size (0 = keep).
    max_train / max_test: evenly spaced subsets (subsample_indexes), fixed for the run, so successive values
    are comparable; None = the whole set.
    """

    def __init__(self, train_shards: str, test_shards: str, recipe: PirlRecipe, *, image_size: int = 0,
                 backend: str = "reference", batch_size: int = 256, num_workers: int = 2, k: int = 20,
                 temperature: float = 0.07, max_train: int | None = None, max_test: int | None = None):
        if k < 1 or temperature <= 0:
            raise ValueError(f"the kNN monitor needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        self.recipe = replace(recipe, image_size=image_size or recipe.image_size)  # never edits the run's recipe
        self.k, self.temperature = k, temperature
        self.train_loader, self.train_keep = self._loader(train_shards, max_train, backend, batch_size, num_workers)
        self.test_loader, self.test_keep = self._loader(test_shards, max_test, backend, batch_size, num_workers)
        # at construction too: the votes name training classes and are scored against the test labels
        check_same_classes("kNN monitor", train_shards, self.train_loader.classes, test_shards,
                           self.test_loader.classes)

    def _loader(self, shards: str, cap: int | None, backend: str, batch_size: int, num_workers: int):
        loader = pipelines.make_loader(backend, shards, self.recipe, batch_size=batch_size,
                                       num_workers=num_workers, mode="eval")
        if not loader.labelled:  # at construction: a bad path fails at start-up, not at the first evaluation
            raise ValueError(f"{shards} has no labels: the kNN monitor needs labelled shards")
        keep = subsample_indexes(loader.num_samples, cap)
        if keep is not None and loader.selectable:
            loader.select(keep.numpy())  # only the kept samples are read and decoded
        # DALI's loader reads every sample; extract_features drops the rows outside `keep` by index: the same
        # subset, only not cheaper
        return loader, keep

    @torch.no_grad()
    def evaluate(self, trunk: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str) -> dict:
        """{"knn_top1": percent, "knn_k": k used, "knn_num_train", "knn_num_test"}.

        trunk: a module or function mapping model-ready images (B, 3, S, S) to pooled res5 features (B, D), e.g.
        model/trunk.py's trunk. A module is put in eval mode and every submodule's flag restored afterwards.
        """
        modes = {m: m.training for m in trunk.modules()} if isinstance(trunk, torch.nn.Module) else {}
        if isinstance(trunk, torch.nn.Module):
            trunk.eval()
        try:
            def features(image: torch.Tensor) -> dict[str, torch.Tensor]:
                return {"res5": F.normalize(trunk(image).float(), dim=1)}  # (B, D), unit rows: dot = cosine

            device = torch.device(device)
            train, y_train = extract_features(features, self.train_loader, self.recipe, device=device,
                                              keep=self.train_keep, desc="kNN features (train)")
            test, y_test = extract_features(features, self.test_loader, self.recipe, device=device,
                                            keep=self.test_keep, desc="kNN features (test)")
        finally:
            for module, training in modes.items():
                module.training = training  # per module: a parent's .train() would overwrite children kept in eval
        top1 = knn_top1(train["res5"], y_train, test["res5"], y_test, self.k, self.temperature)
        return {"knn_top1": top1, "knn_k": min(self.k, len(y_train)),
                "knn_num_train": len(y_train), "knn_num_test": len(y_test)}
