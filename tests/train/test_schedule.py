import math

import pytest

from pirl_trainer.train.schedule import lr_factor, scaled_lr


def test_linear_scaling_matches_the_paper():
    assert scaled_lr(0.12, 1024, 1024) == pytest.approx(0.12)
    assert scaled_lr(0.12, 256, 1024) == pytest.approx(0.03)


def test_cosine_from_peak_to_floor():
    total, ratio = 100, 0.001  # 0.12 -> 0.00012
    assert lr_factor(0, total, 0, ratio) == pytest.approx(1.0)
    assert lr_factor(50, total, 0, ratio) == pytest.approx(ratio + (1 - ratio) * 0.5)
    assert lr_factor(100, total, 0, ratio) == pytest.approx(ratio)
    values = [lr_factor(s, total, 0, ratio) for s in range(total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_is_linear_then_cosine():
    assert [lr_factor(s, 110, 10, 0.0) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(10, 110, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(60, 110, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
