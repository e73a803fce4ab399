"""The rows every recipe has for its two speed switches (issue 20): torch.compile on/off and activation checkpointing
on/off, each through the recipe's own switch function, on the same weights and batch.

- compile: loss and gradients of the compiled model against eager, then tokens/s of both (FLOPs counted on eager;
  the first compiled step's time is reported as the compile time).
- activation checkpointing: loss and gradients equal to without, then peak GPU memory and tokens/s of both.

On CUDA the recipe's `.compile()` calls get inductor, as in training. In the CPU dry run they get dynamo's `eager`
backend: dynamo captures the same graphs (what breaks a recipe's compile most often), while inductor's C++ build,
and even AOTAutograd's trace of the backward (70 s for one Mamba block on a loaded CI machine), would take minutes.
The dry run checks parity only: tokens/s of a tiny model says nothing (`make bench` measures the CPU ratios).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from gpu_check.common import (
    BF16_TOLERANCE,
    Context,
    Recorder,
    bf16_autocast,
    count_flops,
    fwd_bwd_step,
    measure_throughput,
    parity_result,
    relative_error,
)

# Loss and gradients of a switched model against the plain one. fp32 on CPU: compile (aot_eager) and checkpointing
# recompute the same kernels, so only rounding differs. bf16 on CUDA: inductor fuses and reorders reductions.
SWITCH_TOLERANCE = {"cpu": 1e-5, "cuda": BF16_TOLERANCE}
DRY_RUN_BACKEND = "eager"


@dataclass
class SwitchCase:
    """One recipe model and batch for the switch rows.

    build(): a fresh model on the device, dropout off (so both runs compute the same thing), in train mode.
    loss(model): the training loss of one fixed batch. apply(model, compile, activation_checkpointing): the recipe's
    own switches, in place. tokens: real (non-padding) tokens of the batch. what: the size, for the summary."""

    build: Callable[[], torch.nn.Module]
    loss: Callable[[torch.nn.Module], torch.Tensor]
    apply: Callable[[torch.nn.Module, bool, bool], None]
    tokens: int
    what: str


def same_weights(case: SwitchCase, model: torch.nn.Module) -> torch.nn.Module:
    """A second model with `model`'s weights and buffers (built, not deep-copied: muP keeps its base shapes on the
    parameters as attributes that a copy loses)."""
    twin = case.build()
    twin.load_state_dict(model.state_dict())
    return twin


@contextlib.contextmanager
def compile_backend(device: torch.device) -> Iterator[str]:
    """The backend that `torch.compile` / `nn.Module.compile()` calls made inside get (see the module docstring)."""
    if device.type == "cuda":
        yield "inductor"
        return
    original = torch.compile

    def dry_run_compile(*args, **kwargs):
        kwargs.setdefault("backend", DRY_RUN_BACKEND)
        return original(*args, **kwargs)

    torch.compile = dry_run_compile
    try:
        yield DRY_RUN_BACKEND
    finally:
        torch.compile = original


def loss_and_grads(ctx: Context, model: torch.nn.Module, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, all gradients flattened) of one forward + backward: bf16 autocast on CUDA, fp32 on CPU."""
    model.zero_grad(set_to_none=True)
    with bf16_autocast(ctx.device) if ctx.is_cuda else contextlib.nullcontext():
        loss = loss_fn(model)
    loss.backward()
    grads = torch.cat([p.grad.detach().float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def _parity(ctx: Context, plain, switched, loss_fn, label: str) -> tuple[dict, dict, float]:
    """Relative errors of loss and gradients of `switched` against `plain`; also the first switched step's seconds."""
    ref_loss, ref_grads = loss_and_grads(ctx, plain, loss_fn)
    start = time.perf_counter()
    loss, grads = loss_and_grads(ctx, switched, loss_fn)
    first_s = time.perf_counter() - start
    errors = {f"{label} loss": relative_error(loss, ref_loss), f"{label} grads": relative_error(grads, ref_grads)}
    limits = dict.fromkeys(errors, SWITCH_TOLERANCE[ctx.device.type])
    return errors, limits, first_s


def _throughputs(ctx: Context, case: SwitchCase, models: dict[str, torch.nn.Module]) -> dict[str, dict]:
    """measure_throughput of each model on the case's batch, FLOPs counted once on the first (the eager one)."""
    first = next(iter(models.values()))
    flops = count_flops(fwd_bwd_step(first, lambda: case.loss(first), ctx.device))
    params = sum(p.numel() for p in first.parameters())
    return {
        name: measure_throughput(
            ctx, fwd_bwd_step(m, lambda m=m: case.loss(m), ctx.device), case.tokens, params, flops
        )[1]
        for name, m in models.items()
    }


def compile_row(ctx: Context, case: SwitchCase) -> tuple[str, dict]:
    """compile on vs off: parity of loss and gradients, then (CUDA) tokens/s and MFU of both (real tokens)."""
    eager = case.build()
    compiled = same_weights(case, eager)
    with compile_backend(ctx.device) as backend:
        case.apply(compiled, True, False)
        errors, limits, compile_s = _parity(ctx, eager, compiled, case.loss, "compiled")
        summary, metrics = parity_result(errors, limits, f"{case.what}, {backend}")
        metrics.update(backend=backend, first_step_s=compile_s)
        rates = _throughputs(ctx, case, {"eager": eager, "compiled": compiled}) if ctx.is_cuda else None
    torch._dynamo.reset()  # the next row starts without this model's graphs and guards
    if rates is None:
        return f"{summary}; first compiled step {compile_s:.1f} s; speed on CUDA only", metrics
    speedup = rates["compiled"]["tokens_per_s"] / rates["eager"]["tokens_per_s"]
    summary += (
        f"; {rates['compiled']['tokens_per_s']:,.0f} vs {rates['eager']['tokens_per_s']:,.0f} tok/s (x{speedup:.2f}), "
        f"MFU {rates['compiled']['mfu']:.1%} vs {rates['eager']['mfu']:.1%}; first compiled step {compile_s:.1f} s"
    )
    return summary, {**metrics, "speedup": speedup, **_flat(rates)}


def checkpointing_row(ctx: Context, case: SwitchCase) -> tuple[str, dict]:
    """activation checkpointing on vs off: equal loss and gradients, then (CUDA) peak memory and tokens/s of both."""
    plain = case.build()
    checkpointed = same_weights(case, plain)
    case.apply(checkpointed, False, True)
    errors, limits, _ = _parity(ctx, plain, checkpointed, case.loss, "checkpointed")
    summary, metrics = parity_result(errors, limits, case.what)
    if not ctx.is_cuda:
        return f"{summary}; peak memory and speed on CUDA only", metrics
    rates = _throughputs(ctx, case, {"off": plain, "on": checkpointed})
    speed = rates["on"]["tokens_per_s"] / rates["off"]["tokens_per_s"]
    memory = rates["on"]["peak_mem_gib"] / rates["off"]["peak_mem_gib"]
    summary += (
        f"; peak mem {rates['off']['peak_mem_gib']:.2f} -> {rates['on']['peak_mem_gib']:.2f} GiB (x{memory:.2f}), "
        f"tok/s x{speed:.2f}"
    )
    return summary, {**metrics, "memory_ratio": memory, "speed_ratio": speed, **_flat(rates)}


def _flat(rates: dict[str, dict]) -> dict[str, float]:
    keys = ("tokens_per_s", "mfu", "peak_mem_gib", "step_s_median")
    return {f"{name}_{key}": metrics[key] for name, metrics in rates.items() for key in keys}


def run_switch_rows(ctx: Context, recorder: Recorder, switch_case: Callable[[Context], SwitchCase]) -> int:
    """The compile and activation-checkpointing rows, each on a freshly built case; returns 0 (rows record failures)."""
    recorder.run("compile", lambda: compile_row(ctx, switch_case(ctx)))
    recorder.run("activation checkpointing", lambda: checkpointing_row(ctx, switch_case(ctx)))
    return 0
