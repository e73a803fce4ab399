"""Accumulation arithmetic, the batch-size ramp, the token budget and the LR schedule."""

import pytest

from errors import ConfigError
from schedule import accumulation_steps, lr_multiplier, plan_training, ramp_accumulation


def test_accumulation_steps_follow_world_size_and_mini_batch():
    assert accumulation_steps(1024, 2, 16) == 32  # the example: 1024 / (16 procs x 2)
    assert accumulation_steps(1024, 16, 4) == 16
    assert accumulation_steps(64, 64, 1) == 1


@pytest.mark.parametrize("batch_size, mini, world", [(1000, 16, 4), (16, 32, 1), (0, 4, 1), (12, 8, 1)])
def test_batch_size_not_divisible_is_a_config_error(batch_size, mini, world):
    with pytest.raises(ConfigError, match="--batch_size"):
        accumulation_steps(batch_size, mini, world)


def test_ramp_grows_linearly_from_one_to_full():
    full, ramp = 32, 10
    values = [ramp_accumulation(step, full, ramp) for step in range(15)]
    assert values[0] == 4  # ceil(32 * 1/10)
    assert values[:10] == [-(-full * (s + 1) // ramp) for s in range(10)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[9:] == [full] * 6
    assert ramp_accumulation(0, 8, 0) == 8  # no ramp
    assert [ramp_accumulation(s, 2, 100) for s in (0, 49, 50, 99)] == [1, 1, 2, 2]  # never below one micro-batch


def test_token_budget_counts_the_ramp():
    kwargs = dict(batch_size=64, mini_batch_size=4, world_size=2, ctx_len=128)
    no_ramp = plan_training(10_000_000, ramp_fraction=0.0, **kwargs)
    ramped = plan_training(10_000_000, ramp_fraction=0.2, **kwargs)
    full_step_tokens = 64 * 128
    assert no_ramp.total_steps == -(-10_000_000 // full_step_tokens)
    assert ramped.total_steps > no_ramp.total_steps  # the small early batches need extra steps
    for plan in (no_ramp, ramped):
        summed = sum(plan.step_tokens(step) for step in range(plan.total_steps))
        assert summed == plan.planned_tokens
        assert 10_000_000 <= plan.planned_tokens < 10_000_000 + full_step_tokens
    assert abs(ramped.ramp_steps - 0.2 * ramped.total_steps) <= 0.02 * ramped.total_steps  # ramp share ~ as asked
    assert ramped.accumulation(0) == 1 and ramped.accumulation(ramped.ramp_steps) == ramped.full_accumulation


def test_lr_warms_up_then_decays_to_zero():
    plan = plan_training(64 * 128 * 100, 64, 8, 1, 128, ramp_fraction=0.0, warmup_fraction=0.1)
    multiplier = lr_multiplier(plan)
    assert plan.total_steps == 100 and plan.warmup_steps == 10
    warmup = [multiplier(step) for step in range(10)]
    assert warmup[0] == pytest.approx(0.1) and warmup[-1] == pytest.approx(1.0)
    decay = [multiplier(step) for step in range(10, 101)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert multiplier(100) == 0.0
    assert lr_multiplier(plan_training(64 * 128 * 10, 64, 8, 1, 128))(0) == 1.0  # no warmup: start at full LR


def test_bad_budget_and_fractions_are_config_errors():
    with pytest.raises(ConfigError):
        plan_training(0, 64, 8, 1, 128)
    with pytest.raises(ConfigError):
        plan_training(1000, 64, 8, 1, 128, ramp_fraction=1.5)
