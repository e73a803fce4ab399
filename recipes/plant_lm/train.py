"""Train the plant DNA language model: `python train.py --data_dir data --batch_size 16` or under torchrun / srun.

Every field of `Config` is a command-line flag of the same name. The run follows the biorecipes run contract: the
same command starts, resumes (newest valid `<output_dir>/checkpoints/step_N/`) and, once finished, does nothing;
SIGTERM/SIGUSR1 save a checkpoint and exit 0. Outputs in `<output_dir>`: `checkpoints/`, `final_model/`,
`metrics.jsonl`, `loss_curve.png`, `run_finished.json`, and the seed's `dna_model/model_epoch_N.pt` (per epoch) and
`logs/training_*.log` (every step).
"""

from __future__ import annotations

# isort: off
import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)

# isort: on
import contextlib
import dataclasses
import logging
import logging.handlers
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from biorecipes_shared.distributed import all_reduce_mean, barrier, setup_distributed, teardown_distributed
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, peak_memory, plot_loss_curve
from biorecipes_shared.preemption import PreemptionHandler
from biorecipes_shared.run import (
    RunLayout,
    finished_message,
    finished_run,
    mark_finished,
    resolve_resume,
    run_cli,
)
from biorecipes_shared.run_lock import release_run_folders
from checkpointing import (
    check_compatible,
    load_training_state,
    peek_training_state,
    save_training_state,
    write_epoch_file,
)
from data import PlantDataError, SpeciesMixture, build_mixture, check_data_fingerprint, window_stride
from exports import check_fits, load_weights, read_export, write_export
from model import PlantLM
from settings import Config, amp_dtype, check_config, parse_config


def lr_lambda(cfg: Config, total_steps: int):
    """Linear warm-up over `warmup_steps`, then cosine decay to 10% of the peak at the last step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class RunLogFile(logging.FileHandler):
    """logs/training_*.log; a write failure (full disk) is reported once in one line, not as a traceback per record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            err = sys.exc_info()[1]
            print(f"warning: {self.baseFilename}: cannot write the run log ({err}); logging to the console only",
                  file=sys.stderr, flush=True)  # fmt: skip


