"""What every per-recipe check module shares: result rows, parity and throughput measurement, CLI training runs.

A check module runs as `python -m gpu_check.check_<recipe> --device D --out DIR --peak-tflops P` with the recipe
folder as cwd (so the recipe's own `model`/`data` modules import) and writes DIR/rows.json after every check, so
the rows that finished survive a timeout of the process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gpu_check.sizes import sizes_for

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# Relative L2 error allowed between a fast path and its fp32 reference: bf16 keeps 8 mantissa bits (~4e-3 per
# rounding), so 1e-3..1e-2 is expected; fp32-vs-fp32 differences come only from summation order.
BF16_TOLERANCE = 3e-2
FP32_TOLERANCE = 1e-4
# Final weights of an interrupted + resumed run vs an uninterrupted one (relative L2 over all tensors). On CPU the
# kernels are deterministic, so the runs must agree to rounding; on CUDA, atomics in attention/scan backward passes
# and bf16 make reductions order-dependent, and Adam amplifies that over the second half of the run.
RESUME_TOLERANCE = {"cpu": 1e-5, "cuda": 1e-2}


class CheckFailed(Exception):
    """A check ran but a number is out of bounds (the message is the row's one-line reason)."""


class CheckSkipped(Exception):
    """A check that does not apply here (the message says why)."""


@dataclass
class Row:
    recipe: str
    check: str
    status: str
    summary: str = ""
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def one_line(error: BaseException, limit: int = 240) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (CheckFailed, CheckSkipped)):
        text = f"{type(error).__name__}: {text}"
    return text[:limit]


def write_json_atomic(path: Path, payload) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class Recorder:
    """Runs checks one by one; a failing check becomes a FAIL row and the next check still runs."""

    def __init__(self, recipe: str, out_dir: Path):
        self.recipe, self.out_dir, self.rows = recipe, out_dir, []
        out_dir.mkdir(parents=True, exist_ok=True)

    def run(self, check: str, fn: Callable[[], tuple[str, dict]]) -> Row:
        start = time.perf_counter()
        try:
            summary, metrics = fn()
            status = PASS
        except CheckSkipped as error:
            status, summary, metrics = SKIP, one_line(error), {}
        except Exception as error:  # any failure is this check's row, never the end of the others
            status, summary, metrics = FAIL, one_line(error), {}
            (self.out_dir / f"{check}.traceback.txt").write_text(traceback.format_exc())
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        row = Row(self.recipe, check, status, summary, metrics, round(time.perf_counter() - start, 1))
        self.rows.append(row)
        write_json_atomic(self.out_dir / "rows.json", [asdict(r) for r in self.rows])
        print(f"[{self.recipe}] {check}: {status} {summary} ({row.seconds} s)", flush=True)
        return row


@dataclass
class Context:
    recipe: str
    device: torch.device
    out_dir: Path
    peak_tflops: float
    sizes: dict

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def parse_context(recipe: str, argv: list[str] | None = None) -> Context:
    parser = argparse.ArgumentParser(description=f"GPU-readiness checks of {recipe}")
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peak-tflops", type=float, default=float("nan"), help="bf16 matmul peak for MFU")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    torch.manual_seed(0)
    return Context(
        recipe, torch.device(args.device), args.out.resolve(), args.peak_tflops, sizes_for(args.device, recipe)
    )


