"""The CI policy of tests/require_all.py, run on a throw-away test file in a pytest of its own."""
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

SAMPLE = '''
import pytest

def test_runs():
    assert True

def test_skips_at_run_time():
    pytest.skip("PIRL_REAL_DATA not set")

def test_missing_module_skips():
    pytest.importorskip("a_module_that_is_not_installed")

@pytest.mark.gpu
def test_needs_a_device():
    import torch
    torch.zeros(1, device="cuda")
'''


def run_sample(tmp_path: Path, sample: str, require: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(sample)
    env = {k: v for k, v in os.environ.items() if k != "PIRL_REQUIRE_ALL"}
    if require is not None:
        env["PIRL_REQUIRE_ALL"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.require_all",
                           "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_skips_are_failures_only_when_every_test_is_required(tmp_path):
    gpu = torch.cuda.is_available()  # the gpu-marked test runs where a device is, and skips elsewhere
    relaxed = run_sample(tmp_path, SAMPLE, None)
    assert relaxed.returncode == 0, relaxed.stdout
    assert ("2 passed, 2 skipped" if gpu else "1 passed, 3 skipped") in relaxed.stdout

    strict = run_sample(tmp_path, SAMPLE, "1")
    assert strict.returncode == 1, strict.stdout
    assert ("2 failed, 2 passed" if gpu else "2 failed, 1 passed, 1 skipped") in strict.stdout
    assert "PIRL_REQUIRE_ALL=1 requires every test to run: Skipped: PIRL_REAL_DATA not set" in strict.stdout
    assert "could not import 'a_module_that_is_not_installed'" in strict.stdout
    if not gpu:
        assert "SKIPPED [1]" in strict.stdout and "needs a CUDA device (marked gpu)" in strict.stdout

    assert run_sample(tmp_path, SAMPLE, "0").returncode == 0  # 0 switches it off, as unset does


def test_a_module_level_skip_fails_the_run_when_required(tmp_path):
    sample = 'import pytest\npytest.importorskip("a_module_that_is_not_installed")\n\ndef test_x():\n    pass\n'
    (tmp_path / "test_other.py").write_text("def test_runs():\n    pass\n")
    relaxed = run_sample(tmp_path, sample, None)
    assert relaxed.returncode == 0 and "1 passed, 1 skipped" in relaxed.stdout, relaxed.stdout
    strict = run_sample(tmp_path, sample, "1")
    assert strict.returncode != 0 and "could not import 'a_module_that_is_not_installed'" in strict.stdout
