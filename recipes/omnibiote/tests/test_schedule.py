"""Accumulation arithmetic, the batch-size ramp, the token budget and the LR schedule."""

import pytest
import torch

from errors import ConfigError
from schedule import accumulation_steps, lr_schedule, plan_training, ramp_accumulation


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


def closed_formula(plan, step: int) -> float:
    """The LR factor of the hand-written LambdaLR this recipe used before torch's schedulers (the reference)."""
    if step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    return max(0.0, (plan.total_steps - step) / max(1, plan.total_steps - plan.warmup_steps))


def scheduled_lrs(plan, base_lrs=(0.3, 0.007)) -> list[list[float]]:
    """Each param group's LR at steps 0 .. total_steps + 2 (two groups: muP gives hidden matrices their own LR)."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in base_lrs]
    optimizer = torch.optim.AdamW(groups)
    scheduler = lr_schedule(optimizer, plan)
    lrs = []
    for _ in range(plan.total_steps + 3):
        lrs.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("steps, warmup_fraction", [(100, 0.1), (10, 0.0), (7, 0.3), (3, 0.5), (50, 0.02)])
def test_lr_schedule_equals_the_closed_formula(steps, warmup_fraction):
    plan = plan_training(64 * 128 * steps, 64, 8, 1, 128, ramp_fraction=0.0, warmup_fraction=warmup_fraction)
    assert plan.total_steps == steps
    for step, lrs in enumerate(scheduled_lrs(plan)):
        want = [base * closed_formula(plan, step) for base in (0.3, 0.007)]
        assert lrs == pytest.approx(want, rel=1e-6, abs=1e-12), (step, lrs, want)


def test_lr_warms_up_then_decays_to_zero():
    plan = plan_training(64 * 128 * 100, 64, 8, 1, 128, ramp_fraction=0.0, warmup_fraction=0.1)
    factors = [lrs[0] / 0.3 for lrs in scheduled_lrs(plan)]
    assert plan.total_steps == 100 and plan.warmup_steps == 10
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    decay = factors[10:101]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert factors[100] == 0.0
    no_warmup = plan_training(64 * 128 * 10, 64, 8, 1, 128)
    assert scheduled_lrs(no_warmup)[0][0] == 0.3  # no warmup: start at full LR


def test_bad_budget_and_fractions_are_config_errors():
    with pytest.raises(ConfigError):
        plan_training(0, 64, 8, 1, 128)
    with pytest.raises(ConfigError):
        plan_training(1000, 64, 8, 1, 128, ramp_fraction=1.5)