def open_run_log(log: logging.Logger, log_dir: Path, is_main: bool) -> logging.Handler | None:
    """Attach logs/training_TIMESTAMP.log to the logger on rank 0 (append-only)."""
    if not is_main:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = RunLogFile(log_dir / f"training_{time.strftime('%Y%m%d_%H%M%S')}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def gpu_status(device: torch.device) -> dict[str, float]:
    """CUDA memory and, when NVML is available, utilisation; empty on CPU."""
    if device.type != "cuda":
        return {}
    status = {"cuda_alloc_gib": torch.cuda.memory_allocated(device) / 2**30}
    with contextlib.suppress(Exception):  # torch.cuda.utilization needs pynvml
        status["gpu_util_pct"] = float(torch.cuda.utilization(device))
    return status


@dataclass
class Run:
    """What set-up builds, and where the loop is (step, epoch, losses of this call)."""

    mixture: SpeciesMixture
    model: PlantLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    layout: RunLayout
    ddp: DistributedDataParallel | None = None
    step: int = 0
    start_epoch: int = 0
    skip_steps: int = 0  # optimizer steps of `start_epoch` done before a mid-epoch resume
    rng_restored: bool = False  # this rank's dropout stream came from the checkpoint
    resumed_from: Path | None = None
    losses: list[float] = field(default_factory=list)
    stopped: bool = False  # by a preemption signal


def train(cfg: Config) -> dict:
    """Run, resume or (when finished) skip training; returns the per-step losses of this call and the outputs."""
    check_config(cfg)
    layout = RunLayout(Path(cfg.output_dir))
    ctx = setup_distributed(cfg.seed)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    log = get_logger("plant_lm", ctx)
    # Startup lines wait in memory until every input has been checked, so a bad input leaves no log file
    # (nor output_dir) behind; once the run is set up they go to the top of the run log.
    startup_lines = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    log.addHandler(startup_lines)
    file_handler = None
    try:
        if done := finished_run(layout, target_step=cfg.n_epochs * cfg.steps_per_epoch):
            if ctx.is_main:
                print(finished_message(layout, done), flush=True)
            return {"losses": [], "finished": True, "checkpoint": None, "bad_files": {}, "species": []}
        try:
            run = set_up(cfg, ctx, log, layout, resolve_resume(cfg.resume, layout.checkpoints))
        except BaseException:
            release_run_folders()  # a refused start leaves nothing behind: the folders the run lock made go again
            raise
        file_handler = open_run_log(log, layout.output_dir / "logs", ctx.is_main)
        startup_lines.setTarget(file_handler)
        startup_lines.flush()
        log.removeHandler(startup_lines)
        wandb_args = {"project": cfg.wandb_project, "config": dataclasses.asdict(cfg)} if cfg.wandb else None
        with (
            MetricsWriter(layout.output_dir, ctx, wandb_init_args=wandb_args, resume_step=run.step) as metrics,
            PreemptionHandler() as preemption,
        ):
            train_epochs(cfg, ctx, log, run, metrics, preemption)
        return finish(cfg, ctx, log, run)
    finally:
        log.removeHandler(startup_lines)
        startup_lines.close()
        if file_handler is not None:
            log.removeHandler(file_handler)
            file_handler.close()
        teardown_distributed()


def set_up(cfg: Config, ctx, log: logging.Logger, layout: RunLayout, resume_from: Path | None) -> Run:
    """Check data and checkpoint, build model and optimizer, restore or initialise; reads files but creates none."""
    saved = peek_training_state(resume_from) if resume_from is not None else None
    mixture = build_mixture(
        cfg.data_dir,
        cfg.species_distribution,
        cfg.default_species_weight,
        cfg.context_size,
        cfg.overlap_ratio,
        cfg.chunk_size,
        cfg.seed,
        ctx.rank,
        ctx.world_size,
        positions=saved["data_state"]["positions"] if saved else None,
    )
    species = mixture.species
    log.info("species (sampling weight): %s", ", ".join(f"{s} ({p:.3f})" for s, p in zip(species, mixture.probs)))
    if saved:
        check_compatible(resume_from, saved["extra"], cfg, species)
    check_data_fingerprint(layout.output_dir, mixture, resuming=saved is not None)
    if not saved and cfg.init_from:
        check_fits(read_export(cfg.init_from), cfg, species, cfg.init_from)
    model = PlantLM(
        len(species),
        cfg.d_model,
        cfg.n_heads,
        cfg.n_layers,
        cfg.dropout,
        cfg.local_attn_window,
        max_positions=cfg.context_size,
    ).to(ctx.device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.n_epochs * cfg.steps_per_epoch))
    dtype = amp_dtype(cfg.amp, ctx.device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    run = Run(mixture, model, optimizer, scheduler, scaler, dtype, layout, resumed_from=resume_from)
    if resume_from is not None:
        data_state = load_training_state(run, resume_from)
        run.step, run.start_epoch, run.skip_steps = data_state["step"], data_state["epoch"], data_state["step_in_epoch"]
        run.rng_restored = data_state["rng_restored"]
        log.info("resumed from %s at step %d (epoch %d, step %d of it)", resume_from, run.step, run.start_epoch + 1,
                 run.skip_steps)  # fmt: skip
    elif cfg.init_from:
        load_weights(cfg.init_from, model)
        log.info("initialised from %s (weights and bucket memory)", cfg.init_from)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        model.compile_blocks()  # in place, before DDP wraps the model: state-dict keys unchanged
    # Buffers are not broadcast: every rank applies the same all-reduced bucket update itself.
    run.ddp = DistributedDataParallel(model, broadcast_buffers=False) if ctx.is_distributed else None
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %d ranks, device %s, amp %s, compile %s, activation checkpointing %s",
             n_params / 1e6, ctx.world_size, ctx.device, dtype, cfg.compile, cfg.activation_checkpointing)  # fmt: skip
    return run


