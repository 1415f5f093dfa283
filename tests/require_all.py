"""PIRL_REQUIRE_ALL=1 (set by .ci/run): a test that skips is a failure.

A user's clone skips what its machine lacks (the real photos beside the repository, ffcv, the accelerate launcher,
hadolint). CI has all of them, so a skip there means an install or a path broke and the test silently stopped
testing: it must fail instead. The one exception is a test marked `gpu`: no CI machine has a CUDA device, so those
skip everywhere a device is missing, and say so.
"""
from __future__ import annotations

import os

import pytest

VARIABLE = "PIRL_REQUIRE_ALL"


def required() -> bool:
    return os.environ.get(VARIABLE, "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device; skipped without one, even when every test is required")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (marked gpu)"))


def _fail_if_required(report, item=None) -> None:
    if not (required() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if item is not None and item.get_closest_marker("gpu") is not None:
        return
    where, reason = report.nodeid, str(report.longrepr)
    if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: reason")
        path, line, reason = report.longrepr
        where = f"{path}:{line}"
    report.outcome = "failed"
    report.longrepr = f"{where}: skipped, but {VARIABLE}=1 requires every test to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_required(outcome.get_result(), item)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level skip (e.g. `pytest.importorskip("ffcv")` at import) skips at collection, not per test."""
    outcome = yield
    _fail_if_required(outcome.get_result())
