"""What each method (config `method`) trains: its network, its per-step targets and the terms it logs.

One training loop (train/pirl.py) runs them all on the same pipelines and schedule, so a comparison between
methods differs in the objective only (paper section 3's baselines):
- pirl: eq. 5, the image view and It against a memory bank (PIRL-Jigsaw, or PIRL-Rotation with
  data.recipe.jigsaw_view=rotation, or both with rotation_jigsaw);
- npid: NPID++, eq. 5 with lambda = 0: the image view alone against the bank (loss.lam is not read);
- jigsaw: which of model.num_permutations fixed permutations shuffled It's patches (Noroozi & Favaro 2016);
- rotation: by how many quarter turns It was rotated (Gidaris et al. 2018);
- supervised: the image view's class label (labelled shards): the paper's supervised row, the ceiling a
  pretraining method is measured against on the same budget. With the kNN monitor on, knn.test_shards must have
  the training shards' classes (pipelines/class_index.py), as the probe's test shards must. With
  model.init_checkpoint (a pretrained trunk, init_trunk) and data.subset / data.subset_fraction (a labelled
  subset) it is the paper's semi-supervised fine-tuning (Table 3; train/configs/finetune.yaml), scored on
  eval.test_shards (train/classifier_eval.py);
- simclr: SimCLR (Chen et al. 2020): NT-Xent of two image views (data.recipe.jigsaw_view=image) over the
  global batch, through a BatchNorm MLP head;
- moco: MoCo v2 (Chen et al. 2020, "Improved baselines"): InfoNCE of the image view's query against the second
  view's key from a momentum encoder and a queue of earlier keys (model/moco.py; train/pair_methods.py runs both).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from pirl_trainer.model.covariant import CovariantNet, classification_loss, draw_permutation_ids
from pirl_trainer.model.heads import HEAD_NORMS
from pirl_trainer.model.moco import MoCoNet
from pirl_trainer.model.pirl import PIRLNet
from pirl_trainer.model.simclr import SimCLRNet
from pirl_trainer.pipelines.augment import draw_params
from pirl_trainer.pipelines.class_index import check_same_classes, manifest_classes
from pirl_trainer.train import checkpoint
from pirl_trainer.train.config import ConfigError, PirlConfig

METHODS = ("pirl", "npid", "jigsaw", "rotation", "supervised", "simclr", "moco")
CONTRASTIVE = ("pirl", "npid")  # a memory bank and the NCE loss; the others classify and need no bank
# The view each classification method reads: its target is what was done to It.
COVARIANT_VIEWS = {"jigsaw": "jigsaw", "rotation": "rotation"}
# The two-view methods (train/pair_methods.py): It is a second image view; negatives from the batch or a queue.
PAIR_VIEWS = {"simclr": "image", "moco": "image"}
# Logged means per method (log.jsonl, TensorBoard, the progress line shows `loss`).
LOG_TERMS = {
    "pirl": ("loss", "loss_jigsaw", "loss_image", "pos_image", "neg_image"),
    "npid": ("loss", "loss_image", "pos_image", "neg_image"),
    "jigsaw": ("loss", "accuracy"),
    "rotation": ("loss", "accuracy"),
    "supervised": ("loss", "accuracy"),
    # pos: cosine similarity to the positive; accuracy: the positive ranked first (simclr: of the 2N - 1 other
    # views; moco: above every queued key); neg: the mean similarity to the queue
    "simclr": ("loss", "pos", "accuracy"),
    "moco": ("loss", "pos", "neg", "accuracy"),
}


def check_method(cfg: PirlConfig) -> None:
    """ConfigError for an unknown method or a recipe whose It view the method cannot learn from."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {cfg.method!r}")
    view = cfg.data.recipe.jigsaw_view
    wanted = COVARIANT_VIEWS.get(cfg.method, PAIR_VIEWS.get(cfg.method))
    if wanted is not None and view != wanted:
        # rotation_jigsaw moves the tiles between cells: the permutation label would no longer be the truth.
        raise ConfigError(f"method={cfg.method} learns from the {wanted!r} view: set data.recipe.jigsaw_view="
                          f"{wanted} (got {view!r}; train/configs/methods/{cfg.method}.yaml does)")
    if cfg.model.head_norm not in HEAD_NORMS:
        raise ConfigError(f"model.head_norm must be one of {HEAD_NORMS}, got {cfg.model.head_norm!r}")
    if cfg.method == "jigsaw" and cfg.model.num_permutations < 2:
        raise ConfigError(f"model.num_permutations must be >= 2, got {cfg.model.num_permutations}")
    if cfg.method in CONTRASTIVE and (cfg.data.subset or cfg.data.subset_fraction):
        # the bank holds a row for every sample and draws negatives from all of them, rows no step would update
        raise ConfigError(f"data.subset / data.subset_fraction select what a classification method trains on; "
                          f"method={cfg.method}'s memory bank needs every sample")
    if cfg.method in PAIR_VIEWS and (cfg.data.subset or cfg.data.subset_fraction):
        raise ConfigError(f"data.subset / data.subset_fraction select what a classification method trains on; "
                          f"method={cfg.method} pretrains without labels on every sample")
    for method, key in (("simclr", "simclr_tau"), ("moco", "moco_tau")):
        if cfg.method == method and not getattr(cfg.loss, key) > 0:
            raise ConfigError(f"loss.{key} must be > 0, got {getattr(cfg.loss, key)}")
    if cfg.method == "moco" and not 0.0 <= cfg.loss.moco_momentum < 1.0:
        raise ConfigError(f"loss.moco_momentum must be in [0, 1), got {cfg.loss.moco_momentum}")
    if cfg.eval.test_shards and cfg.method != "supervised":
        raise ConfigError(f"eval.test_shards scores method=supervised's classifier; method={cfg.method} has none "
                          "(its trunk: knn.* while training, train/linear_probe.py after)")