def train_epochs(cfg: Config, ctx, log: logging.Logger, run: Run, metrics: MetricsWriter, preemption) -> None:
    """Epochs from where the run is until n_epochs, or until a preemption signal (then `run.stopped`)."""
    if preemption.should_stop():  # signalled during imports or set-up: the state is the one resumed from, no save
        run.stopped = True
        log.warning("stopped on a preemption signal before the first step (at step %d): nothing new to save; run "
                    "the same command again to continue", run.step)  # fmt: skip
        return
    for epoch in range(run.start_epoch, cfg.n_epochs):
        first_step = run.skip_steps if epoch == run.start_epoch else 0
        if not (first_step and run.rng_restored):  # mid-epoch with the saved stream: keep it
            torch.manual_seed(cfg.seed + ctx.rank + 1000 * epoch)  # dropout depends only on (seed, rank, epoch)
        run.model.train()
        micro_steps = cfg.steps_per_epoch * cfg.accumulation_steps
        batches = run.mixture.batches(cfg.batch_size, micro_steps, epoch, skip=first_step * cfg.accumulation_steps)
        run_epoch(cfg, ctx, log, run, metrics, preemption, epoch, first_step, batches)
        if run.stopped:
            log.warning("stopped on a preemption signal after step %d; run the same command again to resume", run.step)
            return


def run_epoch(cfg: Config, ctx, log, run: Run, metrics, preemption, epoch: int, first_step: int, batches) -> None:
    """Optimizer steps `first_step + 1 .. steps_per_epoch` of `epoch`: step, log, checkpoint."""
    meter = ThroughputMeter()
    for step_in_epoch in range(first_step + 1, cfg.steps_per_epoch + 1):
        loss, grad_norm, tokens = train_step(cfg, ctx, run.model, run.ddp, run.optimizer, run.scheduler, run.scaler,
                                             batches, run.dtype)  # fmt: skip
        run.step += 1
        # Every training window is whole (a run too short for one yields none), so there is no padding: the
        # positions computed on are all real tokens and useful_token_fraction is 1 by construction.
        meter.update(samples=cfg.batch_size * cfg.accumulation_steps, tokens=tokens, positions=tokens)
        run.losses.append(loss)
        log_step(log, metrics, ctx, epoch, run.step, loss, run.scheduler.get_last_lr()[0], grad_norm, meter)
        run.stopped = preemption.should_stop()
        epoch_done = step_in_epoch == cfg.steps_per_epoch
        if epoch_done:
            end_epoch(cfg, ctx, log, run, epoch, first_step)
        if epoch_done or run.stopped or (cfg.save_every_steps > 0 and run.step % cfg.save_every_steps == 0):
            path = save_training_state(run, cfg, run.layout.checkpoints, run.mixture.positions,
                                       epoch=epoch + epoch_done, step_in_epoch=0 if epoch_done else step_in_epoch)  # fmt: skip
            log.info("saved %s", path)
        if run.stopped:
            return


