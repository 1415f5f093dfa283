"""Linear probe: a frozen trunk's pooled res5 features -> a linear classifier; prints and writes top-1.

    python train/linear_probe.py --checkpoint=runs/pirl/checkpoints/step_000001000.pt \
        --train_shards=shards/train --test_shards=shards/test --output=runs/pirl/probe.json
    python train/linear_probe.py --arch=resnet18 --image_size=112 ...   # no checkpoint: random-init baseline

Features are extracted once (resize + centre crop, no augmentation) and standardised with the training set's
statistics; the classifier is multinomial logistic regression trained with Adam on the cached features.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

import pipelines
from model.trunk import build_trunk
from pipelines.augment import BatchAugment
from pipelines.recipe import PirlRecipe
from train import checkpoint
from train.config import ConfigError, config_from_cli


@dataclass
class ProbeConfig:
    train_shards: str = ""  # labelled shards the classifier is fitted on (required)
    test_shards: str = ""  # labelled shards top-1 is measured on (required)
    checkpoint: str = ""  # a train/pirl.py checkpoint; empty = a randomly initialised trunk (the baseline)
    arch: str = ""  # trunk architecture; empty = the checkpoint's (resnet50 without a checkpoint)
    image_size: int = 0  # centre-crop size; 0 = the checkpoint's recipe.image_size (224 without one)
    backend: str = "reference"  # a key of pipelines.BACKENDS
    batch_size: int = 64  # feature-extraction batch
    num_workers: int = 2
    epochs: int = 100  # passes of the classifier over the cached features
    lr: float = 1e-3  # Adam on standardised features
    weight_decay: float = 5e-4  # L2 on the classifier weights
    seed: int = 0  # trunk init (random baseline) and classifier init/order
    precise_bn: bool = True  # re-estimate BatchNorm statistics on the probe's training images first
    output: str = ""  # JSON result path; empty = print only


def load_trunk(cfg: ProbeConfig) -> tuple[torch.nn.Module, str, PirlRecipe]:
    recipe_fields: dict = {}
    arch = cfg.arch or "resnet50"
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint:
        state = checkpoint.load(cfg.checkpoint)
        arch = cfg.arch or state["config"]["model"]["arch"]
        recipe_fields = state["config"]["data"]["recipe"]
    trunk, _ = build_trunk(arch)
    if cfg.checkpoint:
        prefix = "trunk."
        weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
        trunk.load_state_dict(weights)
    recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PirlRecipe), recipe_fields))
    if cfg.image_size:
        recipe.image_size = cfg.image_size
    return trunk.eval(), arch, recipe


def eval_images(loader, recipe: PirlRecipe):
    """(uint8 loader batch, float image) pairs: the batched stage's eval form (convert, normalise)."""
    stage = BatchAugment(recipe)
    for batch in loader:
        yield batch, stage.eval(batch)["image"]


@torch.no_grad()
def recalibrate_batchnorm(trunk: torch.nn.Module, images: Iterable[torch.Tensor]) -> None:
    """Replace BatchNorm running statistics by exact averages over `images`, model-ready float batches
    ("precise BN").

    Pretraining pushes the 224 view and the 64 px patches through the same BatchNorm layers, so the
    running statistics it leaves are a blend of two input distributions; a random trunk has none at all.
    Re-estimating them on the probe's own training images puts both trunks on the same footing.
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
def extract(trunk: torch.nn.Module, shards: str, recipe: PirlRecipe, cfg: ProbeConfig, what: str):
    loader = pipelines.make_loader(
        cfg.backend, shards, recipe, batch_size=cfg.batch_size, num_workers=cfg.num_workers, mode="eval"
    )
    if not loader.labelled:
        raise ValueError(f"{shards} has no labels: the linear probe needs labelled shards")
    loader.set_epoch(0)
    if what == "train" and cfg.precise_bn:
        recalibrate_batchnorm(trunk, (image for _, image in eval_images(loader, recipe)))
    feats, labels = [], []
    for batch, image in tqdm(eval_images(loader, recipe), desc=f"features ({what})", unit="batch", leave=False):
        feats.append(trunk(image).float())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels), len(loader.classes or [])


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: ProbeConfig) -> torch.nn.Linear:
    gen = torch.Generator().manual_seed(cfg.seed)
    clf = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch = 256
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            rows = order[start : start + batch]
            loss = F.cross_entropy(clf(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return clf


def top1(clf: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (clf(x).argmax(1) == y).float().mean().item()


def probe(cfg: ProbeConfig) -> dict:
    if not cfg.train_shards or not cfg.test_shards:
        raise ConfigError("train_shards and test_shards are required")
    trunk, arch, recipe = load_trunk(cfg)
    x_train, y_train, num_classes = extract(trunk, cfg.train_shards, recipe, cfg, "train")
    x_test, y_test, _ = extract(trunk, cfg.test_shards, recipe, cfg, "test")
    num_classes = max(num_classes, int(y_train.max()) + 1, int(y_test.max()) + 1)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # random trunks give features of any scale
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    clf = fit_linear(x_train, y_train, num_classes, cfg)
    result = {
        "top1": top1(clf, x_test, y_test),
        "train_top1": top1(clf, x_train, y_train),
        "trunk": cfg.checkpoint or "random-init",
        "arch": arch,
        "image_size": recipe.image_size,
        "num_train": len(x_train),
        "num_test": len(x_test),
        "num_classes": num_classes,
        "feature_dim": x_train.shape[1],
    }
    print(f"linear probe ({result['trunk']}, {arch} @ {recipe.image_size}px): top-1 {result['top1']:.2f}% "
          f"on {len(x_test)} test images (train {result['train_top1']:.2f}%)")
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> dict | None:
    _, cfg = config_from_cli(ProbeConfig, argv, description=__doc__.splitlines()[0], resumable=False)
    return None if cfg is None else probe(cfg)


if __name__ == "__main__":
    main()
