"""Train OmniBioTA with masked-language modelling on encoded DNA/RNA/protein tokens (settings: config.py).

    torchrun --nproc_per_node=4 train_encoder.py --base_dir data/encoded --save_name omni_small ...
    python train_encoder.py --config configs/sample.yaml

parse → Run (run_state.py) → loop (train_step → log_step → validate → save) → finish. The same command serves the
first run and every requeue: it resumes from the newest valid checkpoint, and a finished run exits 0.
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import contextlib
import sys
from pathlib import Path

import torch

from biorecipes_shared import (
    MetricsWriter,
    all_reduce_mean,
    get_logger,
    peak_memory,
    run_cli,
    setup_distributed,
    teardown_distributed,
)
from config import TrainConfig, parse_config
from data import draw_batch, micro_batches
from errors import OmniBioteError
from export import export_final_model
from run_state import Run, RunState, build_run, open_run

Batch = list[tuple[dict[str, torch.Tensor], float]]  # this rank's micro-batches of one step, with loss weights


def step_batches(run: Run, state: RunState) -> Batch:
    """This rank's share of the next step's global mini-batches (data.py: the same for any world size).

    The meter counts this rank's real tokens (not padding, not the weight-0 stand-ins of the batch ramp) and every
    position the model computes on."""
    cfg, dist_ctx = run.cfg, run.dist_ctx
    first_unit = state.samples_seen // cfg.mini_batch_size
    batch = []
    for unit, weight in micro_batches(
        run.plan.accumulation(state.step), dist_ctx.world_size, dist_ctx.rank, first_unit
    ):
        micro = draw_batch(run.batcher, cfg.seed, "train", unit)
        real = int((micro["doc_ids"] >= 0).sum()) if weight > 0 else 0  # on the CPU copy: no device sync
        run.meter.update(samples=cfg.mini_batch_size if weight > 0 else 0, tokens=real,
                         positions=micro["doc_ids"].numel())  # fmt: skip
        batch.append((micro, weight))
    return batch


def train_step(run: Run, state: RunState, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches; advances the state; returns (loss, grad norm)."""
    device = run.dist_ctx.device
    step_loss = torch.zeros((), device=device)
    for number, (micro, weight) in enumerate(batch):
        micro = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
        # gradients are all-reduced only on the last micro-batch of a step
        sync = number == len(batch) - 1 or not run.dist_ctx.is_distributed
        with contextlib.nullcontext() if sync else run.ddp_model.no_sync(), run.autocast():
            loss = run.ddp_model(**micro) * weight
        loss.backward()
        step_loss += loss.detach()  # no GPU sync per micro-batch; read at log steps only
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.samples_seen += run.plan.accumulation(state.step) * run.cfg.mini_batch_size
    state.step += 1
    return step_loss, grad_norm


