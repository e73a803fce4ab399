"""ESM-2 masked-LM pretraining on token-budget shards: transformers' EsmForMaskedLM, a plain PyTorch loop (DDP).

    accelerate launch src/train.py --train_dir data/train --val_dir data/val
    torchrun --nproc_per_node=8 src/train.py --train_dir data/train --val_dir data/val training.max_steps=1000
    python src/train.py --config src/config_tiny_cpu.yaml --train_dir ... --val_dir ...   # one CPU process

Trailing `section.key=value` arguments override the YAML config. The same command serves the first run and every
requeue: `--resume auto` (the default; `latest` means the same) continues from the newest complete
`<output_dir>/checkpoints/step_N/`, including the position in the training data stream, or starts fresh; `none`
starts fresh (refused when checkpoints exist); a path resumes exactly that checkpoint. A finished run stays finished.

The flow: parse -> settings (config.py) -> Run, built once (run_state.py: data checks and stream in data.py, model
in model.py) -> the loop below (train_step, log_step, evaluate, the shared run object's save) -> finish (export.py).
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import argparse
import contextlib
import math
import sys
from pathlib import Path

import torch

from biorecipes_shared import ThroughputMeter, all_reduce_mean, get_logger, run_cli, teardown_distributed
from config import RecipeConfig, load
from data import DataDirError, eval_batches, make_train_loader
from export import export_final_model, load_best_weights
from fasta_reader import FastaError
from model import IGNORE_INDEX, ModelConfigError
from run_state import Run, RunState, Window, build_run, new_training_run, open_writer, restore

log = get_logger("esm2_fa")
USER_ERRORS = (DataDirError, ModelConfigError, FastaError)


def precision_context(mixed_precision: str, device: torch.device):
    """bf16/fp16 autocast on the device, or nothing for "no"."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(run: Run, state: RunState, batches: list[dict[str, torch.Tensor]]) -> float:
    """One optimizer step over the rank's `gradient_accumulation_steps` micro-batches ([B, L] int64 tensors each);
    advances `state` and returns the gradient norm. Each micro-batch's loss is its mean over masked tokens,
    divided by the number of micro-batches."""
    t, device, wrapped, scaler = run.cfg.training, run.ctx.device, run.wrapped, run.scaler
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        with sync:
            with precision_context(t.mixed_precision, device):
                loss = wrapped(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}) / len(batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
        run.meter.update(
            samples=batch["input_ids"].size(0),
            tokens=int(batch["attention_mask"].sum()),
            positions=batch["attention_mask"].numel(),
        )
    if scaler is not None:
        scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), t.gradient_clipping)
    if scaler is not None:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step, state.consumed = state.step + 1, state.consumed + len(batches)
    state.window.add(float(total), batches)
    return float(grad_norm)


def log_step(run: Run, state: RunState, grad_norm: float) -> None:
    """One training line: mean loss over the window and ranks, LR, grad norm, real tokens/s, useful-token fraction."""
    window = state.window
    loss = all_reduce_mean(window.loss_sum / max(window.steps, 1))
    rates = run.meter.rates()  # wall-clock rates of this process; the fraction comes from the (resumable) window
    rates["useful_token_fraction"] = window.tokens / max(window.positions, 1)
    lr = run.scheduler.get_last_lr()[0]
    run.writer.log(state.step, loss=loss, learning_rate=lr, grad_norm=grad_norm, **rates)
    log.info(
        "step %d/%d  loss %.4f  lr %.2e  tokens/s %.0f  useful tokens %.3f",
        state.step, run.training.max_steps, loss, lr, rates["tokens_per_s"], rates["useful_token_fraction"],
    )  # fmt: skip


def evaluate(run: Run, state: RunState) -> None:
    """Token-weighted MLM loss over the whole val dir (rank r takes every world_size-th batch), logged and recorded
    for best-checkpoint and early stopping."""
    cfg, ctx, wrapped = run.cfg, run.ctx, run.wrapped
    wrapped.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad(), precision_context(cfg.training.mixed_precision, ctx.device):
        for batch in eval_batches(cfg.data.val_dir, ctx.rank, ctx.world_size, cfg.training.mlm_probability):
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            totals[0] += wrapped(**batch, reduction="sum").item()
            totals[1] += int((batch["labels"] != IGNORE_INDEX).sum())
    wrapped.train()
    loss_sum, n_masked = all_reduce_mean(totals).tolist()  # a mean of sums keeps the ratio of sums
    loss = loss_sum / max(n_masked, 1.0)
    metrics = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
    run.writer.log(state.step, **metrics)
    log.info("step %d  eval_loss %.4f", state.step, loss)
    t = cfg.training
    key = t.metric_for_best_model if t.metric_for_best_model.startswith("eval_") else f"eval_{t.metric_for_best_model}"
    state.record_evaluation(metrics[key], t.greater_is_better, t.early_stopping.threshold)


