"""The launch scripts of docs/cluster.md: the image's entry point (tools/docker_entry.py) and the SLURM recipe
(train/configs/slurm/pirl_4x8.sbatch), run with stand-ins for `accelerate`, `srun` and `scontrol` that record how
they were called. What each recorded call would do is then decided by the real parsers: `accelerate launch`'s
own (with the validation it applies before launching) and the trainer's config loader."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pirl_trainer.tools import docker_entry
from pirl_trainer.train import checkpoint
from pirl_trainer.train.config import PirlConfig, config_from_cli

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "train" / "configs" / "slurm" / "pirl_4x8.sbatch"
ENTRY = REPO / "tools" / "docker_entry.py"
HOSTS = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]
TRAINER_ARGS = ["--config", "train/configs/imagenet_r50.yaml", "--data.shards=/shared/imagenet-shards",
                "--data.backend=dali"]

# One program, installed under each name: it appends {program, argv, env} to $FAKE_LOG and acts out its part.
FAKE = """#!{python}
import json, os, subprocess, sys
name = os.path.basename(sys.argv[0])
env = {{k: os.environ.get(k) for k in ("SLURM_NODEID", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}}
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps({{"program": name, "argv": sys.argv[1:], "env": env}}) + "\\n")
if name == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_HOSTS"].split()))
elif name == "srun":  # one task per node, in node order; srun's status is its tasks' highest
    command = next(i for i, a in enumerate(sys.argv) if i > 0 and not a.startswith("-"))
    statuses = [subprocess.run(sys.argv[command:], env={{**os.environ, "SLURM_NODEID": str(node)}}).returncode
                for node in range(int(os.environ["SLURM_NNODES"]))]
    sys.exit(max(statuses))
elif name == "accelerate":
    sys.exit(int(os.environ.get("FAKE_ACCELERATE_STATUS", "0")))
"""


@pytest.fixture
def fakes(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("accelerate", "srun", "scontrol"):
        (folder / name).write_text(FAKE.format(python=sys.executable))
        (folder / name).chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "MASTER_PORT")}
    # the stand-ins first, then this interpreter's folder: the scripts' `python` is the one with the project
    env["PATH"] = os.pathsep.join([str(folder), os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(FAKE_LOG=str(log), FAKE_HOSTS=" ".join(HOSTS))
    return env, log


def calls(log: Path, program: str) -> list[dict]:
    if not log.exists():
        return []
    return [c for c in map(json.loads, log.read_text().splitlines()) if c["program"] == program]


def accelerate_launch(argv: list[str]):
    """What `accelerate launch ARGV` would launch: its parser, then the validation that merges in --config_file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[0] == "launch", argv
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[1:]))
    return args


def trainer(argv: list[str]):
    """(parsed arguments, config) the trainer would run with: any unknown key or file fails here."""
    args, cfg = config_from_cli(PirlConfig, argv, description="")
    assert cfg is not None
    return args, cfg


# --- the SLURM recipe -------------------------------------------------------------------------------------------


def sbatch_directives() -> dict[str, str]:
    found = re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", SBATCH.read_text(), flags=re.M)
    return {key: value for key, value in found}


