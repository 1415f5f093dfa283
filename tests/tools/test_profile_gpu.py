"""tools/profile.py gpu: the acceptance run's smoke form end to end, a failing or overrunning part recorded while the
others still run, the pytest outcome collector, the drawn photos."""
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pirl_trainer.tools.profile import main
from pirl_trainer.tools.profiling import gpu

REPO = Path(__file__).resolve().parents[2]
HEADER = {"command": "python tools/profile.py gpu --json X", "device": "cpu: test"}


def context(tmp_path, budgets):
    return gpu.Context(gpu.Sizes(budgets=budgets), torch.device("cpu"), True, tmp_path)


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_and_writes_every_key(tmp_path):
    """How CI runs the acceptance run: every part at toy sizes on the CPU, in a process of its own."""
    out = tmp_path / "gpu.json"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "tools/profile.py", "gpu", "--cpu-smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["failed_parts"] == [], {p: doc[p].get("error") or doc[p]["result"].get("failed")
                                       for p in doc["failed_parts"]}
    assert doc["finished"] and doc["cpu_smoke"] is True
    assert doc["command"] == f"python tools/profile.py gpu --cpu-smoke --json {out}"
    assert doc["device"].startswith("cpu: ") and doc["device_type"] == "cpu"
    assert doc["torch"] == torch.__version__ and doc["torchvision"] and "cuda" in doc
    for name in gpu.PARTS:
        entry = doc[name]
        assert entry["status"] == "ok" and 0 < entry["seconds"] <= entry["budget_s"], name
        assert f"{name}: ok" in done.stdout
    assert doc["total_seconds"] <= seconds

    stage = doc["stage_vs_model"]["result"]
    assert stage["stage_ms"] > 0 and stage["model_ms"] > 0 and stage["kernels"] == "auto"
    assert stage["stage_share"] == pytest.approx(stage["stage_ms"] / stage["model_ms"])
    assert stage["meets_goal"] == (stage["stage_share"] <= 0.05)

    step = doc["step"]["result"]
    assert step["shards"]["num_samples"] == gpu.SMOKE.photos and step["shards"]["unique_photos"] == 12
    assert set(step["modes"]) == {"workers", "cpu", "cuda"}
    for mode, r in step["modes"].items():
        assert r["steps"] == gpu.SMOKE.step_steps and r["batch_size"] == gpu.SMOKE.batch
        assert r["img_per_s"] == pytest.approx(r["batch_size"] / (r["step_ms"] / 1000))
        assert 0 <= r["data_stall_share"] <= 1 and r["device"] == doc["device"]
    # the CPU form stands in for the GPU decode, and says so
    assert step["modes"]["cuda"]["decode_device"] == "cpu" and step["modes"]["cuda"]["stands_in_for"] == "cuda"
    assert step["modes"]["workers"]["stands_in_for"] is None
    assert step["speedup_over_workers"]["workers"] == 1.0

    decode = doc["decode"]["result"]
    assert decode["images"] == gpu.SMOKE.decode_images and decode["batched"]["device_type"] == "cpu"
    assert {"torchvision", "simplejpeg"} <= decode["cpu_one_core"].keys()
    assert decode["batched_over_best_core"] == pytest.approx(
        decode["batched"]["images_per_s"] / decode["cpu_one_core"][decode["best_cpu_decoder"]])

    bank = doc["bank"]["result"]
    assert set(bank["batches"]) == {str(b) for b in gpu.SMOKE.bank_batches}
    for b, r in bank["batches"].items():
        assert r["batch"] == int(b) and r["rows"] == gpu.SMOKE.bank_rows and r["ratio"] > 0

    bn = doc["sync_bn"]["result"]
    assert bn["backend"] == "gloo" and "CUDA only" in bn["torch_sync"]["skipped"]  # not possible on a CPU
    assert bn["batchnorm"]["max_abs_diff_output"] == 0.0
    # its own arithmetic (Chan's combination), not plain batch norm's kernel: close, but not bit-equal
    assert 0 < bn["project_sync"]["max_abs_diff_output"] < 1e-4
    assert bn["project_sync"]["max_abs_diff_input_grad"] < 1e-4

    tests = doc["cuda_tests"]["result"]
    assert tests["counts"]["gpu"]["passed"] == 0 and tests["counts"]["gpu"]["skipped"] >= 1  # no GPU here
    assert tests["counts"]["fake_cuda"]["passed"] > 0 and tests["counts"]["fake_cuda"]["failed"] == 0
    assert tests["failures"] == [] and tests["exit_code"] == 0
    print(f"cpu smoke: {seconds:.0f} s")


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
    path = tmp_path / "out.json"
    seen = {}

    def first(ctx, out):
        out["value"] = 1

    def boom(ctx, out):
        out["before"] = "kept"
        raise ValueError("no such kernel")

    def last(ctx, out):
        seen["json"] = json.loads(path.read_text())  # what a run killed now would leave
        out["value"] = 3

    doc = gpu.run_parts({"first": first, "boom": boom, "last": last}, context(tmp_path, {}), path, HEADER)
    assert doc["failed_parts"] == ["boom"] and doc["finished"]
    assert doc["first"]["status"] == "ok" and doc["first"]["result"] == {"value": 1}
    assert doc["last"]["status"] == "ok" and doc["last"]["result"] == {"value": 3}
    error = doc["boom"]["error"]
    assert doc["boom"]["status"] == "failed" and doc["boom"]["result"] == {"before": "kept"}
    assert error["type"] == "ValueError" and error["message"] == "no such kernel"
    assert "raise ValueError" in "\n".join(error["traceback"])
    assert json.loads(path.read_text()) == doc
    # written after each part: the earlier parts were on disk while the last one ran, the last one not yet
    assert seen["json"]["failed_parts"] == ["boom"] and seen["json"]["last"]["status"] == "not run"
    assert not seen["json"]["finished"] and seen["json"]["command"] == HEADER["command"]


