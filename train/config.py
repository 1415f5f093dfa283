"""Training configuration: dataclass defaults, YAML overrides, command-line overrides.

Every default lives here with a one-line reason. A YAML file holds only overrides; the command line then
overrides both with `--section.key=value`. Parsing and type checking are OmegaConf's structured configs:
an unknown key or a value of the wrong type is an error, never ignored.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import sys
import textwrap
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence, get_type_hints

import yaml
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
    # backend=reference only: "workers" = the DataLoader workers decode and cut; "cpu" / "cuda" = the workers only read,
    # the main process decodes each batch there with torchvision (nvJPEG on a GPU) and cuts it (docs/pipelines.md)
    decode_device: str = "workers"
    # hash every shard (or the .beton) against manifest.json's sha256 before training; sizes are always checked
    verify_sha256: bool = False
    # corrupt samples (unreadable or truncated JPEGs) one process may skip per epoch before training stops with
    # an error naming the shard and sample; each is left out of its batch (docs/troubleshooting.md)
    max_skipped_per_epoch: int = 100
    # backend=ffcv only: read the .beton through the OS page cache (shared by a node's ranks); false: FFCV's own
    ffcv_os_cache: bool = True
    # train on a labelled subset (semi-supervised fine-tuning; pipelines/subset.py): a text file of sample indexes or
    # of image names (ImageNet's 1 % / 10 % files, matched against the shards' sample_names.txt); empty = all samples
    subset: str = ""
    subset_fraction: float = 0.0  # else this share of each class's samples (at least one); 0 = all samples
    subset_seed: int = 0  # the fraction's draw: same seed, same subset (a smaller fraction's inside a larger one's)


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # the paper's trunk; resnet18 for CPU runs
    embed_dim: int = 128  # output of heads f and g (paper section 2.3)
    # BatchNorm statistics over all processes' samples (torch's SyncBatchNorm on CUDA, model/sync_batchnorm.py
    # elsewhere): N processes then train like one with the global batch. Off: per-process statistics, the
    # paper's setting (32 per GPU) and cheaper; docs/distributed.md, "N processes = 1 process".
    sync_bn: bool = False
    num_permutations: int = 1000  # method=jigsaw: the classes, a max-Hamming set (model/permutations.py)
    # pirl / npid heads: "none" = the paper's linear heads; "bn" = centred outputs (BatchNorm1d, no affine), which
    # short schedules need against the collapse onto one direction (model/heads.py output_norm; docs/training.md)
    head_norm: str = "none"
    # start the trunk from this train/pirl.py checkpoint (any method; trunk weights only, heads and classifier fresh):
    # fine-tuning a pretrained trunk. Not --resume, which continues a run whole; empty = random initialisation
    init_checkpoint: str = ""


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
    # bank memory / world per rank (docs/distributed.md, "The memory bank across ranks": shard with shared_negatives)
    bank: str = "replicated"
    # float32, bfloat16 or float16 rows: half the memory (docs/results.md: the loss's deviation)
    bank_dtype: str = "float32"
    # method=simclr: NT-Xent's temperature. SimCLR's ImageNet setting (google-research/simclr run.py's default, its
    # README's ImageNet command at batch 4,096); its CIFAR-10 command (batch 512) uses 0.5
    simclr_tau: float = 0.1
    # method=moco (MoCo v2, Chen et al. 2020, "Improved baselines"): InfoNCE's temperature (v2's 0.2, v1's 0.07)
    moco_tau: float = 0.2
    moco_queue_size: int = 65536  # the queue of keys, the negatives: MoCo's K (v1 and v2, its builder.py default)
    moco_momentum: float = 0.999  # the key encoder's EMA weight m (MoCo section 3.2 and its builder.py default)
    # shuffled BatchNorm: the global batch of key images is encoded in this many groups of its own statistics; MoCo's
    # 8 GPUs (model/moco.py). A multiple of the process count, and each group of >= 2 samples
    moco_bn_groups: int = 8


@dataclass
class OptimConfig:
    epochs: int = 800  # paper section 3.1 (longest schedule)
    lr: float = 0.12  # at reference_batch; scaled linearly with the global batch (supplement A)
    final_lr: float = 0.00012  # end of the cosine decay, also at reference_batch (supplement A)
    reference_batch: int = 1024  # the global batch the two learning rates above are quoted for
    momentum: float = 0.9  # SGD momentum (supplement A)
    weight_decay: float = 1e-4  # (supplement A)
    warmup_epochs: float = 0.0  # linear warm-up from 0; the paper uses none
    # epochs at which the rate drops 10x (a step schedule, as fine-tuning protocols use); empty = cosine to final_lr
    lr_steps: list[float] = field(default_factory=list)
    nesterov: bool = False  # Nesterov momentum (the paper's pretraining: plain SGD momentum)
    # "sgd": the paper's (supplement A); "lars": SGD scaled per layer by eta * ||w|| / ||g + wd * w|| (You et al.
    # 2017), as SimCLR trains at global batches of thousands (train/lars.py, docs/training.md)
    optimizer: str = "sgd"
    lars_eta: float = 0.001  # LARS trust coefficient eta (SimCLR's lars_optimizer.py EETA_DEFAULT)
    # LARS: biases and BatchNorm weights (the 1-d parameters) get neither weight decay nor the trust ratio (SimCLR)
    lars_exclude_1d: bool = True


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
    tensorboard: bool = True  # TensorBoard events in run.out_dir/tensorboard/ (log.jsonl is written either way)


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
class EvalConfig:
    """method=supervised: top-1 / top-5 of the classifier on labelled test shards (train/classifier_eval.py)."""

    test_shards: str = ""  # labelled shards with the training shards' classes; empty = no evaluation
    every_epochs: int = 0  # epochs between evaluations; 0 = at the end of training only (there always)
    batch_size: int = 64  # per process; every process scores its share of the test shards


@dataclass
class PirlConfig:
    # what is learned (docs/training.md, "Methods"): pirl (eq. 5), npid (NPID++, the image term alone: loss.lam is not
    # read), jigsaw (which of model.num_permutations permutations shuffled the patches), rotation (which of 4),
    # supervised (the image view's class label: the reference a pretraining is measured against; labelled shards),
    # simclr and moco (two image views: NT-Xent over the global batch; MoCo v2's momentum keys and queue)
    method: str = "pirl"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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


class ConfigKey(NamedTuple):
    """One leaf of a config schema: its dotted name, default as typed on the command line, and its meaning."""

    name: str
    default: str
    help: str


@functools.lru_cache(maxsize=None)
def _field_comments(cls: type) -> dict[str, str]:
    """{field: its source comment}: the comment on the field's line and the comment lines right below it, or else
    the comment lines right above it; a field with neither shares the previous field's when written right below
    it (one comment over a pair of fields). Empty where the source is not available."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}
    own_line = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    body = [node for node in tree.body[0].body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    starts = {node.lineno: node.end_lineno for node in body}  # first line -> last line of each field
    out: dict[str, str] = {}
    claimed: set[int] = set()  # comment lines continuing the field above them
    shared = ""  # the comment above the previous field, when this field follows it directly
    previous_end = 0
    for node in body:
        text = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in own_line]
        above = not text
        if text:
            block = []
            n = node.end_lineno + 1
            while n in own_line:
                block.append(n)
                n += 1
            opens_next = n in starts and not any(m in comments for m in range(n, starts[n] + 1))
            if not opens_next:  # else the block is the comment of the next field, which has none on its line
                text += [comments[b] for b in block]
                claimed.update(block)
        else:
            n = node.lineno - 1
            while n in own_line and n not in claimed:
                text.insert(0, comments[n])
                n -= 1
            if not text and previous_end == node.lineno - 1:
                text = [shared]
        out[node.target.id] = " ".join(t for t in text if t)
        shared = out[node.target.id] if above else ""
        previous_end = node.end_lineno
    return out


