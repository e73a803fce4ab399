"""Pretrain Geneformer with masked-LM on tokenized cells.

    python train.py                                         # l0_sanity on the bundled sample, CPU friendly
    torchrun --nproc_per_node=8 train.py --config-name 106m data.train_path=... data.vocab_path=...
    python train.py --config-name 4b --cfg job              # print the composed config
    python train.py model.init_from=/models/Geneformer-V1-10M data.vocab_path=...   # start from published weights

One command for the first run and every requeue: the same command resumes from the newest valid checkpoint, a
finished run exits 0 without training, SIGTERM/SIGUSR1 save and exit 0 (the shared `TrainingRun`, `run.training`).
Outputs, all under training.output_dir: checkpoints/step_N/, final_model/ (safetensors + config.json, Hugging Face
BERT layout), metrics.jsonl, loss.tsv, loss_curve.png, run_finished.json. DDP by default, FSDP2 with
training.use_fsdp=true.
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import contextlib
import math
import sys

import torch

import sweep
from biorecipes_shared import (
    MetricsWriter,
    TrainingRun,
    all_reduce_mean,
    gather_full_state_dict,
    get_logger,
    peak_memory,
    run_cli,
    teardown_distributed,
    unwrap_model,
)
from config import GeneformerConfig, config_from_argv, recipe_path, validate
from data import batch_cells, batch_token_counts, iterate_batches
from export import export_final_model
from fp8 import fp8_autocast
from preprocess import DataError
from run_state import Run, RunState, build_run

USER_ERRORS = (DataError, FloatingPointError)  # ConfigError, CheckpointError and write errors: run_cli knows them


def precision_context(cfg: GeneformerConfig, device: torch.device):
    """bf16 autocast (if asked), and inside it the FP8 context of the backend (fp8.py; checked by validate)."""
    stack = contextlib.ExitStack()
    if cfg.training.bf16:
        stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    stack.enter_context(fp8_autocast(cfg))
    return stack


def train_step(run: Run, state: RunState, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on this rank's micro-batch; advances `state.step`; returns (loss, grad norm) before the
    update, detached."""
    batch = {key: value.to(run.dist_ctx.device, non_blocking=True) for key, value in batch.items()}
    with precision_context(run.cfg, run.dist_ctx.device):
        loss = run.wrapped(**batch, masked_logits_only=True).loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), run.cfg.training.grad_clip_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    tokens, positions = batch_token_counts(batch)
    run.meter.update(samples=batch_cells(batch), tokens=tokens, positions=positions)
    return loss.detach(), grad_norm


def log_step(run: Run, state: RunState, loss: torch.Tensor, grad_norm) -> None:
    """Mean loss over ranks into metrics.jsonl / loss.tsv and the console; a non-finite loss stops the run."""
    mean_loss = all_reduce_mean(loss.float()).item()
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    state.losses.append(mean_loss)
    rates, lr = run.meter.rates(), run.scheduler.get_last_lr()[0]
    epoch = state.position["epoch"]
    run.metrics.log(
        state.step, loss=mean_loss, lr=lr, grad_norm=float(grad_norm), epoch=epoch, **rates, **peak_memory()
    )
    run.log.info(
        f"step {state.step}/{run.training.max_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
        f"{rates['tokens_per_s']:.0f} tokens/s  useful {rates['useful_token_fraction']:.2f}"
    )
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"loss became {mean_loss} at step {state.step}")


def stopped_before_start(run: Run, state: RunState) -> bool:
    """A signal during imports or set-up: the last saved state stands, nothing is saved or exported."""
    if not run.training.stop_requested():  # a collective; once true, finish() leaves the run unfinished
        return False
    name = run.training.preemption.signal_name()
    run.log.warning(f"{name} before step {state.step + 1}: stopped; rerun the same command to continue")
    return True


