"""What a training run builds once (`Run`) and what its loop advances (`RunState`), and `build_run`, which sets both
up: data stream, model, optimizer, LR schedule, and the shared `TrainingRun` that saves and restores them.

A checkpoint (`<output_dir>/checkpoints/step_{N:08d}/`, the shared format) holds the model (weights incl. the
bucket memory `memory.sums/counts/commits` and the species embedding), optimizer, LR schedule, grad scaler, every
rank's RNG (the dropout stream), `extra` = {species, architecture} (what a resume must match) and the data position
`{positions, epoch, step_in_epoch}`. The data position is global: `positions[species]` counts windows consumed
job-wide and the species draws of an epoch are replayed from `step_in_epoch`, both the same on every rank, so
another world size continues exactly from it (the dropout stream then restarts from the seed, with a warning).
"""

from __future__ import annotations

import dataclasses
import logging
import logging.handlers
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from biorecipes_shared import (
    CheckpointError,
    CheckpointState,
    DistributedContext,
    MetricsWriter,
    ThroughputMeter,
    TrainingRun,
)
from config import Config, amp_dtype
from data import SpeciesMixture, build_mixture, check_data_fingerprint
from export import check_fits, load_weights, read_export
from model import PlantLM

# Config fields that fix the shape of the model: a checkpoint only resumes when they match.
ARCHITECTURE_FIELDS = ("d_model", "n_heads", "n_layers", "local_attn_window", "context_size")


@dataclass
class RunState:
    """Where the loop is: what a checkpoint's data position restores, and this call's per-step losses."""

    step: int = 0
    epoch: int = 0  # 0-based epoch the next step belongs to
    step_in_epoch: int = 0  # optimizer steps of `epoch` already done
    rng_restored: bool = False  # this rank's dropout stream came from the checkpoint (same world size)
    losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)  # of the current epoch, this call


@dataclass
class Run:
    """What set-up builds once and the loop only uses."""

    cfg: Config
    ctx: DistributedContext
    log: logging.Logger
    mixture: SpeciesMixture
    model: PlantLM
    ddp: DistributedDataParallel | None  # what the loop calls under torchrun (None: the bare model)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None  # autocast dtype (None: fp32)
    training: TrainingRun
    metrics: MetricsWriter | None = None  # opened by `open_metrics` once set-up has passed every check
    meter: ThroughputMeter = field(default_factory=ThroughputMeter)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up over `warmup_steps` ((step + 1) / warmup_steps of the peak), then cosine decay to 10% of the
    peak at `total_steps`: the seed's schedule, from torch's schedulers (tests/test_train.py checks the values)."""
    lr = optimizer.param_groups[0]["lr"]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=0.1 * lr
    )
    if warmup_steps == 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1)
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def check_compatible(saved: CheckpointState, cfg: Config, species: list[str]) -> None:
    """Refuse to resume a checkpoint whose architecture or species list differs from this run's (one line)."""
    before = saved.extra.get("architecture", {})
    diffs = [
        f"{k}={before.get(k)} (now {getattr(cfg, k)})" for k in ARCHITECTURE_FIELDS if before.get(k) != getattr(cfg, k)
    ]
    if saved.extra.get("species") != species:
        diffs.append(f"species={saved.extra.get('species')} (now {species})")
    if diffs:
        raise CheckpointError(f"{saved.path}: checkpoint was trained with {', '.join(diffs)}; use a new output_dir")


def build_model(cfg: Config, n_species: int, device: torch.device):
    """Model, AdamW (β 0.9, 0.95) and the warm-up + cosine schedule over the whole run."""
    model = PlantLM(
        n_species, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.dropout, cfg.local_attn_window,
        max_positions=cfg.context_size,
    ).to(device)  # fmt: skip
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    return model, optimizer, warmup_cosine(optimizer, cfg.warmup_steps, cfg.max_steps)


