"""Linear probes: a frozen trunk's pooled res2..res5 features -> one linear classifier per stage; best top-1.

    python train/linear_probe.py --checkpoint=runs/pirl/checkpoints/step_000001000.pt \
        --train_shards=shards/train --test_shards=shards/test --output=runs/pirl/probe.json
    python train/linear_probe.py --arch=resnet18 --image_size=112 ...   # no checkpoint: random-init baseline
    python train/linear_probe.py --layers=[res4,res5] ...               # a subset of the stages
    accelerate launch train/linear_probe.py --mode=online ...           # ImageNet: train/online_probe.py

Two modes (`mode`). "cached" (the default, below) keeps every training image's pooled features in memory and fits
each stage's classifier on them: minutes on Imagenette, ~147 GB on ImageNet, where it refuses to start when the
features would not fit in the available memory. "online" (train/online_probe.py) trains every stage's classifier
on the fly from one frozen-trunk pass per augmented batch, Goyal et al. 2019's ImageNet protocol, on any number
of processes; its memory does not grow with the data. Both write the same result keys.

The PIRL paper's protocol (after Goyal et al. 2019; docs PIRL.md, "Evaluation"): a linear classifier on the
frozen features of each stage res2..res5, the best layer reported. All stages come out of one forward pass
(resize + centre crop, no augmentation); features are extracted once, standardised with the training set's
statistics, and each stage gets a multinomial logistic regression trained with Adam on the cached features.
Its L2 weight decay is chosen per stage, as Goyal et al. 2019 choose their classifiers' cost per layer: one
classifier per value of `weight_decays` is fitted on the training features less a held-out `validation_fraction`,
the value with the best top-1 on that held-out part is kept, and the classifier is refitted with it on all the
training features; the test set is only used once, by that classifier. (A stage's best value differs with its
dimension and the trunk: docs/evaluation.md, "Linear probe".) The result's "top1" is the best stage's; "per_layer" holds
every stage's, "weight_decay" and "per_layer_validation" the chosen values and their held-out top-1, "bn" the
BatchNorm statistics used ("precise" or "running"). Training and test shards must have equal manifest `classes`
(a label is a position in that list; tools/make_shards.py --classes gives a test set the training set's), else the
probe refuses before extracting any feature, naming the first difference (pipelines/class_index.py).

Pooling per stage (pool_grid): res2..res4 are average-pooled to a g x g grid with g = round(sqrt(9216 / C)) for
C channels, i.e. about 9,000 dimensions whatever the trunk, as Goyal et al. 2019 do (their VISSL config pools
ResNet-50's res2/res3/res4 to 6x6/4x4/3x3: 9216/8192/9216 dims; the rule reproduces exactly those grids). res5 is
the global average pool, the v of PIRL section 2.3 and the trunk's own output (VISSL's "res5avg"; its 2x2 "res5"
variant is left out: the paper's features are v). adaptive_avg_pool2d makes the dimension independent of the
image size (a stage map smaller than its grid is replicated, not an error):

| stage | resnet18/34: C, grid, dims | resnet50: C, grid, dims |
|-------|----------------------------|-------------------------|
| res2  | 64, 12x12, 9216            | 256, 6x6, 9216          |
| res3  | 128, 8x8, 8192             | 512, 4x4, 8192          |
| res4  | 256, 6x6, 9216             | 1024, 3x3, 9216         |
| res5  | 512, 1x1, 512              | 2048, 1x1, 2048         |
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from pirl_trainer import pipelines
from pirl_trainer.model.trunk import build_trunk
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.class_index import check_same_classes
from pirl_trainer.pipelines.recipe import PirlRecipe
from pirl_trainer.train import checkpoint
from pirl_trainer.train.classifier_eval import topk_correct
from pirl_trainer.train.config import ConfigError, config_from_cli

# The paper's stage names -> torchvision's ResNet attributes, in forward order.
STAGES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
MODES = ("cached", "online")
POOLED_DIMS = 9216  # target dimension of a pooled res2..res4 feature: Goyal et al. 2019's "about 9k" (VISSL: 6*6*256)


@dataclass
class ProbeConfig:
    """Fields named online_* are read by the online mode only; epochs, lr, weight_decays, validation_fraction and
    precise_bn by the cached mode only (the online mode uses the trunk's running BatchNorm statistics: bn =
    "running"); the others by both."""

    # "cached": every training feature in memory, one classifier fitted per stage on them; "online": classifiers
    # trained on the fly over augmented batches (train/online_probe.py), for sets whose features do not fit
    mode: str = "cached"
    train_shards: str = ""  # labelled shards the classifier is fitted on (required)
    test_shards: str = ""  # labelled shards top-1 is measured on (required)
    checkpoint: str = ""  # a train/pirl.py checkpoint; empty = a randomly initialised trunk (the baseline)
    arch: str = ""  # trunk architecture; empty = the checkpoint's (resnet50 without a checkpoint)
    image_size: int = 0  # centre-crop size; 0 = the checkpoint's recipe.image_size (224 without one)
    backend: str = "reference"  # a key of pipelines.BACKENDS
    # backend=reference only: "workers" decode in the loader workers; "cuda" (the process's GPU) or "cpu": the
    # workers read and the main process decodes each batch, as in pretraining (docs/pipelines.md)
    decode_device: str = "workers"
    batch_size: int = 64  # feature-extraction batch; online: the training batch per process
    num_workers: int = 2  # loader workers (reference: DataLoader workers; dali: threads)
    epochs: int = 100  # passes of the classifier over the cached features
    lr: float = 1e-3  # Adam on standardised features
    weight_decays: list[float] = field(default_factory=lambda: [1e-4, 5e-4, 2e-3, 1e-2, 5e-2, 0.2])  # L2 on the
    # classifier, chosen per stage on held-out training features (module docstring); one value = no choice
    validation_fraction: float = 0.2  # share of the training features held out to choose the weight decay
    seed: int = 0  # trunk init (random baseline) and classifier init/order
    precise_bn: bool = True  # re-estimate BatchNorm statistics on the probe's training images first ("precise");
    # false = the trunk's own running statistics ("running")
    layers: list[str] = field(default_factory=lambda: list(STAGES))  # stages probed, a subset of res2..res5
    output: str = ""  # JSON result path; empty = print only (online: online_out_dir/probe.json)
    # Goyal et al. 2019's ImageNet linear classifiers, which PIRL's evaluation follows: 28 epochs of SGD,
    # batch 256, rate 0.01 divided by 10 after epochs 8, 16 and 24, momentum 0.9, weight decay 5e-4
    online_epochs: int = 28
    online_lr: float = 0.01  # at online_reference_batch, scaled linearly with the global batch (Goyal et al. 2019)
    online_reference_batch: int = 256  # the global batch online_lr is quoted for (Goyal et al. 2019)
    # epochs of the 28-epoch schedule after which the rate is multiplied by online_lr_decay (Goyal et al. 2019);
    # another online_epochs scales them (m x online_epochs / 28, rounded to a step)
    online_lr_milestones: list[int] = field(default_factory=lambda: [8, 16, 24])
    online_lr_decay: float = 0.1  # (Goyal et al. 2019)
    online_momentum: float = 0.9  # SGD momentum (Goyal et al. 2019)
    online_weight_decay: float = 5e-4  # L2 on the classifiers, biases included (Goyal et al. 2019)
    online_eval_every: int = 1  # epochs between scorings of the test shards; the run's last step is always scored
    online_out_dir: str = "runs/online_probe"  # checkpoints, config.yaml, log.jsonl, TensorBoard events, probe.json
    online_log_every: int = 10  # steps between host syncs for the progress bar and the logs
    online_ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    online_max_steps: int = -1  # stop after this many global steps (a budget for smoke runs); -1 = the schedule
    online_tensorboard: bool = True  # TensorBoard events in online_out_dir/tensorboard/ (log.jsonl either way)
    # what the heads train on: "random_resized" (Goyal et al. 2019: random resized crop + flip) or "centre" (the
    # eval view, shuffled: the cached probe's training images, to compare the two modes like for like)
    online_train_view: str = "random_resized"
    online_cpu: bool = False  # force the CPU even where a GPU is present
    # the frozen trunk's forward as pretraining runs it on GPUs (run.bf16, run.channels_last; imagenet_r50.yaml sets
    # both): bfloat16 autocast and NHWC memory format; the features, the heads and their step stay float32
    online_bf16: bool = False
    online_channels_last: bool = False


def load_trunk(cfg: ProbeConfig) -> tuple[torch.nn.Module, str, PirlRecipe]:
    """(the trunk in eval mode, its arch, the recipe its views are cut with): `checkpoint`'s trunk of any method,
    or without one a random trunk of `arch` seeded with `seed`. A checkpoint that does not fit is a ConfigError
    naming it."""
    recipe_fields: dict = {}
    arch = cfg.arch or "resnet50"
    weights = None
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        state = checkpoint.load(cfg.checkpoint)
        try:
            trained, weights = checkpoint.trunk_weights(state, cfg.checkpoint)
        except ValueError as err:
            raise ConfigError(f"checkpoint: {err}") from None
        if trained is None and not cfg.arch:
            raise ConfigError(f"checkpoint: {cfg.checkpoint} names no model.arch in its config: set --arch")
        arch = cfg.arch or trained
        recipe_fields = (state.get("config") or {}).get("data", {}).get("recipe", {})
    trunk, _ = build_trunk(arch)
    if weights is not None:
        try:
            trunk.load_state_dict(weights)
        except RuntimeError as err:  # --arch against the checkpoint's: the keys or shapes tell
            raise ConfigError(f"checkpoint: {cfg.checkpoint}'s trunk does not fit arch={arch}: "
                              f"{str(err).splitlines()[0]}") from None
    recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PirlRecipe), recipe_fields))
    if cfg.image_size:
        recipe.image_size = cfg.image_size
    return trunk.eval(), arch, recipe


def check_layers(layers: Sequence[str]) -> list[str]:
    """The requested stages in forward order; an unknown or missing name is a ConfigError naming `layers`."""
    unknown = [name for name in layers if name not in STAGES]
    if unknown or not layers:
        raise ConfigError(f"layers must be a non-empty subset of {list(STAGES)}, got {list(layers)}")
    return [name for name in STAGES if name in layers]


def pool_grid(stage: str, channels: int) -> int:
    """Side of the average-pooling grid for a stage with `channels` channels (module docstring: ~9,000 dims)."""
    if stage == "res5":
        return 1  # global average pool: PIRL's v
    return max(1, round(math.sqrt(POOLED_DIMS / channels)))


def stage_features(trunk: torch.nn.Module, image: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """{stage: (B, C * g * g) pooled features} from ONE pass through a torchvision ResNet trunk.

    Calls the trunk's submodules in the order of torchvision's ResNet._forward_impl and stops after the last
    stage asked for, so probing res2 alone does not pay for res3..res5. res5 equals trunk(image).
    """
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(image))))
    out: dict[str, torch.Tensor] = {}
    for stage, attr in STAGES.items():
        x = getattr(trunk, attr)(x)  # (B, C, H, W)
        if stage in layers:
            out[stage] = F.adaptive_avg_pool2d(x, pool_grid(stage, x.shape[1])).flatten(1).float()
            if len(out) == len(layers):
                break
    return out


@torch.no_grad()
def stage_dims(trunk: torch.nn.Module, layers: Sequence[str], image_size: int) -> dict[str, int]:
    """{stage: pooled dimension} of an eval-mode trunk, from one pass of a blank image (no statistic changes)."""
    blank = torch.zeros(1, 3, image_size, image_size, device=next(trunk.parameters()).device)
    return {name: f.shape[1] for name, f in stage_features(trunk, blank, layers).items()}


def eval_images(loader, recipe: PirlRecipe, device: torch.device | None = None, keep: torch.Tensor | None = None):
    """(uint8 loader batch, float image) pairs: the batched stage's eval form (convert, normalise).

    device: where the image is converted (the training device for the kNN monitor; None = where the loader put
    it). keep: global sample indexes to keep; other rows are dropped before conversion (a subsample).
    """
    stage = BatchAugment(recipe)
    for batch in loader:
        if keep is not None:
            rows = torch.isin(batch["index"], keep.to(batch["index"].device))
            if not rows.any():
                continue
            batch = {k: v[rows.to(v.device)] for k, v in batch.items()}
        if device is not None:
            batch = {**batch, "image": batch["image"].to(device, non_blocking=True)}
        yield batch, stage.eval(batch)["image"]


@torch.no_grad()
def recalibrate_batchnorm(trunk: torch.nn.Module, images: Iterable[torch.Tensor]) -> None:
    """Replace BatchNorm running statistics by exact averages over `images`, model-ready float batches
    ("precise BN").

    The running statistics a trunk brings were estimated on its pretraining inputs (the image view's random
    crops for PIRL, whose patch pass does not update them; the patches alone for Jigsaw), and a random trunk has
    none at all (mean 0, variance 1). Re-estimating them on the probe's own training images puts every trunk on
    the same footing; the "running" protocol (precise_bn=False) keeps them.
    """
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over all batches
    trunk.train()
    for image in tqdm(images, desc="precise BN", unit="batch", leave=False):
        trunk(image)
    trunk.eval()


@torch.no_grad()
def extract_features(
    features_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    loader,
    recipe: PirlRecipe,
    *,
    device: torch.device | None = None,
    keep: torch.Tensor | None = None,
    desc: str = "features",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One pass of an eval-mode, labelled loader through `features_fn` (model-ready images -> {name: (B, D)}).

    Returns ({name: (N, D) float32}, labels (N,) int64), rows in loader order, on the features' device. Shared by
    the linear probe and the kNN monitor (train/knn_monitor.py); `device` and `keep` as in eval_images.
    """
    if not loader.labelled:
        raise ValueError(f"{desc}: the shards have no labels; evaluation needs labelled shards")
    loader.set_epoch(0)
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    for batch, image in tqdm(eval_images(loader, recipe, device, keep), desc=desc, unit="batch", leave=False):
        out = features_fn(image)
        for name, f in out.items():
            feats.setdefault(name, []).append(f.float())
        labels.append(batch["label"].to(next(iter(out.values())).device))  # beside the features, for the kNN vote
    if not labels:
        raise ValueError(f"{desc}: the loader yielded no samples")
    return {name: torch.cat(f) for name, f in feats.items()}, torch.cat(labels)