def bf16_autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (Frobenius norms); NaN when either holds a NaN."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise CheckFailed(f"shapes differ: {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def parity_result(errors: dict[str, float], limits: dict[str, float], what: str) -> tuple[str, dict]:
    """The row of a parity check: FAIL on NaN or any error above its limit."""
    bad = [f"{k} {v:.2e} > {limits[k]:.0e}" for k, v in errors.items() if not math.isfinite(v) or v > limits[k]]
    if bad:
        raise CheckFailed(f"{what}: " + "; ".join(bad))
    return f"{what}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), {"rel_err": errors, "limits": limits}


def count_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of `step` (matmuls and attention, forward + backward) by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def measure_throughput(
    ctx: Context, step: Callable[[], None], tokens_per_step: int, params: int, flops: int | None = None
) -> tuple[str, dict]:
    """tokens/s, achieved TFLOP/s, MFU against ctx.peak_tflops and peak memory of `step` (forward + backward).

    `tokens_per_step` counts real tokens only (never padding). FLOPs are counted once by FlopCounterMode (matmul and
    SDPA FLOPs; elementwise work such as Mamba's scan is not counted, as usual for MFU) unless `flops` gives the
    FLOPs of the real tokens (padded batches, compiled models); time is the median of `repeats` timed steps after
    `warmup` untimed ones."""
    warmup, repeats = ctx.sizes["warmup"], ctx.sizes["repeats"]
    flops = count_flops(step) if flops is None else flops
    for _ in range(warmup):
        step()
    synchronize(ctx.device)
    if ctx.is_cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(ctx.device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    tflops = flops / seconds / 1e12
    metrics = {
        "tokens_per_step": tokens_per_step,
        "step_s_median": seconds,
        "tokens_per_s": tokens_per_step / seconds,
        "flops_per_step": flops,
        "achieved_tflops": tflops,
        "peak_tflops": ctx.peak_tflops,
        "mfu": tflops / ctx.peak_tflops if ctx.peak_tflops > 0 else float("nan"),
        "params_m": params / 1e6,
        "peak_mem_gib": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.is_cuda else float("nan"),
    }
    if not math.isfinite(metrics["tokens_per_s"]) or flops <= 0:
        raise CheckFailed(f"no usable timing (flops {flops}, step {seconds:.3g} s)")
    memory = f"peak mem {metrics['peak_mem_gib']:.1f} GiB" if ctx.is_cuda else "peak mem n/a on CPU"
    summary = (
        f"{metrics['tokens_per_s']:,.0f} tok/s, {tflops:.3g} TFLOP/s, MFU {metrics['mfu']:.1%}, "
        f"{memory} ({params / 1e6:.3g}M params, {tokens_per_step} tok/step)"
    )
    return summary, metrics


def fwd_bwd_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device):
    """One bf16-autocast forward + backward; gradients are dropped so memory does not grow."""

    def step() -> None:
        with bf16_autocast(device):
            loss = loss_fn()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


# ---- training runs through the recipe's own command line -------------------------------------------------------


def run_cli(argv: list[str], log_path: Path, timeout: float) -> None:
    """Run a recipe command (cwd: the recipe folder); CheckFailed with its last stderr line when it fails."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            result = subprocess.run(
                [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"{argv[0]} ran past {timeout:.0f} s (log: {log_path.name})") from None
    if result.returncode != 0:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        raise CheckFailed(f"{argv[0]} exited {result.returncode}: {lines[-1] if lines else 'no output'}")
    print(f"  {argv[0]} took {time.perf_counter() - start:.1f} s", flush=True)


def read_losses(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, loss) from every metrics.jsonl under run_dir, in step order (training-loss records only)."""
    records = []
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if isinstance(record.get(key), (int, float)):
                records.append((int(record.get("step", 0)), float(record[key])))
    return sorted(records)


def median_metric(run_dir: Path, key: str) -> float:
    """Median of `key` over the second half of the metrics records (the first ones include start-up)."""
    values = [v for _, v in read_losses(run_dir, key)]
    values = values[len(values) // 2 :]
    return sorted(values)[len(values) // 2] if values else float("nan")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (every recipe exports `final_model/model.safetensors`)."""
    from safetensors.torch import load_file

    return load_file(path)


def weights_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative L2 difference over all floating tensors of two state dicts with the same keys."""
    if set(a) != set(b):
        raise CheckFailed(f"state dicts differ in keys: {sorted(set(a) ^ set(b))[:3]}")
    num = den = 0.0
    for key, tensor in a.items():
        if tensor.is_floating_point():
            num += float((tensor.double() - b[key].double()).square().sum())
            den += float(tensor.double().square().sum())
    return math.sqrt(num / max(den, 1e-30))


@dataclass
class TrainSpec:
    """How to train a recipe from its command line, interrupt it halfway and resume it.

    full(run_dir): argv of the whole run, which also saves a checkpoint halfway. Every recipe follows one run
    contract, so the same argv resumes, the weights are `final_model/model.safetensors`, and a copy of the finished
    run pruned back to its first checkpoint looks like a run killed there. `stop(run_dir)`, when given, is an argv
    that stops halfway instead of the pruned copy."""

    full: Callable[[Path], list[str]]
    stop: Callable[[Path], list[str]] | None = None


def interrupt_after_first_checkpoint(run_dir: Path) -> None:
    """Make a finished run folder look like one killed after its first checkpoint (every recipe has the same layout:
    `checkpoints/step_N/`, `final_model/`, `run_finished.json`): later checkpoints and the final outputs go."""
    found = sorted((run_dir / "checkpoints").glob("step_*"))
    if len(found) < 2:
        raise CheckFailed(f"expected >= 2 checkpoints in {run_dir / 'checkpoints'}, found {[p.name for p in found]}")
    for path in [*found[1:], run_dir / "final_model", run_dir / "run_finished.json"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def train_and_resume(ctx: Context, spec: TrainSpec, timeout: float) -> tuple[str, dict]:
    """Full run (loss must fall), then an interrupted + resumed run whose final weights must match it."""
    full_dir, resumed_dir = ctx.out_dir / "train_full", ctx.out_dir / "train_resumed"
    for path in (full_dir, resumed_dir):
        shutil.rmtree(path, ignore_errors=True)
    deadline = time.perf_counter() + timeout
    run_cli(spec.full(full_dir), ctx.out_dir / "train_full.log", timeout)
    records = read_losses(full_dir)
    losses, steps = [loss for _, loss in records], records[-1][0] if records else 0
    if len(losses) < 2:
        raise CheckFailed(f"fewer than 2 losses logged in {full_dir}")
    head, tail = losses[: max(1, len(losses) // 4)], losses[-max(1, len(losses) // 4) :]
    first, last = sum(head) / len(head), sum(tail) / len(tail)
    if not (math.isfinite(last) and last < first):
        raise CheckFailed(f"loss did not fall: {first:.4f} -> {last:.4f}")
    if spec.stop is not None:
        run_cli(spec.stop(resumed_dir), ctx.out_dir / "train_stop.log", max(1.0, deadline - time.perf_counter()))
    else:
        shutil.copytree(full_dir, resumed_dir)
        interrupt_after_first_checkpoint(resumed_dir)
    run_cli(spec.full(resumed_dir), ctx.out_dir / "train_resume.log", max(1.0, deadline - time.perf_counter()))
    diff = weights_difference(*(load_weights(d / "final_model" / "model.safetensors") for d in (full_dir, resumed_dir)))
    tolerance = RESUME_TOLERANCE[ctx.device.type]
    metrics = {"loss_first": first, "loss_last": last, "steps": steps, "resume_rel_diff": diff, "tol": tolerance}
    summary = f"loss {first:.3f} -> {last:.3f} in {steps} steps; resumed weights rel diff {diff:.1e}"
    if not diff <= tolerance:
        raise CheckFailed(f"{summary} > tol {tolerance:.0e}")
    return f"{summary} (tol {tolerance:.0e})", metrics


def run_standard_checks(recipe: str, parity, throughput, train) -> tuple[Context, Recorder]:
    """The three checks every recipe has, in order, each recorded as one row (a failure does not stop the next)."""
    ctx = parse_context(recipe)
    recorder = Recorder(recipe, ctx.out_dir)
    recorder.run("parity", lambda: parity(ctx))
    recorder.run("throughput", lambda: throughput(ctx))
    recorder.run("train+resume", lambda: train(ctx))
    return ctx, recorder
