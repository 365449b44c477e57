"""The per-step learning rate (linear warm-up, then cosine or constant) and KL weight, against values worked
out by hand at chosen steps."""

import math

import pytest

from training.schedules import Schedule, kl_weight, learning_rate


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_zero_at_the_last_step():
    lr = dict(lr=1e-3, schedule="cosine", total_steps=100, warmup_steps=10)
    assert learning_rate(0, **lr) == pytest.approx(1e-4)  # (0 + 1) / 10 of the rate: never 0
    assert learning_rate(4, **lr) == pytest.approx(5e-4)
    assert learning_rate(9, **lr) == pytest.approx(1e-3)  # warm-up ends at the full rate ...
    assert learning_rate(10, **lr) == pytest.approx(1e-3)  # ... where the cosine starts
    assert learning_rate(55, **lr) == pytest.approx(5e-4)  # half way through the 90 cosine steps
    assert learning_rate(10 + 30, **lr) == pytest.approx(0.5e-3 * (1 + math.cos(math.pi / 3)))
    assert learning_rate(100, **lr) == pytest.approx(0.0, abs=1e-18)


def test_without_warm_up_the_schedules_are_the_former_ones():
    for step in (0, 1, 37, 99):
        assert learning_rate(step, lr=2e-3, schedule="cosine", total_steps=100) == \
            0.5 * 2e-3 * (1.0 + math.cos(math.pi * step / 100))  # exactly the formula fits used before
        assert learning_rate(step, lr=2e-3, schedule="constant", total_steps=100) == 2e-3
    # constant after a warm-up of 2.5 steps (fractional epochs give fractional step counts)
    assert [learning_rate(s, lr=1.0, schedule="constant", total_steps=10, warmup_steps=2.5) for s in range(4)] == \
        pytest.approx([0.4, 0.8, 1.0, 1.0])


def test_kl_weight_linear_and_cosine():
    assert [kl_weight(s, warmup_steps=4) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert [kl_weight(s, warmup_steps=4, schedule="cosine") for s in (0, 1, 3, 9)] == pytest.approx(
        [(1 - math.cos(math.pi / 4)) / 2, 0.5, 1.0, 1.0])
    assert kl_weight(0, warmup_steps=0) == kl_weight(0, warmup_steps=0, schedule="cosine") == 1.0
    schedule = Schedule(lr=1.0, lr_schedule="constant", total_steps=8, lr_warmup_steps=4, kl_warmup_steps=2,
                        kl_schedule="linear")
    assert [schedule(s) for s in (0, 1, 5)] == [(0.25, 0.5), (0.5, 1.0), (1.0, 1.0)]
    with pytest.raises(ValueError, match="KL schedule must be one of"):
        kl_weight(0, warmup_steps=2, schedule="step")
    with pytest.raises(ValueError, match="learning-rate schedule must be one of"):
        learning_rate(5, lr=1.0, schedule="step", total_steps=10)
