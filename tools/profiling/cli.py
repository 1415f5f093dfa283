"""Throughput profiling: where the time of a PIRL step goes, and how fast each input pipeline can go.

    python tools/profile.py loaders --shards DIR [--backends reference] [--workers 1,2] [--decode-devices workers,cpu]
                                    [--json OUT] [--plot PNG]
    python tools/profile.py step --config train/configs/cpu_small.yaml --data.shards=DIR [--steps 10] [--trace T]
                                 [--methods pirl,simclr,moco]
    python tools/profile.py probe --config train/configs/imagenette_cpu.yaml --data.shards=DIR --test-shards DIR2
                                  [--steps 10] [--warmup 2] [--json OUT]
    python tools/profile.py model --setting 32:64:32 --setting 64:64:24 [--arch resnet18] [--steps 4]
    python tools/profile.py augment [--batch-size 64] [--threads 1,2] [--no-compile]
    python tools/profile.py bank --rows 100000 --dim 128 --batch 64 --negatives 32000 [--dtype bfloat16] [--threads 1,2]
    python tools/profile.py patches [--arch resnet50] [--batch 8] [--patch-size 64] [--repeats 3]
    python tools/profile.py gpu --json OUT [--cpu-smoke] [--parts step,decode]

Each prints a table and, with --json, writes every number with the command line and the device. On a shared
machine compare numbers taken in the same run (ratios), not across runs. The measurements live in
tools/profiling/, one module per subcommand.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pirl_trainer.tools.profiling import UsageError
from pirl_trainer.tools.profiling.report import command_line, parse_list, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{loaders,step,probe,model,augment,patches,bank,gpu}")

    p = sub.add_parser("loaders", allow_abbrev=False, help="loader-only samples/s against the JPEG decode limit")
    p.add_argument("--shards", required=True, help="folder written by tools/make_shards.py")
    p.add_argument("--backends", help="comma-separated keys of pipelines.BACKENDS (default: all)")
    p.add_argument("--workers", default="1,2", help="comma-separated DataLoader worker counts (0: this process)")
    p.add_argument("--decode-devices", default="workers",
                   help="comma-separated data.decode_device values for the reference backend: workers, cpu, cuda")
    p.add_argument("--batches", type=int, default=20, help="timed batches per run, after one start-up batch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--recipe-overrides", default="", help="PirlRecipe fields, e.g. image_size=64,patch_size=24")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")

    p = sub.add_parser("step", allow_abbrev=False, help="a short training run under torch.profiler, by phase",
                       epilog="Any other --section.key=value is a training-config override, as for train/pirl.py.")
    p.add_argument("--config", help="YAML file of overrides (see train/configs/)")
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and not recorded (set-up, warm caches)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a bar chart of the phases (PNG) here")
    p.add_argument("--trace", help="write the profiler's Chrome trace (JSON) here")
    p.add_argument("--methods", help="comma-separated methods profiled one after the other in this run, each with "
                   "train/configs/methods/METHOD.yaml layered on --config, their img/s side by side")

    p = sub.add_parser("probe", allow_abbrev=False, help="online linear evaluation's img/s against pretraining's",
                       epilog="Any other --section.key=value is a training-config override, as for train/pirl.py.")
    p.add_argument("--config", help="YAML file of overrides (see train/configs/); the probe takes its arch, image "
                   "size, batch size, workers, backend and data.shards")
    p.add_argument("--test-shards", required=True, help="labelled shards the online probe scores at its end")
    p.add_argument("--steps", type=int, default=10, help="timed steps of each run")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and not timed (set-up, warm caches)")
    p.add_argument("--json", help="write the results here")

    p = sub.add_parser("model", allow_abbrev=False, help="the model's training step alone on random inputs")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--setting", action="append", required=True, help="BATCH:IMAGE_SIZE:PATCH_SIZE (repeatable)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    p.add_argument("--json", help="write the results here")

    p = sub.add_parser("augment", allow_abbrev=False, help="the batched stage against the per-view loop")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant; the best counts")
    p.add_argument("--threads", default="1,2", help="comma-separated torch intra-op thread counts")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (~40 s to compile)")
    p.add_argument("--json", help="write the results here")

    p = sub.add_parser("patches", allow_abbrev=False,
                       help="the B*9 patches as one trunk batch vs a loop over the nine, NCHW and channels_last")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=8, help="samples B (the pass sees B*9 patches)")
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; each variant reports its median")
    p.add_argument("--json", help="write the results here")

    p = sub.add_parser("bank", allow_abbrev=False, help="negatives: per-sample draws against one shared draw per batch")
    p.add_argument("--rows", type=int, default=100_000, help="bank rows (dataset size)")
    p.add_argument("--dim", type=int, default=128, help="embedding size")
    p.add_argument("--batch", type=int, default=64, help="samples per batch")
    p.add_argument("--negatives", type=int, default=32_000, help="negatives per sample (the paper's 32,000)")
    p.add_argument("--dtype", default="float32", help="bank rows: float32, bfloat16 or float16")
    p.add_argument("--threads", default="1", help="comma-separated torch intra-op thread counts")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed rounds after a warm-up round, the variants in turn; each variant's best counts")
    p.add_argument("--json", help="write the results here")

    p = sub.add_parser("gpu", allow_abbrev=False, help="the acceptance run on a GPU: every part, one JSON (<= 8 min)")
    p.add_argument("--json", required=True, help="write the results here (rewritten after each part)")
    p.add_argument("--cpu-smoke", action="store_true", help="every part at toy sizes on the CPU (CI)")
    p.add_argument("--parts", help="comma-separated parts to run (default: all, in order)")
    return parser


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")


def run_loaders(args: argparse.Namespace, _overrides: list[str]) -> dict:
    from pirl_trainer import pipelines
    from pirl_trainer.tools.profiling import loaders, plots

    backends = parse_list(args.backends, "--backends") if args.backends else list(pipelines.BACKENDS)
    for name in backends:
        if name not in pipelines.BACKENDS:
            raise UsageError(f"--backends: unknown backend {name!r}; valid: {', '.join(sorted(pipelines.BACKENDS))}")
    if not Path(args.shards).is_dir():
        raise UsageError(f"--shards: no such folder: {args.shards}")
    _positive(args, "batches", "batch_size")
    workers = parse_list(args.workers, "--workers", int, minimum=0)
    decode_devices = loaders.decode_devices(args.decode_devices)
    recipe = loaders.recipe_with(parse_list(args.recipe_overrides, "--recipe-overrides")
                                 if args.recipe_overrides else [])
    result = loaders.profile_loaders(args.shards, backends, workers, batches=args.batches,
                                     batch_size=args.batch_size, recipe=recipe, decode_devices=decode_devices)
    print(loaders.report(result))
    if args.plot:
        plots.loaders_chart(result, args.plot)
    return result


def _check_steps(args: argparse.Namespace) -> None:
    """--steps > 0 and --warmup >= 0 (step and probe), or a UsageError naming the option."""
    _positive(args, "steps")
    if args.warmup < 0:
        raise UsageError(f"--warmup: must be >= 0, got {args.warmup}")


def run_step(args: argparse.Namespace, overrides: list[str]) -> dict:
    from pirl_trainer.tools.profiling import plots, step

    _check_steps(args)
    if args.methods:
        if args.trace or args.plot:
            raise UsageError("--methods compares img/s only: --trace and --plot profile one configuration")
        result = step.compare_methods(args.config, parse_list(args.methods, "--methods"), overrides,
                                      steps=args.steps, warmup=args.warmup)
        print(step.methods_report(result))
        return result
    result = step.profile_step(args.config, overrides, steps=args.steps, warmup=args.warmup, trace=args.trace)
    print(step.report(result))
    if args.plot:
        plots.step_chart(result, args.plot)
    return result


def run_probe(args: argparse.Namespace, overrides: list[str]) -> dict:
    from pirl_trainer.tools.profiling import probe

    _check_steps(args)
    result = probe.profile_probe(args.config, overrides, args.test_shards, steps=args.steps, warmup=args.warmup)
    print(probe.report(result))
    return result


def run_model(args: argparse.Namespace, _overrides: list[str]) -> dict:
    from pirl_trainer.tools.profiling import model

    _positive(args, "steps")
    result = model.profile_model(args.arch, args.setting, args.steps)
    print(model.report(result))
    return result


def run_augment(args: argparse.Namespace, _overrides: list[str]) -> dict:
    from pirl_trainer.tools.profiling import augment

    _positive(args, "batch_size", "repeats")
    threads = parse_list(args.threads, "--threads", int, minimum=1)
    result = augment.profile_augment(args.batch_size, args.repeats, threads, compile=not args.no_compile)
    print(augment.report(result))
    return result


def run_patches(args: argparse.Namespace, _overrides: list[str]) -> dict:
    from pirl_trainer.tools.profiling import patches

    _positive(args, "batch", "patch_size", "repeats")
    result = patches.profile_patches(args.arch, args.batch, args.patch_size, args.repeats)
    print(patches.report(result))
    return result


def run_bank(args: argparse.Namespace, _overrides: list[str]) -> dict:
    from pirl_trainer.tools.profiling import bank

    _positive(args, "rows", "dim", "batch", "negatives", "repeats")
    threads = parse_list(args.threads, "--threads", int, minimum=1)
    result = bank.profile_bank(args.rows, args.dim, args.batch, args.negatives, args.dtype, threads, args.repeats)
    print(bank.report(result))
    return result


def run_gpu(args: argparse.Namespace, _overrides: list[str]) -> dict:
    from pirl_trainer.tools.profiling import gpu

    argv = ["gpu", "--json", args.json, *(["--cpu-smoke"] if args.cpu_smoke else []),
            *(["--parts", args.parts] if args.parts else [])]
    parts = parse_list(args.parts, "--parts") if args.parts else None
    return gpu.run_acceptance(args.json, cpu_smoke=args.cpu_smoke, command=command_line(argv), parts=parts)


COMMANDS = {"loaders": run_loaders, "step": run_step, "probe": run_probe, "model": run_model,
            "augment": run_augment, "patches": run_patches, "bank": run_bank, "gpu": run_gpu}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand that argv (default: the process's arguments) names; the exit status (2: a bad value)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("step", "probe"):  # only these take pass-through (training-config) options
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        result = COMMANDS[args.command](args, extra)
    except UsageError as err:
        print(f"profile.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    result["command"] = command_line(argv)
    if args.json:
        write_json(args.json, result)
    return 0