def _format_default(value: Any) -> str:
    """A default as it would be typed after `--key=`."""
    if value == MISSING:
        return "???"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_default(v) for v in value) + "]"
    return str(value)


def config_keys(schema: type, prefix: str = "") -> list[ConfigKey]:
    """Every leaf key of a dataclass schema, nested dataclasses flattened to dotted names, in declaration order."""
    comments = _field_comments(schema)
    hints = get_type_hints(schema)
    defaults = OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)
    keys: list[ConfigKey] = []
    for f in dataclasses.fields(schema):
        name = f"{prefix}{f.name}"
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            keys += config_keys(kind, f"{name}.")
        else:
            keys.append(ConfigKey(name, _format_default(defaults[f.name]), comments.get(f.name, "")))
    return keys


def keys_help(schema: type, width: int = 100) -> str:
    """The --help listing: every key with its default and meaning."""
    column = 34
    out = ["config keys: set any as --key=VALUE (or --key VALUE); shown with its default (??? = required)"]
    for key in config_keys(schema):
        head = f"  --{key.name}={key.default}"
        if not key.help:
            out.append(head)
            continue
        wrapped = textwrap.wrap(key.help, width=width - column - 2) or [""]
        if len(head) + 2 > column:
            out.append(head)
        else:
            out.append(f"{head:<{column}}{wrapped.pop(0)}")
        out += [" " * column + line for line in wrapped]
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def _key_names(schema: type) -> tuple[tuple[str, ...], frozenset[str]]:
    """(every leaf key, every section) of a schema: what a command-line key may name."""
    def walk(node: dict, prefix: str):
        for key, value in node.items():
            yield f"{prefix}{key}", isinstance(value, dict)
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")

    found = list(walk(OmegaConf.to_container(OmegaConf.structured(schema), resolve=False), ""))
    return tuple(name for name, section in found if not section), frozenset(name for name, section in found if section)