def test_a_part_past_its_budget_is_stopped_and_the_next_runs(tmp_path):
    def slow(ctx, out):
        out["started"] = True
        try:
            time.sleep(30)
        except Exception:  # code under measurement that catches Exception cannot swallow the timeout
            out["swallowed"] = True

    def after(ctx, out):
        out["ran"] = True

    start = time.perf_counter()
    doc = gpu.run_parts({"slow": slow, "after": after}, context(tmp_path, {"slow": 0.3}), tmp_path / "o.json",
                        HEADER)
    assert time.perf_counter() - start < 10
    assert doc["failed_parts"] == ["slow"] and doc["slow"]["error"]["type"] == "PartTimeout"
    assert doc["slow"]["result"] == {"started": True} and 0.3 <= doc["slow"]["seconds"] < 10
    assert doc["after"]["status"] == "ok" and doc["after"]["result"] == {"ran": True}


def test_a_failed_sub_result_fails_the_part_and_keeps_the_others():
    out, modes = {}, {}
    gpu.sub_result(out, "workers", lambda: {"img_per_s": 10.0}, into=modes)
    gpu.sub_result(out, "cuda", lambda: 1 / 0, into=modes)
    assert modes["workers"] == {"img_per_s": 10.0} and modes["cuda"]["error"]["type"] == "ZeroDivisionError"
    assert out["failed"] == ["cuda"]


def report(nodeid, when, outcome, markers=(), longrepr=None):
    return SimpleNamespace(nodeid=nodeid, when=when, passed=outcome == "passed", failed=outcome == "failed",
                           skipped=outcome == "skipped", keywords={m: 1 for m in markers}, longrepr=longrepr)


def test_the_outcome_collector_counts_each_test_once_by_marker_group():
    c = gpu.TestOutcomes()
    crash = SimpleNamespace(reprcrash=SimpleNamespace(message="AssertionError: 1 != 2\nmore"))
    for r in [report("t::a", "setup", "passed", ["fake_cuda"]), report("t::a", "call", "passed", ["fake_cuda"]),
              report("t::a", "teardown", "passed", ["fake_cuda"]),
              report("t::b", "call", "failed", ["fake_cuda"], crash),
              report("t::b", "teardown", "failed", ["fake_cuda"], crash),  # one failing test, not two
              report("t::g", "setup", "skipped", ["gpu"], ("t.py", 3, "Skipped: needs a CUDA device"))]:
        c.pytest_runtest_logreport(r)
    c.pytest_collectreport(SimpleNamespace(failed=True, nodeid="t/broken.py", longrepr="E   ImportError: nope"))
    assert c.counts == {"gpu": {"passed": 0, "failed": 0, "skipped": 1},
                        "fake_cuda": {"passed": 1, "failed": 1, "skipped": 0}}
    assert c.failures == [{"id": "t::b", "when": "call", "message": "AssertionError: 1 != 2"},
                          {"id": "t/broken.py", "when": "collect", "message": "E   ImportError: nope"}]
    assert c.skips == [{"id": "t::g", "reason": "Skipped: needs a CUDA device"}]


def test_drawn_photos_compress_like_photos_and_repeat_with_the_seed():
    def jpeg(seed):
        buffer = io.BytesIO()
        Image.fromarray(gpu.draw_photo(500, 375, np.random.default_rng(seed))).save(buffer, "JPEG", quality=90)
        return buffer.getvalue()

    a = jpeg(0)
    assert 60_000 < len(a) < 160_000  # ImageNet's JPEGs average ~110 KB
    assert jpeg(0) == a and jpeg(1) != a
    assert Image.open(io.BytesIO(a)).size == (500, 375)


def test_gpu_usage_errors_exit_2(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.json"
    assert main(["gpu", "--json", str(out), "--cpu-smoke", "--parts", "step,nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gpu", "--json", str(out)]) == 2
    assert "--cpu-smoke" in capsys.readouterr().err
    assert not out.exists()


def test_gpu_help(profile_help):
    out = profile_help("gpu")
    assert "--cpu-smoke" in out and "--parts" in out