def run_sbatch(env: dict, args: list[str], nodes: int = 4, gpus: int = 8, **extra: str):
    env = {**env, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[a-d]", "SLURM_NNODES": str(nodes),
           "SLURM_GPUS_ON_NODE": str(gpus), "SLURM_CPUS_ON_NODE": "128", **extra}
    return subprocess.run(["bash", str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_sbatch_script_parses_and_asks_for_4_nodes_of_8_gpus_preemptible():
    done = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    directives = sbatch_directives()
    assert {k: directives.get(k) for k in ("nodes", "ntasks-per-node", "gpus-per-node", "signal", "open-mode")} == {
        "nodes": "4", "ntasks-per-node": "1", "gpus-per-node": "8", "signal": "TERM@120", "open-mode": "append"}
    assert "requeue" in directives and directives["requeue"] == ""


def test_a_first_run_starts_one_launcher_per_node_without_resume(fakes, tmp_path, monkeypatch):
    env, log = fakes
    out_dir = tmp_path / "run"
    done = run_sbatch(env, [*TRAINER_ARGS, f"--run.out_dir={out_dir}"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "from the start" in done.stdout and "training finished" in done.stdout

    assert [c["argv"] for c in calls(log, "scontrol")] == [["show", "hostnames", "gpu-[a-d]"]]  # no requeue
    (srun,) = calls(log, "srun")
    assert srun["argv"][:5] == ["--export=ALL", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=128",
                                "--kill-on-bad-exit=1"]
    launches = calls(log, "accelerate")
    assert [c["env"]["SLURM_NODEID"] for c in launches] == ["0", "1", "2", "3"]
    lead = int(sbatch_directives()["signal"].split("@")[1])
    monkeypatch.chdir(REPO)  # the recorded paths are relative to the submission folder
    for node, call in enumerate(launches):
        # the agent must give the ranks time to checkpoint, and leave the script time to requeue
        assert 30 < int(call["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < lead
        launch = accelerate_launch(call["argv"])
        assert (launch.num_machines, launch.machine_rank, launch.num_processes) == (4, node, 32)
        assert (launch.main_process_ip, launch.main_process_port) == (HOSTS[0], 29500)
        assert launch.multi_gpu and launch.rdzv_backend == "static" and launch.mixed_precision == "no"
        assert launch.training_script == "train/pirl.py"
        args, cfg = trainer(launch.training_script_args)
        assert args.resume is None and args.config == ["train/configs/imagenet_r50.yaml"]
        assert (cfg.data.shards, cfg.data.backend, cfg.run.out_dir) == ("/shared/imagenet-shards", "dali", str(out_dir))
        assert cfg.model.arch == "resnet50" and cfg.run.bf16  # the recipe file was read


def test_a_requeued_run_resumes_and_sigterm_requeues_it_again(fakes, tmp_path, monkeypatch):
    env, log = fakes
    out_dir = tmp_path / "run"
    (out_dir / "checkpoints").mkdir(parents=True)
    checkpoint.checkpoint_path(out_dir, 500).touch()  # only its name matters for finding the latest
    # 2 nodes of 4 GPUs (sbatch --nodes=2 --gpus-per-node=4); every launcher exits as SIGTERM makes it exit
    done = run_sbatch(env, [*TRAINER_ARGS, f"--run.out_dir={out_dir}"], nodes=2, gpus=4,
                      FAKE_ACCELERATE_STATUS="143", SLURM_RESTART_COUNT="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(restart 1)" in done.stdout and "resuming" in done.stdout
    assert [c["argv"] for c in calls(log, "scontrol")] == [["show", "hostnames", "gpu-[a-d]"], ["requeue", "4242"]]

    monkeypatch.chdir(REPO)
    launches = [accelerate_launch(c["argv"]) for c in calls(log, "accelerate")]
    assert [(a.num_machines, a.machine_rank, a.num_processes) for a in launches] == [(2, 0, 8), (2, 1, 8)]
    for launch in launches:
        args, cfg = trainer(launch.training_script_args)
        assert args.resume == "latest" and cfg.run.out_dir == str(out_dir)


def test_a_crash_is_not_requeued_and_a_bad_config_stops_before_srun(fakes, tmp_path):
    env, log = fakes
    done = run_sbatch(env, [*TRAINER_ARGS, f"--run.out_dir={tmp_path / 'run'}"], FAKE_ACCELERATE_STATUS="1")
    assert done.returncode == 1 and "not requeued" in done.stderr
    assert ["requeue", "4242"] not in [c["argv"] for c in calls(log, "scontrol")]

    log.unlink()
    done = run_sbatch(env, [*TRAINER_ARGS, "--optim.learning_rate=0.3"])
    assert done.returncode == 2 and "learning_rate" in done.stderr, done.stderr
    assert calls(log, "srun") == [] and calls(log, "accelerate") == []


@pytest.mark.slow
def test_sigterm_to_every_process_of_a_launch_checkpoints_and_exits_143(tmp_path):
    """What the sbatch script counts on: SLURM signals every process of the step; the ranks checkpoint, and
    `accelerate launch` (torch's elastic agent) exits with 128 + SIGTERM, not 0 (done) nor 1 (a crash)."""
    from pirl_trainer.tools.make_shards import build_shards
    from pirl_trainer.tools.synthetic_data import write_synthetic
    from tests.train.conftest import tiny_overrides

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate launcher is not on PATH")
    write_synthetic(tmp_path / "images", per_class=3, size=64, seed=0)
    build_shards(tmp_path / "images", tmp_path / "shards", workers=1, shard_size=40_000)
    out_dir = tmp_path / "run"
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", str(REPO / "train" / "pirl.py"),
               *tiny_overrides(tmp_path / "shards", out_dir), "--optim.epochs=50", "--run.ckpt_every=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "100"}
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        log = out_dir / "log.jsonl"
        while not (log.exists() and len(log.read_text().splitlines()) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "no 2 logged steps"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 143, output[-3000:]
    stopped_at = checkpoint.load(checkpoint.latest_checkpoint(out_dir))["step"]
    assert stopped_at >= 2 and f"stopped on SIGTERM after step {stopped_at}" in output


# --- the image's entry point ------------------------------------------------------------------------------------


def test_the_entry_point_splits_at_the_first_separator():
    accelerate = ["--config_file", "train/configs/accelerate/4nodes_8gpus.yaml", "--machine_rank", "2"]
    assert docker_entry.split_arguments([*accelerate, "--", *TRAINER_ARGS]) == (accelerate, TRAINER_ARGS)
    assert docker_entry.split_arguments(TRAINER_ARGS) == ([], TRAINER_ARGS)  # no `--`: all the trainer's
    assert docker_entry.split_arguments(["--", "--help"]) == ([], ["--help"])
    for misplaced in (["--machine_rank", "1"], ["--num_processes=8"]):
        with pytest.raises(docker_entry.EntryError, match=f"{misplaced[0].split('=')[0]} is a flag of accelerate"):
            docker_entry.split_arguments([*TRAINER_ARGS, *misplaced])
    # a top-level config key is the trainer's, not a misplaced flag
    assert docker_entry.split_arguments(["--method=jigsaw"]) == ([], ["--method=jigsaw"])


def test_the_run_folder_is_resolved_as_the_trainer_resolves_it(monkeypatch):
    monkeypatch.chdir(REPO)
    assert docker_entry.run_dir(TRAINER_ARGS) == Path("runs/imagenet_r50")  # the recipe file's
    assert docker_entry.run_dir([*TRAINER_ARGS, "--run.out_dir", "/runs/a"]) == Path("/runs/a")
    assert docker_entry.run_dir([*TRAINER_ARGS, "--optim.learning_rate=1"]) is None  # the trainer's error comes first


def run_entry(env: dict, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRY), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_entry_point_gives_each_program_its_arguments(fakes, monkeypatch):
    env, log = fakes
    mounted = Path("/dev/shm")
    if not mounted.is_dir() or os.stat(mounted).st_dev == os.stat("/").st_dev:
        pytest.skip("no /dev/shm on a file system of its own to stand for a mounted folder")
    out_dir = mounted / "pirl-entry-test" / "run"  # not created: the check looks at the nearest existing folder
    accelerate = ["--config_file", "train/configs/accelerate/4nodes_8gpus.yaml", "--machine_rank", "3",
                  "--main_process_ip", "10.1.2.3"]
    trainer_args = [*TRAINER_ARGS, f"--run.out_dir={out_dir}", "--resume"]
    done = run_entry(env, [*accelerate, "--", *trainer_args])
    assert done.returncode == 0, done.stderr
    assert not out_dir.parent.exists()
    (call,) = calls(log, "accelerate")
    monkeypatch.chdir(REPO)
    launch = accelerate_launch(call["argv"])
    assert (launch.num_machines, launch.machine_rank, launch.num_processes) == (4, 3, 32)
    assert launch.main_process_ip == "10.1.2.3" and launch.main_process_port == 29500
    assert launch.training_script == str(REPO / "train" / "pirl.py")
    assert launch.training_script_args == trainer_args
    args, cfg = trainer(launch.training_script_args)
    assert args.resume == "latest" and cfg.run.out_dir == str(out_dir)

    log.unlink()
    # the image's CMD: the trainer's help, once, from the trainer itself (the launcher would print it per GPU)
    done = run_entry(env, ["--help"])
    assert done.returncode == 0 and done.stdout.startswith("usage: pirl.py"), done.stdout + done.stderr
    assert "--print-config" in done.stdout and calls(log, "accelerate") == []


def test_the_entry_point_refuses_a_run_folder_inside_the_container(fakes, tmp_path):
    env, log = fakes
    inside = next((p for p in (tmp_path, REPO, Path.home()) if os.stat(p).st_dev == os.stat("/").st_dev), None)
    if inside is None:
        pytest.skip("no folder on the root file system to stand for the container's own")
    done = run_entry(env, [*TRAINER_ARGS, f"--run.out_dir={inside / 'run'}"])
    assert done.returncode == 2 and f"run.out_dir {inside / 'run'}" in done.stderr and "-v" in done.stderr
    assert calls(log, "accelerate") == []

    done = run_entry(env, [*TRAINER_ARGS, "--num_processes", "8"])
    assert done.returncode == 2 and "--num_processes is a flag of accelerate launch" in done.stderr
    assert calls(log, "accelerate") == []