def log_step(run: Run, state: RunState, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Training loss, LR, gradient norm and throughput, every --log_freq steps and at the last step."""
    if state.step % run.cfg.log_freq and state.step != run.end:
        return
    tokens, loss_value = state.tokens_seen(run.cfg.ctx_len), float(all_reduce_mean(loss.item()))
    rates = {**run.meter.rates(), **peak_memory()}
    lr = run.scheduler.get_last_lr()[0]
    run.metrics.log(state.step, tokens=tokens, loss=loss_value, lr=lr, grad_norm=float(grad_norm), **rates)
    run.log.info("step %d/%d  tokens %d  loss %.4f  %.0f tokens/s  useful %.3f", state.step, run.plan.total_steps,
                 tokens, loss_value, rates["tokens_per_s"], rates["useful_token_fraction"])  # fmt: skip


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """Mean MLM loss over the fixed validation batches, averaged over ranks."""
    run.model.eval()
    losses = []
    for batch in run.val_batches:
        with run.autocast():
            losses.append(float(run.model(**{k: v.to(run.dist_ctx.device) for k, v in batch.items()})))
    run.model.train()
    return float(all_reduce_mean(sum(losses) / len(losses)))


def validate(run: Run, state: RunState) -> None:
    val_loss = validation_loss(run)
    run.metrics.log(state.step, tokens=state.tokens_seen(run.cfg.ctx_len), val_loss=val_loss)
    run.log.info("step %d  val_loss %.4f", state.step, val_loss)


def crossed(freq: float, before: int, after: int) -> bool:
    """True when a multiple of freq tokens lies in (before, after]: time to validate or save."""
    return freq > 0 and int(after // freq) > int(before // freq)


def open_metrics(run: Run, state: RunState) -> None:
    """The run folder's metrics files; a fresh start logs the validation loss of the initial weights first."""
    # the first validation runs before the run folder exists: a run that cannot even do that leaves nothing
    initial_val_loss = validation_loss(run) if state.step == 0 else None
    wandb_args = {"project": run.cfg.wandb_project_name, "name": Path(run.cfg.output_dir).name}
    run.metrics = MetricsWriter(
        run.cfg.output_dir, run.dist_ctx, tsv_files={"log_file.txt": ["step", "tokens", "loss"]},
        wandb_init_args=wandb_args if run.cfg.wandb_project_name else None,
        resume_step=state.step if state.resumed_from is not None else -1,  # fresh: drop a killed run's lines
    )  # fmt: skip
    if initial_val_loss is not None:
        run.metrics.log(0, tokens=0, val_loss=initial_val_loss)


def finish(run: Run, state: RunState) -> Path | None:
    """Export final_model/, plot and mark the run finished (the shared run contract); or, after a stop signal,
    say how to continue. Returns the final_model/ folder, None when stopped."""
    if run.training.stopped or state.step < run.end:
        run.log.info("stopped at step %d of %d; rerun the same command to continue", state.step, run.end)
        return None
    reason = "token budget reached" if run.end == run.plan.total_steps else "--max_steps reached"
    export = lambda folder: export_final_model(run.model, run.tokenizer.model_file, folder)  # noqa: E731
    run.training.finish(export, reason=reason, tokens=state.tokens_seen(run.cfg.ctx_len))
    run.log.info("outputs in %s: final_model/, metrics.jsonl, log_file.txt, loss_curve.png", run.cfg.output_dir)
    return run.training.layout.final_model


def train(cfg: TrainConfig, dist_ctx) -> Path | None:
    """The training run; returns the final_model/ folder (None when stopped by a signal: rerun to continue)."""
    log = get_logger("omnibiote", dist_ctx)
    plan, training = open_run(cfg)
    if training.report_finished():  # a finished run stays finished: one line (rank 0), exit 0
        return training.layout.final_model
    run, state = build_run(cfg, dist_ctx, plan, training, log)
    log.info("model %.2fM parameters; %d steps (ramp %d, warmup %d), %d mini-batches of %d per step over %d rank(s)",
             run.model.num_parameters() / 1e6, plan.total_steps, plan.ramp_steps, plan.warmup_steps,
             plan.full_accumulation, cfg.mini_batch_size, dist_ctx.world_size)  # fmt: skip
    with training:
        if training.stop_requested():  # signalled during imports or set-up: stop before writing anything
            log.info("stopped before the first step; rerun the same command to continue")
            return None
        open_metrics(run, state)
        try:
            while state.step < run.end:
                tokens_before = state.tokens_seen(cfg.ctx_len)
                loss, grad_norm = train_step(run, state, step_batches(run, state))
                log_step(run, state, loss, grad_norm)
                tokens = state.tokens_seen(cfg.ctx_len)
                if crossed(cfg.test_freq, tokens_before, tokens) or state.step == run.end:
                    validate(run, state)
                # should_save first, at every step: it is a collective (the last step, stop signals on any rank);
                # --save_freq counts tokens, a schedule of this recipe's own
                if training.should_save(state.step) or crossed(cfg.save_freq, tokens_before, tokens):
                    training.save(state.step)
                if training.stopped:
                    break
        finally:
            run.metrics.close()
    return finish(run, state)


def main(argv=None) -> None:
    cfg = parse_config(argv)  # every settings check, before anything is created
    dist_ctx = setup_distributed(seed=cfg.seed)
    try:
        train(cfg, dist_ctx)
    finally:
        teardown_distributed()


if __name__ == "__main__":
    # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
    sys.exit(run_cli(main, user_errors=(OmniBioteError,)))