def train_loop(run: Run, state: RunState) -> None:
    """Step until max_steps or a stop signal; the shared TrainingRun says when to save (interval, end, signal)."""
    data = run.cfg.data
    batches = iterate_batches(
        run.dataset, run.collator, data.micro_batch_size, run.cfg.training.seed, run.dist_ctx.rank,
        run.dist_ctx.world_size, state.position, batching=data.batching,
    )  # fmt: skip
    run.wrapped.train()
    if stopped_before_start(run, state):
        return
    while state.step < run.training.max_steps:
        state.position, batch = next(batches)
        loss, grad_norm = train_step(run, state, batch)
        if state.step % run.cfg.training.log_every_n_steps == 0 or state.step == run.training.max_steps:
            log_step(run, state, loss, grad_norm)
        if run.training.should_save(state.step):
            run.training.save(state.step)
        if run.training.stopped:
            run.log.warning(f"preempted: saved step {state.step}; rerun the same command to resume")
            return


def finish(run: Run, state: RunState) -> None:
    """Unless stopped: export final_model/ (weights, config, vocab), plot the loss curve, mark the run finished."""
    if run.training.stopped:
        return
    sharded = run.cfg.training.use_fsdp  # gathering the shards is a collective: every rank takes part
    full_state = gather_full_state_dict(run.wrapped) if sharded else unwrap_model(run.wrapped).state_dict()
    run.training.finish(export=lambda folder: export_final_model(run.model, full_state, folder, run.vocab))
    layout = run.training.layout
    run.log.info(
        f"done: final model {layout.final_model}, metrics {layout.metrics}, loss curve {layout.loss_curve}, "
        f"checkpoints {layout.checkpoints}"
    )


def training_run(cfg: GeneformerConfig) -> TrainingRun:
    """The shared run contract for these settings; the end step (`training.max_steps`) is read here only."""
    training = cfg.training
    return TrainingRun(
        recipe_path(training.output_dir), max_steps=training.max_steps, save_every=training.save_every,
        keep_last=training.keep_last, resume=training.resume, sharded=training.use_fsdp,
    )  # fmt: skip


def train(cfg: GeneformerConfig, logger_factory=get_logger) -> list[float]:
    """Run, resume or (when already finished) skip training as configured; returns the losses this call logged.

    Raises ConfigError / DataError / CheckpointError / WriteError (one line each) before any output for bad input."""
    validate(cfg)
    training = training_run(cfg)
    if training.report_finished():  # before building anything: a finished run stays finished (rank 0 says so)
        return []
    run, state = build_run(cfg, training, logger_factory)
    tsv = {"loss.tsv": ["step", "loss"]}
    wandb = cfg.training.wandb_init_args or None
    metrics = MetricsWriter(
        training.layout.output_dir, run.dist_ctx, tsv_files=tsv, wandb_init_args=wandb, resume_step=state.step
    )
    with metrics, training:
        run.metrics = metrics
        train_loop(run, state)
    finish(run, state)
    teardown_distributed()
    return state.losses


def run_sweep(argv: list[str]) -> None:
    """Every job of a `-m` sweep in its own run folder (sweep.py); a job stopped by a signal ends the sweep."""
    show, configs = sweep.sweep_configs(argv)
    if show is not None:
        sweep.print_configs(configs, show)
        return
    for number, (job, cfg) in enumerate(configs):
        print(f"sweep job {number}/{len(configs)}: {' '.join(job)} -> {cfg.training.output_dir}", file=sys.stderr)
        train(cfg)
        if training_run(cfg).finished_message() is None:
            print(f"sweep stopped at job {number}: rerun the same command to continue", file=sys.stderr)
            return


def main(argv: list[str] | None = None) -> int:
    """The command line: one `error: …` line and exit 1 for bad input, settings or a failed write."""

    def entry() -> None:
        args = sys.argv[1:] if argv is None else list(argv)
        if sweep.is_sweep(args):
            run_sweep(args)
            return
        cfg = config_from_argv(args)
        if cfg is not None:
            train(cfg)

    return run_cli(entry, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())  # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