def eval_loader(shards: str, recipe: PirlRecipe, cfg: ProbeConfig, *, mode: str = "eval", rank: int = 0,
                world_size: int = 1):
    """A loader of labelled shards (else a ValueError naming them): eval mode, or this rank's share of
    shuffled pretraining-mode epochs (mode="pretrain", the online probe's training images)."""
    if cfg.decode_device != "workers" and cfg.backend != "reference":
        raise ConfigError(f"decode_device={cfg.decode_device} applies to backend=reference only, not {cfg.backend}")
    options = {"decode_device": cfg.decode_device} if cfg.backend == "reference" else {}
    loader = pipelines.make_loader(cfg.backend, shards, recipe, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                   rank=rank, world_size=world_size, seed=cfg.seed, mode=mode, **options)
    if not loader.labelled:
        raise ValueError(f"{shards} has no labels: the linear probe needs labelled shards")
    return loader


def extract(trunk: torch.nn.Module, loader, recipe: PirlRecipe, cfg: ProbeConfig, what: str,
            layers: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Features of every stage in `layers` and the labels of an eval_loader's samples, and its class count;
    what="train" with cfg.precise_bn re-estimates the trunk's BatchNorm statistics on them first."""
    if what == "train" and cfg.precise_bn:
        loader.set_epoch(0)
        recalibrate_batchnorm(trunk, (image for _, image in eval_images(loader, recipe)))
    feats, labels = extract_features(lambda image: stage_features(trunk, image, layers), loader, recipe,
                                     desc=f"features ({what})")
    return feats, labels, len(loader.classes or [])


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decays: Sequence[float],
               cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One multinomial logistic regression per weight decay, all from the same initialisation, trained side by
    side: returns (K, D, C) weights and (K, C) biases for K = len(weight_decays).

    Adam's update is elementwise and each classifier's loss reaches only its own columns, so this is exactly K
    separate fits, for the price of one matrix product with K * C columns. The L2 term is what
    torch.optim.Adam(weight_decay=wd) adds to the gradient, biases included.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    k, dims = len(weight_decays), x.shape[1]
    bound = 1.0 / math.sqrt(dims)  # torch.nn.Linear's default initialisation
    weight = ((torch.rand(dims, num_classes, generator=gen) * 2 - 1) * bound).repeat(1, k).requires_grad_()
    bias = ((torch.rand(num_classes, generator=gen) * 2 - 1) * bound).repeat(k).requires_grad_()
    decay = torch.tensor(weight_decays, dtype=x.dtype).repeat_interleave(num_classes)  # one per column
    opt = torch.optim.Adam([weight, bias], lr=cfg.lr)
    batch = 256
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            rows = order[start : start + batch]
            logits = (x[rows] @ weight + bias).view(len(rows), k, num_classes)
            loss = F.cross_entropy(logits.transpose(1, 2), y[rows, None].expand(-1, k), reduction="sum") / len(rows)
            loss = loss + 0.5 * (decay * (weight.pow(2).sum(0) + bias.pow(2))).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return (weight.detach().view(dims, k, num_classes).permute(1, 0, 2).contiguous(),
            bias.detach().view(k, num_classes))


def top1(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return topk(weight, bias, x, y)[0]


def topk(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(top-1, top-5) in percent of a linear classifier on features x with labels y."""
    with torch.no_grad():
        top1_hits, top5_hits = topk_correct(x @ weight + bias, y).tolist()
    return 100.0 * top1_hits / len(y), 100.0 * top5_hits / len(y)


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int,
              cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor, float, float | None]:
    """The stage's classifier (weight (D, C), bias (C,)), its weight decay and that value's held-out top-1
    (None when there was nothing to choose)."""
    decays, validation = list(cfg.weight_decays), None
    if len(decays) > 1:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
        held_out = order[: max(1, round(len(x) * cfg.validation_fraction))]
        fit = order[len(held_out):]
        weights, biases = fit_linear(x[fit], y[fit], num_classes, decays, cfg)
        scores = [top1(w, b, x[held_out], y[held_out]) for w, b in zip(weights, biases)]
        best = max(range(len(decays)), key=lambda i: (scores[i], decays[i]))  # ties: the stronger L2
        decays, validation = [decays[best]], scores[best]
    weights, biases = fit_linear(x, y, num_classes, decays, cfg)
    return weights[0], biases[0], decays[0], validation


def probe_settings(cfg: ProbeConfig) -> dict:
    """What decides a probe's numbers besides the trunk and the data: equal settings, comparable results."""
    return {"epochs": cfg.epochs, "lr": cfg.lr, "weight_decays": list(cfg.weight_decays),
            "validation_fraction": cfg.validation_fraction, "seed": cfg.seed}


def probe(cfg: ProbeConfig) -> dict:
    if not cfg.train_shards or not cfg.test_shards:
        raise ConfigError("train_shards and test_shards are required")
    layers = check_layers(cfg.layers)
    if not cfg.weight_decays or min(cfg.weight_decays) < 0:
        raise ConfigError(f"weight_decays must be a non-empty list of values >= 0, got {list(cfg.weight_decays)}")
    if len(cfg.weight_decays) > 1 and not 0.0 < cfg.validation_fraction < 1.0:
        raise ConfigError(f"validation_fraction must be in (0, 1) to choose among weight_decays, "
                          f"got {cfg.validation_fraction}")
    trunk, arch, recipe = load_trunk(cfg)
    train_loader, test_loader = eval_loader(cfg.train_shards, recipe, cfg), eval_loader(cfg.test_shards, recipe, cfg)
    # before any feature: a test label must name the class the classifier learnt under that number
    check_same_classes("linear probe", cfg.train_shards, train_loader.classes, cfg.test_shards, test_loader.classes)
    check_features_fit(train_loader.num_samples, test_loader.num_samples, stage_dims(trunk, layers, recipe.image_size))
    x_train, y_train, num_classes = extract(trunk, train_loader, recipe, cfg, "train", layers)
    x_test, y_test, _ = extract(trunk, test_loader, recipe, cfg, "test", layers)
    num_classes = max(num_classes, int(y_train.max()) + 1, int(y_test.max()) + 1)
    per_layer, per_layer_top5, per_layer_train, decay, validation = {}, {}, {}, {}, {}
    for name in layers:
        train, test = x_train[name], x_test[name]
        mean, std = train.mean(0), train.std(0).clamp_min(1e-6)  # random trunks give features of any scale
        train, test = (train - mean) / std, (test - mean) / std
        weight, bias, decay[name], validation[name] = fit_probe(train, y_train, num_classes, cfg)
        per_layer[name], per_layer_top5[name] = topk(weight, bias, test, y_test)
        per_layer_train[name] = top1(weight, bias, train, y_train)
    dims = {name: x_train[name].shape[1] for name in layers}
    result = probe_result(cfg, "cached", arch, recipe.image_size, per_layer, per_layer_top5, per_layer_train, decay,
                          validation, bn="precise" if cfg.precise_bn else "running", num_train=len(y_train),
                          num_test=len(y_test), num_classes=num_classes, dims=dims, settings=probe_settings(cfg))
    report(result, cfg.output)
    return result


def probe_result(cfg: ProbeConfig, mode: str, arch: str, image_size: int, per_layer: dict, per_layer_top5: dict,
                 per_layer_train: dict, weight_decay: dict, validation: dict, *, bn: str, num_train: int,
                 num_test: int, num_classes: int, dims: dict, settings: dict) -> dict:
    """A probe's result, the same keys whatever the mode (tools/paper_table.py and tools/demo.py read either).
    Per-layer dicts map stage -> value: test top-1 / top-5 and training top-1 in percent, the classifier's weight
    decay and its held-out top-1 (None where it was not chosen on held-out data)."""
    best = max(per_layer, key=per_layer.__getitem__)  # the first stage among equals
    return {
        "top1": per_layer[best],  # the paper reports the best layer
        "top5": per_layer_top5[best],
        "train_top1": per_layer_train[best],
        "best_layer": best,
        "per_layer": per_layer,
        "per_layer_top5": per_layer_top5,
        "per_layer_train": per_layer_train,
        "weight_decay": weight_decay,
        "per_layer_validation": validation,
        "bn": bn,
        "mode": mode,
        "trunk": cfg.checkpoint or "random-init",
        "arch": arch,
        "image_size": image_size,
        "num_train": num_train,
        "num_test": num_test,
        "num_classes": num_classes,
        "feature_dim": dims[best],
        "feature_dims": dims,
        "settings": settings,
    }


def report(result: dict, output: str | os.PathLike) -> None:
    """Print a probe's result as a table and write it as JSON to `output` (nothing written when empty)."""
    best, dims = result["best_layer"], result["feature_dims"]
    print(f"linear probe, {result['mode']} ({result['trunk']}, {result['arch']} @ {result['image_size']}px, "
          f"{result['bn']} BN): best {best} top-1 {result['top1']:.2f}% on {result['num_test']} test images")
    print(f"  {'layer':<6}{'dims':>7}{'top-1':>9}{'top-5':>9}{'train':>9}{'held-out':>10}{'wd':>8}")
    for name in result["per_layer"]:
        mark = "  <- best" if name == best else ""
        keys = ("per_layer", "per_layer_top5", "per_layer_train", "per_layer_validation")
        *tests, train, held = ("-" if result[k][name] is None else f"{result[k][name]:.2f}%" for k in keys)
        print(f"  {name:<6}{dims[name]:>7}{tests[0]:>9}{tests[1]:>9}{train:>9}{held:>10}"
              f"{result['weight_decay'][name]:>8.0e}{mark}")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=2) + "\n")


class FeaturesTooLarge(MemoryError):
    """The cached probe's features would not fit in the available memory; the message suggests the online mode."""


def available_memory() -> tuple[int, str] | None:
    """(bytes a new allocation can take, where that figure comes from), None where unknown: psutil's estimate
    where installed, else /proc/meminfo's MemAvailable; a container's cgroup limit (v2 memory.max, less its
    memory.current) lowers either."""
    found = None
    try:
        import psutil  # an optional dependency: the /proc figure below is the same on Linux

        found = int(psutil.virtual_memory().available), "psutil available memory"
    except ImportError:
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                kib = next((int(line.split()[1]) for line in fh if line.startswith("MemAvailable:")), None)
            found = None if kib is None else (kib * 1024, "MemAvailable of /proc/meminfo")
        except (OSError, ValueError):
            pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = int((cgroup / "memory.max").read_text())  # "max" (no limit) fails int(): skipped
        left = limit - int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return found
    return (left, "the cgroup's memory.max less memory.current") if found is None or left < found[0] else found


def check_features_fit(num_train: int, num_test: int, dims: dict[str, int]) -> None:
    """FeaturesTooLarge, before any feature is extracted, when the float32 features of every training and test
    image would need more than the available memory."""
    need = (num_train + num_test) * sum(dims.values()) * 4
    available = available_memory()
    if available is not None and need > available[0]:
        raise FeaturesTooLarge(
            f"linear probe: the cached features of {num_train} training + {num_test} test images x "
            f"{sum(dims.values())} dimensions ({', '.join(dims)}) take {need:,} bytes ({need / 1e9:.3g} GB) as "
            f"float32, more than the {available[0]:,} bytes ({available[0] / 1e9:.3g} GB) of memory available "
            f"({available[1]}): use --mode=online, whose memory does not grow with the data (docs/evaluation.md), "
            "or probe fewer --layers")


def main(argv: Sequence[str] | None = None) -> dict | None:
    args, cfg = config_from_cli(ProbeConfig, argv, description=__doc__.splitlines()[0],
                                resumable="online_out_dir (--mode=online only)")
    if cfg is None:
        return None
    if cfg.mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.mode == "online":
        from pirl_trainer.train.online_probe import online_probe  # imported here: it builds on this module

        return online_probe(cfg, resume=args.resume)
    if args.resume is not None:
        raise ConfigError("--resume continues an online probe (--mode=online); the cached probe has no checkpoints")
    return probe(cfg)


if __name__ == "__main__":
    main()
