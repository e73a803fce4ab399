"""Step arithmetic of the trainer: gradient accumulation, the batch-size ramp, the token budget and the LR schedule.

The global batch (--batch_size sequences) is world_size x mini_batch_size x accumulation steps. During the first
ramp_fraction of the steps, the number of accumulated micro-batches grows linearly from 1 to its full value (a
small batch early is cheaper and as good), and the token budget counts those smaller steps. The LR schedule is
torch's (`lr_schedule`).
"""

import dataclasses
import math

import torch
from torch.optim.lr_scheduler import LinearLR, SequentialLR

from errors import ConfigError


def accumulation_steps(batch_size: int, mini_batch_size: int, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step, e.g. 1024 / (16 ranks x 2) = 32."""
    per_micro_step = mini_batch_size * world_size
    if batch_size <= 0 or mini_batch_size <= 0 or batch_size % per_micro_step:
        raise ConfigError(
            f"--batch_size {batch_size} must be a positive multiple of world size {world_size} x"
            f" --mini_batch_size {mini_batch_size} = {per_micro_step}"
        )
    return batch_size // per_micro_step


def ramp_accumulation(step: int, full_accumulation: int, ramp_steps: int) -> int:
    """Micro-batches per rank at optimizer step `step` (0-based): linear from 1 up to full over ramp_steps."""
    if step >= ramp_steps:
        return full_accumulation
    return max(1, math.ceil(full_accumulation * (step + 1) / ramp_steps))


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """How many optimizer steps the token budget buys, and the step counts of the ramp and the warmup."""

    total_steps: int
    ramp_steps: int
    warmup_steps: int
    full_accumulation: int
    tokens_per_micro_step: int  # summed over ranks
    planned_tokens: int

    def accumulation(self, step: int) -> int:
        return ramp_accumulation(step, self.full_accumulation, self.ramp_steps)

    def step_tokens(self, step: int) -> int:
        return self.accumulation(step) * self.tokens_per_micro_step


def plan_training(
    token_budget: int,
    batch_size: int,
    mini_batch_size: int,
    world_size: int,
    ctx_len: int,
    ramp_fraction: float = 0.05,
    warmup_fraction: float = 0.0,
) -> TrainingPlan:
    """Steps needed to see about token_budget tokens, counting the smaller batches of the ramp."""
    full = accumulation_steps(batch_size, mini_batch_size, world_size)
    if token_budget <= 0:
        raise ConfigError(f"--token_budget must be positive, got {token_budget}")
    if not 0.0 <= ramp_fraction < 1.0 or not 0.0 <= warmup_fraction < 1.0:
        raise ConfigError("--ramp_fraction and --warmup_fraction must be in [0, 1)")
    full_steps = math.ceil(token_budget / (batch_size * ctx_len))
    # a linear ramp over a share f of the steps costs about f/2 of a full-batch run's steps in tokens
    estimated_steps = math.ceil(full_steps / (1 - ramp_fraction / 2))
    ramp_steps = round(ramp_fraction * estimated_steps)
    tokens_per_micro_step = mini_batch_size * world_size * ctx_len
    steps = tokens = 0
    while tokens < token_budget:
        tokens += ramp_accumulation(steps, full, ramp_steps) * tokens_per_micro_step
        steps += 1
    return TrainingPlan(steps, ramp_steps, round(warmup_fraction * steps), full, tokens_per_micro_step, tokens)


def lr_schedule(optimizer: torch.optim.Optimizer, plan: TrainingPlan) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over plan.warmup_steps (factor (step+1)/warmup_steps), then linear decay to 0 at the last step
    (factor (total_steps - step)/(total_steps - warmup_steps)), as torch schedulers: the factor multiplies each
    param group's own LR, so MuAdamW's per-width LRs keep their ratios.

    The factors equal the original closed formula to float rounding at every step that trains; only when the warmup
    covers every step is the (unused) LR after the last step the full one instead of 0.
    """
    warmup, total = plan.warmup_steps, plan.total_steps
    decay = LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=max(1, total - warmup))
    if warmup == 0:
        return decay
    # start=end=1 when warmup_steps is 1, so the max(1, ...) only keeps LinearLR from dividing by zero
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(optimizer, [ramp, decay], milestones=[warmup])
