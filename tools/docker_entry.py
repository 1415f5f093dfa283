"""The GPU image's entry point: `docker run ... pirl [ACCELERATE FLAGS --] [TRAINER ARGUMENTS]`.

Arguments before the first `--` are `accelerate launch`'s (multi-node: --config_file, --machine_rank,
--main_process_ip, ...), those after it are train/pirl.py's. Without `--` every argument is the trainer's: on one
node `accelerate launch` then starts one process per visible GPU.

The run folder (run.out_dir, resolved from the trainer's arguments and config files exactly as the trainer will)
must lie on a folder mounted from the host, e.g. `-v /scratch/runs:/runs`: whatever is written to the container's
own file system is lost with the container, checkpoints included, and a run that cannot be resumed is found out
only when it is needed. The image links runs/ to /runs, so every shipped config's `runs/<name>` lands there.
--help and --print-config run the trainer alone: it prints and exits, and needs neither launcher nor run folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "train" / "pirl.py"
# the trainer's own options, besides its config overrides (--key=value, --section.key=value)
TRAINER_FLAGS = {"--config", "--resume", "--print-config", "--help", "-h"}
USAGE = ("usage: docker run ... pirl [ACCELERATE FLAGS --] [TRAINER ARGUMENTS]\n"
         "  e.g. pirl --config_file train/configs/accelerate/4nodes_8gpus.yaml --machine_rank 1 "
         "--main_process_ip 10.0.0.1 -- --config train/configs/imagenet_r50.yaml --data.shards=/data/shards")


class EntryError(ValueError):
    """Arguments the entry point refuses before anything starts."""


def split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(accelerate launch's flags, the trainer's arguments): split at the first `--`; without one, all the trainer's."""
    argv = list(argv)
    if "--" not in argv:
        accelerate_args, trainer_args = [], argv
    else:
        cut = argv.index("--")
        accelerate_args, trainer_args = argv[:cut], argv[cut + 1:]
    # a trainer override names a config key (--section.key, or a top-level key such as --method); a bare flag that
    # is accelerate's was meant for the launcher, and the trainer would only say that it is no config key
    candidates = [a for a in trainer_args
                  if a.startswith("-") and "." not in _flag(a) and _flag(a) not in TRAINER_FLAGS]
    misplaced = [a for a in candidates if _flag(a) in accelerate_flags()] if candidates else []
    if misplaced:
        raise EntryError(f"{_flag(misplaced[0])} is a flag of accelerate launch, not of the trainer: put accelerate's "
                         f"flags first and the trainer's after a `--`\n{USAGE}")
    return accelerate_args, trainer_args


def _flag(arg: str) -> str:
    return arg.partition("=")[0]


def accelerate_flags() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return set(launch_command_parser()._option_string_actions)


def only_prints(trainer_args: Sequence[str]) -> bool:
    """--help and --print-config: the trainer prints and exits, so one process without the launcher is enough
    (the launcher would start one per GPU, each printing the same)."""
    return any(a in ("-h", "--help", "--print-config") for a in trainer_args)


def run_dir(trainer_args: Sequence[str]) -> Path | None:
    """The trainer's run.out_dir for these arguments, or None where it will stop on a bad config first (it says
    which key or file, once, itself)."""
    from pirl_trainer.train.config import ConfigError, PirlConfig, load_config, parse_args

    try:
        args, overrides = parse_args(trainer_args, description="")
        return Path(load_config(PirlConfig, args.config, overrides).run.out_dir)
    except (ConfigError, SystemExit):
        return None


def on_container_filesystem(path: Path) -> bool:
    """Whether `path` (or, where it does not exist yet, its nearest existing folder) is on the file system of `/`:
    in a container that is the container's own layer; a folder mounted from the host is another device."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return os.stat(path).st_dev == os.stat("/").st_dev


def accelerate_command(accelerate_args: Sequence[str], trainer_args: Sequence[str]) -> list[str]:
    return ["accelerate", "launch", *accelerate_args, str(TRAINER), *trainer_args]


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        accelerate_args, trainer_args = split_arguments(argv)
    except EntryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if only_prints(trainer_args):
        command = [sys.executable, str(TRAINER), *trainer_args]
        os.execv(command[0], command)
    out_dir = run_dir(trainer_args)
    if out_dir is not None and on_container_filesystem(out_dir):
        print(f"error: run.out_dir {out_dir} ({os.path.realpath(out_dir)}) is inside the container, whose files are "
              f"lost when it exits, checkpoints included: mount a host folder there, e.g. docker run -v "
              f"/scratch/runs:/runs ... (runs/<name> is /runs/<name> in the image)", file=sys.stderr)
        raise SystemExit(2)
    command = accelerate_command(accelerate_args, trainer_args)
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