def over(run: Run, state: RunState) -> str | None:
    """Why the run has nothing left to do (max_steps, early stopping), or None."""
    t = run.cfg.training
    if state.step >= run.training.max_steps:
        return "max_steps reached"
    if t.early_stopping.enabled and state.patience_counter >= t.early_stopping.patience:
        return f"early stopping (no {t.metric_for_best_model} improvement)"
    return None


def train(run: Run, state: RunState) -> None:
    """Step until the run is over or a stop signal arrives; the run object says when to save."""
    t = run.cfg.training
    run.stream.start_batch = state.consumed  # batches this rank consumed before: skipped without reading
    batches, run.meter = iter(make_train_loader(run.stream, run.cfg.data.num_workers)), ThroughputMeter()
    run.wrapped.train()
    if over(run, state) is None:
        run.training.stop_requested()  # a signal during set-up: stop before the first step, nothing new to save
    while over(run, state) is None and not run.training.stopped:
        grad_norm = train_step(run, state, [next(batches) for _ in range(t.gradient_accumulation_steps)])
        if state.step % t.logging_steps == 0:
            log_step(run, state, grad_norm)
            state.window = Window()
        if state.step % t.eval_steps == 0:
            evaluate(run, state)
        if run.training.should_save(state.step) or over(run, state):  # also early stopping's last step
            run.training.save(state.step)


def finish(run: Run, state: RunState) -> Path | None:
    """After a stop signal: say how to continue. Otherwise export final_model/ (the best weights when asked), plot
    the loss and mark the run finished; returns final_model/."""
    layout, is_main = run.training.layout, run.ctx.is_main
    if run.training.stopped:
        if is_main and state.step == 0:
            print("stopped by a signal before the first step: nothing to save; rerun the same command", flush=True)
        elif is_main:
            print(f"preempted at step {state.step}: checkpoint saved in {layout.checkpoints}; "
                  "rerun the same command to continue", flush=True)  # fmt: skip
        return None

    def export(folder: Path) -> None:
        if run.cfg.training.load_best_model_at_end:
            load_best_weights(run.model, layout.checkpoints, state.best_step)
        export_final_model(run.model, folder)

    reason = over(run, state)
    early = reason.startswith("early")
    run.training.finish(export, reason=reason, early_stopped=early, best_metric=state.best_metric)
    if is_main:
        print(
            f"done at step {state.step} (best {run.cfg.training.metric_for_best_model} {state.best_metric}): "
            f"outputs in {layout.output_dir}: final_model/, checkpoints/, metrics.jsonl, loss_curve.png, "
            "run_finished.json",
            flush=True,
        )
    return layout.final_model


def run(cfg: RecipeConfig) -> Path | None:
    """Train according to cfg; returns the final export dir (None: nothing to do, or preempted after saving)."""
    training = new_training_run(cfg)
    if training.report_finished():  # before building anything: a finished run stays finished
        return None
    run_ = build_run(cfg, training)
    state = restore(run_)
    with run_.training, open_writer(run_, state) as run_.writer:
        train(run_, state)
    return finish(run_, state)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command line: the original's flags (as aliases of settings) plus `section.key=value` overrides."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (default: src/config.yaml)")
    parser.add_argument("--train_dir", help="shards from data_processing.py (data.train_dir)")
    parser.add_argument("--val_dir", help="validation shards (data.val_dir)")
    parser.add_argument("--output_dir", help="checkpoints, metrics and final_model/ (training.output_dir)")
    parser.add_argument(
        "--resume",
        help="training.resume: auto (default; `latest` = auto): newest complete checkpoint, else a fresh start; "
        "none: fresh start (refused if checkpoints exist); or a checkpoints/step_N dir",
    )
    parser.add_argument("--resume_from_checkpoint", help="the old name of --resume")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=1000")
    args = parser.parse_args(argv)
    aliases = {
        "data.train_dir": args.train_dir,
        "data.val_dir": args.val_dir,
        "training.output_dir": args.output_dir,
        "training.resume": args.resume,
        "training.resume_from_checkpoint": args.resume_from_checkpoint,  # renamed by config.load, with a note
    }
    return args, [*args.overrides, *(f"{key}={value}" for key, value in aliases.items() if value is not None)]


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: user, settings and write errors print one `error:` line and exit 1; preemption exits 0."""

    def train_from_cli() -> None:
        args, overrides = parse_args(argv)
        run(load(args.config, overrides))
        teardown_distributed()

    return run_cli(train_from_cli, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())  # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