def _suggest(schema: type, key: str) -> str:
    """The "; did you mean --x?" of an unknown key: close spellings, or keys with the same last part."""
    names = _key_names(schema)[0]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    close += [name for name in names if name.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and name not in close]
    return f"; did you mean {' or '.join('--' + name for name in close[:3])}?" if close else ""


def _check_known(schema: type, dotlist: Sequence[str]) -> None:
    """An unknown command-line key is a ConfigError naming it and the keys it may have meant."""
    leaves, sections = _key_names(schema)
    for item in dotlist:
        key = item.split("=", 1)[0]
        if key not in leaves and key not in sections:
            raise ConfigError(f"unknown config key --{key}{_suggest(schema, key)} (--help lists every key)")


def merge_config(schema: type, config_path: str | Sequence[str] | None, overrides: Sequence[str]) -> Any:
    """Defaults from `schema`, then the YAML file(s) in order (a recipe, then e.g. a method's few keys), then the
    overrides: an OmegaConf DictConfig in which required values may still be missing (shown as ???).

    An override whose value is ??? checks only that its key exists (and leaves the value as it was)."""
    paths = [] if config_path is None else [config_path] if isinstance(config_path, (str, Path)) else list(config_path)
    merged = OmegaConf.structured(schema)
    try:
        for path in map(Path, paths):
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.load(path))
            except OmegaConfBaseException as exc:
                raise ConfigError(f"{_describe(exc)} (in {path})") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        dotlist = _overrides_to_dotlist(overrides)
        _check_known(schema, dotlist)
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{_describe(exc)} (on the command line)") from None
    return merged


def _describe(exc: OmegaConfBaseException) -> str:
    full_key = getattr(exc, "full_key", None)
    where = f" [key {full_key}]" if full_key else ""
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0]}{where}"


def load_config(schema: type, config_path: str | Sequence[str] | None, overrides: Sequence[str]) -> Any:
    """Defaults from `schema`, then the YAML file(s) in order (a recipe, then e.g. a method's few keys), then the
    overrides; returns a `schema` instance. A required value still missing is a ConfigError naming it."""
    merged = merge_config(schema, config_path, overrides)
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required config values: {', '.join(missing)} (set e.g. --{missing[0]}=...)")
    return OmegaConf.to_object(merged)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def build_parser(description: str, resumable: bool | str = True,
                 schema: type | None = None) -> argparse.ArgumentParser:
    """The options of a config-driven script; with `schema`, --help lists every config key (keys_help). `resumable`:
    whether it takes --resume, or (a string) the config key of the folder whose latest checkpoint --resume reads."""
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,  # `--res` must not silently mean `--resume`
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=keys_help(schema) if schema is not None else
        "Any config value can be overridden as --section.key=value.",
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
            help="continue a run: a checkpoint path, or no value for the latest checkpoint in "
                 f"{resumable if isinstance(resumable, str) else 'run.out_dir'}",
        )
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (a required value not set shows as ???) and exit")
    return parser


def parse_args(
    argv: Sequence[str] | None, description: str, resumable: bool | str = True, schema: type | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """(options, the rest: config overrides)."""
    return build_parser(description, resumable, schema).parse_known_args(argv)


def config_from_cli(
    schema: type, argv: Sequence[str] | None, description: str, resumable: bool | str = True
) -> tuple[argparse.Namespace, Any | None]:
    """Parse the command line into (args, config); config is None when --print-config has printed it.

    --print-config prints the config as far as it is set, a required value not yet given as ???, and exits 0.
    A bad config exits with status 2 and one line naming the key or file.
    """
    args, overrides = parse_args(argv, description, resumable, schema)
    try:
        if args.print_config:
            merged = merge_config(schema, args.config, overrides)
            print(OmegaConf.to_yaml(merged))
            missing = sorted(OmegaConf.missing_keys(merged))
            if missing:
                print(f"not set (a run needs them): {', '.join(missing)}", file=sys.stderr)
            return args, None
        cfg = load_config(schema, args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, cfg