def end_epoch(cfg: Config, ctx, log: logging.Logger, run: Run, epoch: int, first_step: int) -> None:
    """Log the epoch's mean loss and write the seed's dna_model/model_epoch_N.pt (before the resume checkpoint, so
    a kill between the two retrains the epoch and rewrites the same file)."""
    epoch_losses = run.losses[-(cfg.steps_per_epoch - first_step) :]
    log.info("epoch %d mean loss %.4f (a uniform guess over 4096 6-mers scores %.4f)", epoch + 1,
             sum(epoch_losses) / len(epoch_losses), math.log(4096))  # fmt: skip
    if ctx.is_main:
        epoch_dir = run.layout.output_dir / "dna_model"
        write_epoch_file(run, cfg, epoch_dir / f"model_epoch_{epoch + 1}.pt", epoch + 1, run.mixture.positions)
        if cfg.keep_checkpoints > 0:
            files = sorted(epoch_dir.glob("model_epoch_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
            for old in files[: -cfg.keep_checkpoints]:
                old.unlink(missing_ok=True)
    barrier()


def finish(cfg: Config, ctx, log: logging.Logger, run: Run) -> dict:
    """At the last step: export final_model/, plot the loss curve, mark the run finished; say where outputs are."""
    layout = run.layout
    done = run.step >= cfg.n_epochs * cfg.steps_per_epoch and not run.stopped
    if done:
        if ctx.is_main:
            write_export(run.model, cfg, run.mixture.species, layout.final_model)
            plot_curve(layout)
        barrier()
        mark_finished(layout, run.step, "max steps reached")
        log.info(
            "finished at step %d; outputs in %s (final model: %s)", run.step, layout.output_dir, layout.final_model
        )
    else:
        log.info("stopped at step %d; checkpoints in %s (run the same command to continue)", run.step,
                 layout.checkpoints)  # fmt: skip
    bad_files = {path: why for stream in run.mixture.streams.values() for path, why in stream.bad_files.items()}
    if bad_files:
        log.warning("%d bad file(s) were skipped: %s", len(bad_files), "; ".join(bad_files.values()))
    return {"losses": run.losses, "checkpoint": layout.final_model if done else None, "bad_files": bad_files,
            "species": run.mixture.species, "finished": done, "step": run.step}  # fmt: skip


def plot_curve(layout: RunLayout) -> None:
    """loss_curve.png from metrics.jsonl (the shared plotter writes atomically: a failure is one WriteError line)."""
    with contextlib.suppress(ValueError):  # no numeric loss logged (nothing was left to train)
        plot_loss_curve(layout.metrics, layout.loss_curve)


def train_step(cfg, ctx, model, ddp, optimizer, scheduler, scaler, batches, dtype) -> tuple[float, float, int]:
    """One optimizer step over `accumulation_steps` micro-batches, then the bucket memory commit.

    Returns (loss averaged over ranks, grad norm, input tokens this process computed on)."""
    step_loss, tokens = 0.0, 0
    for micro in range(cfg.accumulation_steps):
        batch = next(batches)
        tokens += batch.input_ids.numel()
        sync_now = ddp is None or micro == cfg.accumulation_steps - 1
        with contextlib.nullcontext() if sync_now else ddp.no_sync():
            with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
                out = (ddp or model)(
                    batch.input_ids.to(ctx.device),
                    batch.species_ids.to(ctx.device),
                    batch.targets.to(ctx.device),
                    memory_write_len=window_stride(cfg.context_size, cfg.overlap_ratio),
                )
            scaler.scale(out["loss"] / cfg.accumulation_steps).backward()
        step_loss += out["loss"].item() / cfg.accumulation_steps
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    model.memory.commit(cfg.global_context, cfg.memory_normalize_every)  # after the step, outside autograd
    return all_reduce_mean(step_loss), float(grad_norm), tokens


def log_step(log, metrics, ctx, epoch, step, loss, lr, grad_norm, meter) -> None:
    """Per-step line in the run log and a metrics.jsonl record: loss, throughput, memory, GPU status."""
    record = {
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        **meter.rates(),
        **peak_memory(),
        **gpu_status(ctx.device),
    }
    metrics.log(step, epoch=epoch + 1, **record)
    log.info(
        "epoch %d step %d loss %.4f lr %.2e grad_norm %.3f %.1f samples/s %.0f tokens/s useful %.2f rss %.2f GiB%s",
        epoch + 1,
        step,
        loss,
        lr,
        grad_norm,
        record["samples_per_s"],
        record["tokens_per_s"],
        record["useful_token_fraction"],
        record["cpu_rss_gib"],
        "".join(f" {k} {v:.2f}" for k, v in record.items() if k.startswith(("cuda", "gpu"))),
    )


def report(result: dict) -> None:
    losses = result["losses"]
    if losses:
        n = min(10, len(losses))  # single steps are noisy: compare the means of the first and last n steps
        first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
        print(f"done: loss (mean of {n} steps) {first:.4f} -> {last:.4f}; step {result['step']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    return run_cli(lambda: report(train(cfg)), user_errors=(PlantDataError,))


if __name__ == "__main__":
    sys.exit(main())  # run_cli ignores stop signals from its return on: a late one cannot make the exit code -15
