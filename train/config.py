"""Training configuration: dataclass defaults, YAML overrides, command-line overrides.

Every default lives here with a one-line reason. A YAML file holds only overrides; the command line then
overrides both with `--section.key=value`. Parsing and type checking are OmegaConf's structured configs:
an unknown key or a value of the wrong type is an error, never ignored.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pirl_trainer.pipelines.dali_options import DaliOptions
from pirl_trainer.pipelines.recipe import PirlRecipe


@dataclass
class DataConfig:
    shards: str = MISSING  # folder written by tools/make_shards.py (tars, .idx files, manifest.json)
    backend: str = "reference"  # a key of pipelines.BACKENDS
    batch_size: int = 32  # per process; the paper uses 32 per GPU x 32 GPUs (supplement A)
    num_workers: int = 4  # loader workers per process (reference: DataLoader workers; dali: threads)
    augment_kernels: str = "auto"  # batched stage: auto (numba on CPU, tensor ops elsewhere), numba, tensor, compiled
    recipe: PirlRecipe = field(default_factory=PirlRecipe)
    dali: DaliOptions = field(default_factory=DaliOptions)  # backend=dali only: decode device, queue depths
    # hash every shard (or the .beton) against manifest.json's sha256 before training; sizes are always checked
    verify_sha256: bool = False
    # corrupt samples (unreadable or truncated JPEGs) one process may skip per epoch before training stops with
    # an error naming the shard and sample; each is left out of its batch (README, "When things go wrong")
    max_skipped_per_epoch: int = 100
    # backend=ffcv only: read the .beton through the OS page cache (shared by a node's ranks); false: FFCV's own
    ffcv_os_cache: bool = True


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # the paper's trunk; resnet18 for CPU runs
    embed_dim: int = 128  # output of heads f and g (paper section 2.3)
    # BatchNorm statistics over all processes' samples (torch's SyncBatchNorm on CUDA, model/sync_batchnorm.py
    # elsewhere): N processes then train like one with the global batch. Off: per-process statistics, the
    # paper's setting (32 per GPU) and cheaper; README, "Multi-process runs".
    sync_bn: bool = False
    num_permutations: int = 1000  # method=jigsaw: the classes, a max-Hamming set (model/permutations.py)
    # pirl / npid heads: "none" = the paper's linear heads; "bn" = centred outputs (BatchNorm1d, no affine), which
    # short schedules need against the collapse onto one direction (model/heads.py output_norm; README)
    head_norm: str = "none"


@dataclass
class LossConfig:
    kind: str = "nce"  # "nce": binary NCE of eq. 3-4 with Wu et al.'s constant Z; "infonce": softmax form (ref)
    lam: float = 0.5  # lambda of eq. 5 (paper section 2.2); 0 gives NPID++
    tau: float = 0.07  # temperature of eq. 3 (paper section 2.4)
    num_negatives: int = 32000  # N of eq. 3 (paper section 3); ablations use 4,096
    shared_negatives: bool = False  # False: the paper's per-sample draws; True: one draw per batch
    bank_momentum: float = 0.5  # EMA weight of the memory bank (paper section 2.4)
    bank_init: str = "random"  # "random": unit vectors, as the reference; "features": f(v_I) of the initial net
    # "replicated": every rank holds the whole bank (the reference's way); "sharded": row i on rank i % world,
    # bank memory / world per rank (README, "The memory bank across ranks": shard with shared_negatives)
    bank: str = "replicated"
    bank_dtype: str = "float32"  # float32, bfloat16 or float16 rows: half the memory (README: the loss's deviation)


@dataclass
class OptimConfig:
    epochs: int = 800  # paper section 3.1 (longest schedule)
    lr: float = 0.12  # at reference_batch; scaled linearly with the global batch (supplement A)
    final_lr: float = 0.00012  # end of the cosine decay, also at reference_batch (supplement A)
    reference_batch: int = 1024  # the global batch the two learning rates above are quoted for
    momentum: float = 0.9  # SGD momentum (supplement A)
    weight_decay: float = 1e-4  # (supplement A)
    warmup_epochs: float = 0.0  # linear warm-up from 0; the paper uses none


@dataclass
class RunConfig:
    out_dir: str = "runs/pirl"  # checkpoints, config.yaml, log.jsonl and TensorBoard events go here
    seed: int = 0  # model init, negative draws, augmentation streams
    log_every: int = 10  # steps between host syncs for the progress bar and logs
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    max_steps: int = -1  # stop after this many global steps (a budget for smoke runs); -1 = the whole schedule
    bf16: bool = False  # bfloat16 autocast for the forward pass
    channels_last: bool = False  # NHWC memory format for the trunk (faster convolutions on recent GPUs)
    cpu: bool = False  # force CPU even where a GPU is present
    tensorboard: bool = True  # write TensorBoard events next to log.jsonl


@dataclass
class KnnConfig:
    """The kNN monitor (train/knn_monitor.py): top-1 of a weighted k-nearest-neighbour vote on labelled shards."""

    every: int = 0  # steps between evaluations; 0 = off (the default: it costs two passes over its shards)
    train_shards: str = ""  # labelled shards whose features vote (empty: data.shards, which must be labelled)
    test_shards: str = ""  # labelled shards scored; required when every > 0
    k: int = 20  # neighbours (DINO's choice at T = 0.07; capped at the train set's size)
    temperature: float = 0.07  # vote weight exp(cos / T) (Wu et al. 2018)
    max_train: int = 0  # evenly spaced subset of the train shards, fixed for the run; 0 = all of them
    max_test: int = 0  # likewise for the test shards
    batch_size: int = 256  # feature-extraction batch


@dataclass
class PirlConfig:
    # what is learned (README, "Methods"): pirl (eq. 5), npid (NPID++, the image term alone: loss.lam is not
    # read), jigsaw (which of model.num_permutations permutations shuffled the patches), rotation (which of 4),
    # supervised (the image view's class label: the reference a pretraining is measured against; labelled shards)
    method: str = "pirl"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)


class ConfigError(ValueError):
    """A configuration file or override that cannot be applied."""


def _overrides_to_dotlist(overrides: Sequence[str]) -> list[str]:
    """`--optim.lr=0.3` or `--optim.lr 0.3` -> `optim.lr=0.3`."""
    dotlist: list[str] = []
    items = list(overrides)
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--") or len(item) <= 2:
            raise ConfigError(f"expected an override like --section.key=value, got {item!r}")
        body = item[2:]
        if "=" not in body:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ConfigError(f"override {item!r} has no value (use {item}=VALUE)")
            body = f"{body}={items[i + 1]}"
            i += 1
        dotlist.append(body)
        i += 1
    return dotlist


def load_config(schema: type, config_path: str | Sequence[str] | None, overrides: Sequence[str]) -> Any:
    """Defaults from `schema`, then the YAML file(s) in order (a recipe, then e.g. a method's few keys), then the
    overrides; returns a `schema` instance."""
    paths = [] if config_path is None else [config_path] if isinstance(config_path, (str, Path)) else list(config_path)
    merged = OmegaConf.structured(schema)
    try:
        for path in map(Path, paths):
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(_overrides_to_dotlist(overrides)))
    except OmegaConfBaseException as exc:
        where = f" (in {', '.join(map(str, paths))} or the command line)" if paths else ""
        raise ConfigError(f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}{where}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required config values: {', '.join(missing)} (set e.g. --{missing[0]}=...)")
    return OmegaConf.to_object(merged)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def parse_args(
    argv: Sequence[str] | None, description: str, resumable: bool = True
) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,  # `--res` must not silently mean `--resume`
        epilog="Any config value can be overridden as --section.key=value, e.g. --optim.lr=0.3 --data.batch_size=64.",
    )
    parser.add_argument("--config", action="append",
                        help="YAML file of overrides (see train/configs/); repeat to layer files, later ones win "
                             "(e.g. a recipe, then train/configs/methods/jigsaw.yaml)")
    if resumable:
        parser.add_argument(
            "--resume",
            nargs="?",
            const="latest",
            default=None,
            help="continue a run: a checkpoint path, or no value for the latest checkpoint in run.out_dir",
        )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_known_args(argv)


def config_from_cli(
    schema: type, argv: Sequence[str] | None, description: str, resumable: bool = True
) -> tuple[argparse.Namespace, Any | None]:
    """Parse the command line into (args, config); config is None when --print-config has printed it.

    A bad config exits with status 2 and one line naming the key or file.
    """
    args, overrides = parse_args(argv, description, resumable)
    try:
        cfg = load_config(schema, args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(to_yaml(cfg))
        return args, None
    return args, cfg