def build_net(cfg: PirlConfig, classes: list[str] | None = None) -> nn.Module:
    """PIRLNet for the contrastive methods, SimCLRNet / MoCoNet for the two-view ones, the trunk + a classifier for
    the others; the trunk is `trunk` in all, so the linear probe, the kNN monitor and tools/export.py read every
    method's checkpoint. `classes`: the training shards' class names (the loader's `classes`), which
    method=supervised needs."""
    tiles = cfg.data.recipe.view_tiles
    if cfg.method in CONTRASTIVE:
        return PIRLNet(cfg.model.arch, embed_dim=cfg.model.embed_dim, num_patches=tiles, head_norm=cfg.model.head_norm)
    if cfg.method == "simclr":
        return SimCLRNet(cfg.model.arch, embed_dim=cfg.model.embed_dim)
    if cfg.method == "moco":  # the query network; its key encoder is train/pair_methods.py's build_momentum_keys
        return MoCoNet(cfg.model.arch, embed_dim=cfg.model.embed_dim)
    if cfg.method == "supervised" and not classes:
        raise ConfigError(f"method=supervised learns the class labels, but data.shards={cfg.data.shards!r} is not "
                          "labelled: make the shards from class folders (tools/make_shards.py)")
    if cfg.method == "supervised" and cfg.knn.every > 0 and cfg.knn.test_shards:
        # the monitor votes with its own training shards' labels; this is the classifier's index against the test's
        check_same_classes("method=supervised (data.shards against knn.test_shards)", cfg.data.shards, classes,
                           cfg.knn.test_shards, manifest_classes(cfg.knn.test_shards))
    return CovariantNet(cfg.method, cfg.model.arch, num_permutations=cfg.model.num_permutations, num_patches=tiles,
                        num_classes=len(classes) if cfg.method == "supervised" else None)


def init_trunk(net: nn.Module, path: str | Path, arch: str) -> None:
    """Load the trunk of a train/pirl.py checkpoint of any method (weights_only) into net.trunk, exactly; the
    heads and the classifier keep their fresh initialisation. Errors name the file: missing, without trunk
    weights, or of another arch than `arch` (model.arch)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_checkpoint: {path}: no such checkpoint file")
    try:
        trained, weights = checkpoint.trunk_weights(checkpoint.load(path), path)
    except ValueError as err:
        raise ValueError(f"model.init_checkpoint: {err}") from None
    if trained is not None and trained != arch:
        raise ValueError(f"model.init_checkpoint: {path} holds a {trained} trunk, this run's model.arch is {arch}: "
                         f"set --model.arch={trained}")
    try:
        net.trunk.load_state_dict(weights)
    except RuntimeError as err:  # a checkpoint without its config: the keys or shapes tell
        raise ValueError(f"model.init_checkpoint: {path}'s trunk does not fit model.arch={arch}: "
                         f"{str(err).splitlines()[0]}") from None


def unused_parameters(cfg: PirlConfig) -> bool:
    """Whether a head gets no gradient (DDP must be told): NPID++ never calls g, and lambda 0 or 1 drops a term."""
    return cfg.method == "npid" or (cfg.method == "pirl" and cfg.loss.lam in (0.0, 1.0))


def covariant_target(cfg: PirlConfig, step: int, epoch: int, index: torch.Tensor,
                     label: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) int64 class of each sample for jigsaw / rotation / supervised, on index's device.

    supervised: the batch's labels. jigsaw: a permutation id per (seed, step, global index), which CovariantNet
    applies to the patch features (the same as shuffling the patches: the trunk sees each patch alone). rotation:
    the quarter turns the batched stage applied to It, recomputed from its own draw (seed, epoch, global index).
    """
    if cfg.method == "supervised":
        return label.to(index.device)
    if cfg.method == "jigsaw":
        return draw_permutation_ids(cfg.run.seed, step, index, cfg.model.num_permutations)
    return draw_params(cfg.data.recipe, cfg.run.seed, epoch, index.cpu()).view_rotation.to(index.device)


def covariant_losses(cfg: PirlConfig, net: nn.Module, image: torch.Tensor, patches: torch.Tensor,
                     index: torch.Tensor, label: torch.Tensor | None, step: int, epoch: int, autocast) -> dict:
    """The step of jigsaw / rotation / supervised up to the loss: the classifier's logits of the view it reads
    (supervised: the image view, the others: It's patches) against covariant_target; `loss` and `accuracy`."""
    target = covariant_target(cfg, step, epoch, index, label)
    views = image[:, None] if cfg.method == "supervised" else patches  # supervised: the image view
    with autocast:
        logits = net(views, target if cfg.method == "jigsaw" else None)
    return classification_loss(logits, target)
