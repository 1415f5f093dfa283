"""tools/profile.py: each subcommand's numbers and files on tiny synthetic shards, and its command-line errors."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pirl_trainer import pipelines
from pirl_trainer.pipelines.augment import BatchAugment
from pirl_trainer.pipelines.recipe import PirlRecipe
from tests.require_all import required
from tests.train.conftest import tiny_overrides
from pirl_trainer.tools.make_shards import build_shards
from pirl_trainer.tools.profile import main
from pirl_trainer.tools.profiling import UsageError
from pirl_trainer.tools.profiling.augment import per_view_loop, random_batch
from pirl_trainer.tools.profiling.decode import decode_limit
from pirl_trainer.tools.profiling.loaders import loader_rate
from pirl_trainer.tools.profiling.step import PHASES
from pirl_trainer.tools.synthetic_data import write_synthetic

REPO = Path(__file__).resolve().parents[2]
SMALL = ["image_size=32", "jigsaw_size=48", "patch_size=16"]  # a recipe small enough for unit tests
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """20 synthetic 64 px images (2 per class) in several shards, and their .beton beside them (shards-beton),
    which the FFCV backend reads for the same --shards where ffcv is installed."""
    root = tmp_path_factory.mktemp("profile")
    write_synthetic(root / "images", per_class=2, size=64, seed=0)
    build_shards(root / "images", root / "shards", workers=0, shard_size=20_000)
    if importlib.util.find_spec("ffcv") is not None or required():  # required: ffcv's import error fails
        from pirl_trainer.tools.sharding.beton import build_beton

        build_beton(root / "shards", root / "shards-beton", workers=1)
    return root / "shards"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/tools/conftest.py


def test_loaders_reports_every_backend_and_worker_count_against_the_decode_limit(shards, tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    argv = ["loaders", "--shards", str(shards), "--recipe-overrides", ",".join(SMALL), "--workers", "0,1",
            "--batches", "2", "--batch-size", "4", "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert {"decode_limit", "results", "augment_ms_per_batch", "batch_size", "device", "shards", "num_samples",
            "command"} <= result.keys()
    assert result["batch_size"] == 4 and result["num_samples"] == 20 and result["shards"] == str(shards)
    assert result["command"].startswith("python tools/profile.py loaders --shards")
    assert result["device"].startswith("cpu: ") and "cores)" in result["device"]
    assert result["augment_ms_per_batch"] > 0

    limit = result["decode_limit"]
    assert {"torchvision", "simplejpeg", "pillow"} <= limit["all"].keys()  # always installed with the project
    assert limit["decoder"] == max(limit["all"], key=limit["all"].get)
    assert limit["samples_per_s_per_core"] == limit["all"][limit["decoder"]] > 0
    for name, rate in limit["all"].items():  # the best of the runs before and after the loaders
        assert rate == max(limit["before"].get(name, 0), limit["after"].get(name, 0))

    runs = {(r["backend"], r["workers"]): r for r in result["results"]}
    measured = [b for b in pipelines.BACKENDS if b not in result["unavailable_backends"]]
    # DALI and ffcv are optional installs, so a user's run may lack them; CI runs all three
    assert set(result["unavailable_backends"]) <= (set() if required() else {"dali", "ffcv"})
    assert sorted(runs) == sorted((b, w) for b in measured for w in (0, 1))
    for (_, workers), r in runs.items():
        assert r["batches"] == 2 and r["samples"] == 8  # the start-up batch is not counted
        assert r["samples_per_s"] > 0
        assert r["samples_per_s_per_core"] == pytest.approx(r["samples_per_s"] / max(1, workers))
        assert r["ratio_to_decode"] == pytest.approx(r["samples_per_s_per_core"] / limit["samples_per_s_per_core"])
    assert png.read_bytes()[:8] == PNG_MAGIC
    table = capsys.readouterr().out
    assert "ratio_to_decode" in table and "decode limit" in table


def test_loaders_times_the_reference_backend_per_decode_device(shards, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["loaders", "--shards", str(shards), "--recipe-overrides", ",".join(SMALL), "--backends", "reference",
                 "--workers", "0", "--decode-devices", "workers,cpu", "--batches", "2", "--batch-size", "4",
                 "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["results"]
    assert [(r["backend"], r["decode_device"], r["workers"], r["samples"]) for r in runs] == [
        ("reference", "workers", 0, 8), ("reference", "cpu", 0, 8)]
    table = capsys.readouterr().out
    assert "decode_device" in table and [line.split()[:3] for line in table.splitlines()
                                         if line.startswith("reference")] == [["reference", "workers", "0"],
                                                                              ["reference", "cpu", "0"]]


def test_loader_rate_reads_further_epochs_when_one_is_too_short(shards):
    recipe = PirlRecipe(image_size=32, jigsaw_size=48, patch_size=16)
    # 20 samples in batches of 4: 5 per epoch, 4 timed after the start-up batch, so 7 need a second epoch.
    r = loader_rate("reference", str(shards), recipe, workers=0, batches=7, batch_size=4)
    assert r["batches"] == 7 and r["samples"] == 28
    with pytest.raises(UsageError, match="at least 2"):  # one batch per epoch: nothing left after start-up
        loader_rate("reference", str(shards), recipe, workers=0, batches=2, batch_size=20)


def test_decode_limit_keeps_the_faster_of_the_two_runs():
    limit = decode_limit({"a": 10.0, "b": 30.0}, {"a": 40.0, "b": 20.0}, {})
    assert limit["all"] == {"a": 40.0, "b": 30.0}
    assert limit["decoder"] == "a" and limit["samples_per_s_per_core"] == 40.0


def test_step_compares_methods_side_by_side(shards, tmp_path, capsys):
    """--methods layers each method's YAML on the same recipe and reports their img/s in one run."""
    out = tmp_path / "methods.json"
    overrides = [*tiny_overrides(shards, tmp_path / "run"), "--loss.moco_queue_size=8", "--loss.moco_bn_groups=2"]
    argv = ["step", "--config", str(REPO / "train/configs/cpu_small.yaml"), *overrides, "--methods",
            "pirl,simclr,moco", "--steps", "1", "--warmup", "1", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    runs = result["methods"]
    assert list(runs) == ["pirl", "simclr", "moco"]
    for method, run in runs.items():
        assert run["steps"] == 1 and run["batch_size"] == 8 and run["img_per_s"] > 0, method
        assert run["config"] == [str(REPO / "train/configs/cpu_small.yaml"),
                                 str(REPO / f"train/configs/methods/{method}.yaml")]
        assert result["relative"][method] == pytest.approx(run["img_per_s"] / runs["pirl"]["img_per_s"])
    assert result["relative"]["pirl"] == 1.0
    printed = capsys.readouterr().out
    assert "x pirl" in printed and "simclr" in printed and "moco" in printed
    assert main(["step", "--methods", "pirl,byol", *overrides]) == 2
    assert "--methods: no method config 'byol'" in capsys.readouterr().err


def test_step_profiles_every_phase(shards, tmp_path, capsys):
    out, trace, png, run = tmp_path / "step.json", tmp_path / "trace.json", tmp_path / "step.png", tmp_path / "run"
    argv = ["step", "--config", str(REPO / "train/configs/cpu_small.yaml"), *tiny_overrides(shards, run),
            "--steps", "2", "--warmup", "1", "--json", str(out), "--trace", str(trace), "--plot", str(png)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["batch_size"] == 8
    assert result["overrides"] == tiny_overrides(shards, run)
    phases = result["phases"]
    assert set(PHASES) <= phases.keys()
    for name in PHASES:
        assert phases[name]["cpu_ms"] >= 0 and phases[name]["device_ms"] is None  # no GPU here
    assert phases["trunk_patches"]["cpu_ms"] > 0 and phases["backward"]["cpu_ms"] > 0
    assert result["step_ms"] > 0
    # The phases are disjoint parts of the step: together no longer than it, the rest is "other".
    total = sum(p["cpu_ms"] for p in phases.values())
    assert total <= result["step_ms"] * 1.001
    assert result["other_ms"] == pytest.approx(result["step_ms"] - total)
    assert 0 <= result["data_stall_share"] <= 1
    assert result["data_stall_share"] == pytest.approx(phases["data_wait"]["cpu_ms"] / result["step_ms"])
    assert result["img_per_s"] == pytest.approx(8 / (result["step_ms"] / 1000))
    assert "traceEvents" in json.loads(trace.read_text())
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert (run / "config.yaml").exists()  # --run.out_dir given: the run went there, not to a temporary folder
    assert "backward" in capsys.readouterr().out


def test_model_compares_settings_with_the_first(tmp_path):
    out = tmp_path / "model.json"
    assert main(["model", "--setting", "2:32:16", "--setting", "4:32:16", "--steps", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["setting"] for r in results] == ["2:32:16", "4:32:16"]
    assert results[0]["ratio_to_first"] == 1.0
    assert results[1]["ratio_to_first"] == pytest.approx(results[1]["img_per_s"] / results[0]["img_per_s"])
    assert all(r["img_per_s"] > 0 for r in results)


def test_augment_without_compile(tmp_path):
    out = tmp_path / "augment.json"
    argv = ["augment", "--batch-size", "2", "--threads", "1", "--repeats", "1", "--no-compile", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["batch_size"] == 2 and result["image_size"] == 224 and result["patch_size"] == 64
    (r,) = result["results"]
    assert r["threads"] == 1 and r["loop_ms"] > 0 and r["eager_ms"] > 0
    assert r["compiled_ms"] is None and r["compile_s"] is None and r["loop_over_compiled"] is None
    assert r["loop_over_eager"] == pytest.approx(r["loop_ms"] / r["eager_ms"])
    assert r["loop1_over_loop"] == 1.0 and result["loop_1_thread_ms"] == r["loop_ms"]


def test_the_loop_and_the_batched_stage_compute_the_same_views():
    """The comparison is fair only if both sides do the same work: same draws, same pixels out."""
    recipe = PirlRecipe(image_size=32, jigsaw_size=48, patch_size=16)
    batch = random_batch(recipe, 3)
    loop, stage = per_view_loop(recipe, batch), BatchAugment(recipe)(batch, 0)
    torch.testing.assert_close(loop["image"], stage["image"], atol=1e-4, rtol=0)
    torch.testing.assert_close(loop["patches"], stage["patches"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("argv, named", [
    (["--workers", "1,x"], "'x'"),
    (["--recipe-overrides", "image_size=32,no_such_field=1"], "no_such_field"),
    (["--batch-size", "0"], "--batch-size"),
    (["--decode-devices", "workers,gpu"], "'gpu'"),
])
def test_bad_loader_options_exit_2_naming_the_value(shards, capsys, argv, named):
    assert main(["loaders", "--shards", str(shards), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err


def test_missing_shards_folder_exits_2(tmp_path, capsys):
    assert main(["loaders", "--shards", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_command_line_unknown_backend_exits_2_naming_it(shards):
    """As a script from the repo root: the path set-up works and the error is one line."""
    command = [sys.executable, "tools/profile.py", "loaders", "--shards", str(shards), "--backends", "reference,nope"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'nope'" in lines[0] and "reference" in lines[0]


def test_help_of_every_subcommand(capsys):
    for argv in ([], ["loaders"], ["step"], ["model"], ["augment"]):
        with pytest.raises(SystemExit) as done:
            main([*argv, "--help"])
        assert done.value.code == 0
    assert "--no-compile" in capsys.readouterr().out


def test_patches_compares_one_batch_with_the_loop_in_both_formats(tmp_path):
    out = tmp_path / "patches.json"
    assert main(["patches", "--arch", "resnet18", "--batch", "2", "--patch-size", "16", "--repeats", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["ms"]) == {"batched", "looped", "batched_channels_last", "looped_channels_last"}
    assert all(ms > 0 for ms in result["ms"].values())
    assert result["looped_over_batched"] == pytest.approx(result["ms"]["looped"] / result["ms"]["batched"])


def test_patch_pass_variants_compute_the_same_gradients():
    from pirl_trainer.model.trunk import build_trunk
    from pirl_trainer.tools.profiling.patches import _pass

    torch.manual_seed(0)
    # eval: BatchNorm statistics do not depend on how patches group; float64: the sums' order differs between a
    # batch of 18 and 9 batches of 2, and float32 rounding through 11 layers would hide a real difference
    trunk = build_trunk("resnet18")[0].eval().double()
    patches = torch.randn(2, 9, 3, 16, 16, dtype=torch.float64)
    grads = []
    for looped in (False, True):
        trunk.zero_grad(set_to_none=True)
        _pass(trunk, patches, looped)
        grads.append(trunk.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