def build_run(cfg: Config, training: TrainingRun, ctx: DistributedContext, log: logging.Logger):
    """Check data and checkpoint, build model and optimizer, restore or initialise; returns (Run, RunState).
    Reads files but creates none (the run-folder lock aside): every refusal comes before any output."""
    output_dir = training.layout.output_dir
    # The checkpoint resume() will load, read first: the data stream starts from its position, and another
    # architecture or species list is refused by name, not by tensor shapes.
    saved = training.peek()
    mixture = build_mixture(
        cfg.data_dir, cfg.species_distribution, cfg.default_species_weight, cfg.context_size, cfg.overlap_ratio,
        cfg.chunk_size, cfg.seed, ctx.rank, ctx.world_size,
        positions=saved.data_state["positions"] if saved else None,
    )  # fmt: skip
    species = mixture.species
    log.info("species (sampling weight): %s", ", ".join(f"{s} ({p:.3f})" for s, p in zip(species, mixture.probs)))
    if saved:
        check_compatible(saved, cfg, species)
    check_data_fingerprint(output_dir, mixture, resuming=saved is not None)
    if not saved and cfg.init_from:
        check_fits(read_export(cfg.init_from), cfg, species, cfg.init_from)
    model, optimizer, scheduler = build_model(cfg, len(species), ctx.device)
    dtype = amp_dtype(cfg.amp, ctx.device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    state = RunState()
    training.register(
        model, optimizer, scheduler, scaler if scaler.is_enabled() else None,
        data_state=lambda: {"positions": dict(mixture.positions), "epoch": state.epoch,
                            "step_in_epoch": state.step_in_epoch},
        extra=lambda: {"species": list(species), "architecture": {k: getattr(cfg, k) for k in ARCHITECTURE_FIELDS}},
    )  # fmt: skip
    run = Run(cfg, ctx, log, mixture, model, None, optimizer, scheduler, scaler, dtype, training)
    restore(run, state)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        model.compile_blocks()  # in place, before DDP wraps the model: state-dict keys unchanged
    # Buffers are not broadcast: every rank applies the same all-reduced bucket update itself.
    run.ddp = DistributedDataParallel(model, broadcast_buffers=False) if ctx.is_distributed else None
    log.info("model: %.2fM parameters, %d ranks, device %s, amp %s, compile %s, activation checkpointing %s",
             sum(p.numel() for p in model.parameters()) / 1e6, ctx.world_size, ctx.device, dtype, cfg.compile,
             cfg.activation_checkpointing)  # fmt: skip
    return run, state


def restore(run: Run, state: RunState) -> None:
    """Resume through the shared TrainingRun (model incl. bucket memory, optimizer, schedule, scaler, this rank's
    RNG), or load the `--init_from` export, or keep the fresh initialisation."""
    resumed = run.training.resume()
    if resumed is not None:
        position = resumed.data_state
        state.step, state.epoch, state.step_in_epoch = resumed.step, position["epoch"], position["step_in_epoch"]
        state.rng_restored = resumed.world_size == run.ctx.world_size
        run.log.info("resumed from %s at step %d (epoch %d, step %d of it)", resumed.path, state.step,
                     state.epoch + 1, state.step_in_epoch)  # fmt: skip
    elif run.cfg.init_from:
        load_weights(run.cfg.init_from, run.model)
        run.log.info("initialised from %s (weights and bucket memory)", run.cfg.init_from)


def open_metrics(run: Run, state: RunState) -> MetricsWriter:
    """metrics.jsonl (lines a killed run logged after its checkpoint are dropped) and, when asked, wandb; the
    throughput meter starts here."""
    cfg = run.cfg
    wandb_args = {"project": cfg.wandb_project, "config": dataclasses.asdict(cfg)} if cfg.wandb else None
    run.metrics = MetricsWriter(run.training.layout.output_dir, run.ctx, wandb_init_args=wandb_args,
                                resume_step=state.step)  # fmt: skip
    run.meter = ThroughputMeter()  # rates from here on, not from the start of set-up
    return run.metrics


class RunLogFile(logging.FileHandler):
    """logs/training_*.log; a write failure (full disk) is reported once in one line, not as a traceback per record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            err = sys.exc_info()[1]
            print(f"warning: {self.baseFilename}: cannot write the run log ({err}); logging to the console only",
                  file=sys.stderr, flush=True)  # fmt: skip


class RunLog:
    """The seed's run log, `<output_dir>/logs/training_<time>.log` on rank 0 (append-only, every step).

    Start-up lines wait in memory until every input has been checked, so a bad input leaves no log file (nor
    output_dir) behind; `start()` writes them at the top of the log once the run is set up."""

    def __init__(self, log: logging.Logger, log_dir: Path, is_main: bool) -> None:
        self.log, self.log_dir, self.is_main = log, log_dir, is_main
        self.held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
        self.file: logging.Handler | None = None
        log.addHandler(self.held)

    def start(self) -> None:
        if self.is_main:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.file = RunLogFile(self.log_dir / f"training_{time.strftime('%Y%m%d_%H%M%S')}.log")
            self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(self.file)
        self.held.setTarget(self.file)
        self.held.flush()
        self.log.removeHandler(self.held)

    def close(self) -> None:
        for handler in (self.held, self.file):
            if handler is not None:
                self.log.removeHandler(handler)
                handler.close()
