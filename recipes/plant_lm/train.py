"""Train the plant DNA language model: `python train.py --data_dir data --batch_size 16` or under torchrun.

Every field of `Config` is a command-line flag of the same name. Per epoch the run writes
`<output_dir>/dna_model/model_epoch_N.pt` (atomically) and logs every step to `<output_dir>/logs/training_*.log`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import logging.handlers
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from biorecipes_shared.distributed import all_reduce_mean, setup_distributed, teardown_distributed
from biorecipes_shared.logging_utils import MetricsWriter, ThroughputMeter, get_logger, peak_memory, plot_loss_curve
from biorecipes_shared.preemption import PreemptionHandler
from checkpointing import (
    CheckpointError,
    check_compatible,
    find_resume_checkpoint,
    restore_rng_state,
    save_training_state,
)
from data import (
    PlantDataError,
    SpeciesMixture,
    build_mixture,
    check_data_fingerprint,
    parse_distribution,
    window_stride,
)
from model import PlantLM


class TrainingSetupError(RuntimeError):
    """A setting that cannot work on this machine (message names the flag)."""


@dataclass
class Config:
    # data
    data_dir: str = "data"
    species_distribution: dict[str, float] = field(
        default_factory=lambda: {
            "glycine_max": 1.0,
            "arabidopsis": 0.8,
            "oryza_sativa": 0.7,
            "zea_mays": 0.6,
            "vitis_vinifera": 0.5,
        }
    )
    default_species_weight: float = 0.5  # for species on disk that species_distribution does not name
    context_size: int = 64  # tokens (6-mers) per training window
    overlap_ratio: float = 0.5
    chunk_size: int = 1_200_000  # bp per streamed chunk of a chromosome
    # model
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    dropout: float = 0.1
    local_attn_window: int = 32
    global_context: int = 200_000  # forgetting horizon of the bucket memory, in written tokens
    memory_normalize_every: int = 1000  # optimizer steps
    # optimisation
    batch_size: int = 16  # per rank and micro-step
    accumulation_steps: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    n_epochs: int = 10
    steps_per_epoch: int = 1000  # optimizer steps; streams are endless, so an epoch is a fixed step count
    amp: str = "auto"  # auto (bf16 on a GPU that has it, else fp16; off on CPU) | bf16 | fp16 | off
    seed: int = 42
    # outputs
    output_dir: str = "."
    resume: str = "auto"  # auto (newest valid dna_model/model_epoch_N.pt) | none | a checkpoint path
    keep_checkpoints: int = 3  # newest N checkpoints kept; 0 keeps all
    save_every_steps: int = 0  # also save mid-epoch every N steps (0: at epoch ends and on SIGTERM/SIGUSR1 only)
    wandb: bool = False
    wandb_project: str = "plant_lm"
    num_threads: int = 0  # torch CPU threads; 0 = torch default


def parse_config(argv: list[str] | None = None) -> Config:
    """Build a Config from `--field value` flags (dict fields as name=weight,name=weight)."""
    parser = argparse.ArgumentParser(description=__doc__)
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            kind = lambda text: text.lower() in ("1", "true", "yes", "on")  # noqa: E731
        elif isinstance(default, dict):
            kind = parse_distribution
        else:
            kind = type(default)
        parser.add_argument(f"--{f.name}", type=kind, default=default, metavar=type(default).__name__.upper())
    return Config(**vars(parser.parse_args(argv)))


def lr_lambda(cfg: Config, total_steps: int):
    """Linear warm-up over `warmup_steps`, then cosine decay to 10% of the peak at the last step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `setting` on `device` (None: full fp32)."""
    if setting not in ("auto", "bf16", "fp16", "off"):
        raise TrainingSetupError(f"--amp must be auto, bf16, fp16 or off, not {setting!r}")
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


def open_run_log(log: logging.Logger, log_dir: Path, is_main: bool) -> logging.Handler | None:
    """Attach logs/training_TIMESTAMP.log to the logger on rank 0."""
    if not is_main:
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / f"training_{time.strftime('%Y%m%d_%H%M%S')}.log")
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


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns the per-step losses and the last checkpoint path."""
    ctx = setup_distributed(cfg.seed)
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.output_dir)
    checkpoint_dir = out_dir / "dna_model"
    log = get_logger("plant_lm", ctx)
    # Startup lines wait in memory until every input has been checked, so a bad input leaves no log file
    # (nor output_dir) behind; once the run is set up they go to the top of the run log.
    startup_lines = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    log.addHandler(startup_lines)
    file_handler = None
    try:
        run = _set_up(cfg, ctx, log, checkpoint_dir)
        file_handler = open_run_log(log, out_dir / "logs", ctx.is_main)
        startup_lines.setTarget(file_handler)
        startup_lines.flush()
        log.removeHandler(startup_lines)
        return _train(cfg, ctx, log, run, checkpoint_dir, out_dir)
    finally:
        log.removeHandler(startup_lines)
        startup_lines.close()
        if file_handler is not None:
            log.removeHandler(file_handler)
            file_handler.close()
        teardown_distributed()


@dataclass
class Run:
    """What startup builds and checks before the run writes its first file."""

    mixture: SpeciesMixture
    model: PlantLM
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    resumed: dict | None
    start_epoch: int = 0
    step: int = 0
    skip_steps: int = 0


# Counts that must be at least 1: 0 divides by zero or trains nothing.
POSITIVE_SETTINGS = (
    "d_model",
    "n_heads",
    "n_layers",
    "local_attn_window",
    "global_context",
    "memory_normalize_every",
    "batch_size",
    "accumulation_steps",
    "n_epochs",
    "steps_per_epoch",
)


def check_settings(cfg: Config) -> None:
    """Reject impossible model and optimisation settings before anything is read or built."""
    for name in POSITIVE_SETTINGS:
        if getattr(cfg, name) < 1:
            raise TrainingSetupError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_heads:
        raise TrainingSetupError(f"--d_model {cfg.d_model} must be divisible by --n_heads {cfg.n_heads}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise TrainingSetupError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not cfg.learning_rate > 0:
        raise TrainingSetupError(f"--learning_rate must be positive, got {cfg.learning_rate}")
    for name in ("warmup_steps", "grad_clip", "weight_decay", "keep_checkpoints", "save_every_steps"):
        if not getattr(cfg, name) >= 0:
            raise TrainingSetupError(f"--{name} must be 0 or more, got {getattr(cfg, name)}")


def _set_up(cfg: Config, ctx, log: logging.Logger, checkpoint_dir: Path) -> Run:
    """Check settings, data and checkpoint, build model and optimizer; reads files but creates none."""
    check_settings(cfg)
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise TrainingSetupError("--wandb true needs the wandb package: pip install wandb")
    dtype = amp_dtype(cfg.amp, ctx.device)
    resumed = find_resume_checkpoint(cfg, checkpoint_dir, log)
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
        positions=resumed["data_positions"] if resumed else None,
    )
    species = mixture.species
    log.info("species (sampling weight): %s", ", ".join(f"{s} ({p:.3f})" for s, p in zip(species, mixture.probs)))
    if resumed:
        check_compatible(resumed, cfg, species)
    check_data_fingerprint(checkpoint_dir.parent, mixture, resuming=resumed is not None)
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
    total_steps = cfg.n_epochs * cfg.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    run = Run(mixture, model, optimizer, scheduler, scaler, dtype, resumed)
    if resumed:
        model.load_state_dict(resumed["model_state_dict"])
        optimizer.load_state_dict(resumed["optimizer_state_dict"])
        scheduler.load_state_dict(resumed["scheduler_state_dict"])
        if "scaler_state_dict" in resumed:
            scaler.load_state_dict(resumed["scaler_state_dict"])
        run.start_epoch, run.step, run.skip_steps = resumed["epoch"], resumed["step"], resumed.get("step_in_epoch", 0)
        log.info("resumed at step %d (epoch %d, step %d of it)", run.step, run.start_epoch + 1, run.skip_steps)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %d ranks, device %s, amp %s", n_params / 1e6, ctx.world_size, ctx.device, dtype)
    return run


def _train(cfg: Config, ctx, log: logging.Logger, run: Run, checkpoint_dir: Path, out_dir: Path) -> dict:
    mixture, model, optimizer, scheduler, scaler = run.mixture, run.model, run.optimizer, run.scheduler, run.scaler
    resumed, step, species = run.resumed, run.step, run.mixture.species
    # Buffers are not broadcast: every rank applies the same all-reduced bucket update itself.
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if ctx.is_distributed else None
    wandb_args = {"project": cfg.wandb_project, "config": dataclasses.asdict(cfg)} if cfg.wandb else None
    metrics = MetricsWriter(out_dir / "logs", ctx, wandb_init_args=wandb_args)
    tokens_per_step = cfg.batch_size * cfg.accumulation_steps * cfg.context_size * ctx.world_size
    losses, last_checkpoint = [], None
    with PreemptionHandler() as preemption:
        for epoch in range(run.start_epoch, cfg.n_epochs):
            first_step = run.skip_steps if epoch == run.start_epoch else 0
            if first_step and len(resumed.get("rng_states") or []) == ctx.world_size:
                restore_rng_state(resumed["rng_states"][ctx.rank])  # continue the dropout stream mid-epoch
            else:
                torch.manual_seed(cfg.seed + ctx.rank + 1000 * epoch)  # dropout depends only on (seed, rank, epoch)
            model.train()
            micro_steps = cfg.steps_per_epoch * cfg.accumulation_steps
            batches = mixture.batches(cfg.batch_size, micro_steps, epoch, skip=first_step * cfg.accumulation_steps)
            meter = ThroughputMeter()
            stopped = False
            for step_in_epoch in range(first_step + 1, cfg.steps_per_epoch + 1):
                loss, grad_norm = train_step(cfg, ctx, model, ddp, optimizer, scheduler, scaler, batches, run.dtype)
                step += 1
                meter.update(samples=cfg.batch_size * cfg.accumulation_steps * ctx.world_size, tokens=tokens_per_step)
                losses.append(loss)
                log_step(log, metrics, ctx, epoch, step, loss, scheduler.get_last_lr()[0], grad_norm, meter)
                stopped = preemption.should_stop()
                epoch_done = step_in_epoch == cfg.steps_per_epoch
                if epoch_done:
                    epoch_losses = losses[-(cfg.steps_per_epoch - first_step) :]
                    log.info(
                        "epoch %d mean loss %.4f (a uniform guess over 4096 6-mers scores %.4f)",
                        epoch + 1,
                        sum(epoch_losses) / len(epoch_losses),
                        math.log(4096),
                    )
                if epoch_done or stopped or (cfg.save_every_steps > 0 and step % cfg.save_every_steps == 0):
                    last_checkpoint = save_training_state(
                        cfg, ctx, model, optimizer, scheduler, scaler, epoch=epoch + epoch_done, step=step,
                        step_in_epoch=0 if epoch_done else step_in_epoch, species=species,
                        positions=mixture.positions, checkpoint_dir=checkpoint_dir, log=log,
                    )  # fmt: skip
                if stopped:
                    break
            if stopped:
                log.warning("stopped on a preemption signal after step %d; run the same command again to resume", step)
                break
    metrics.close()
    if ctx.is_main and losses:
        with contextlib.suppress(ValueError):
            plot_loss_curve(out_dir / "logs" / "metrics.jsonl", out_dir / "logs" / "loss_curve.png")
    bad_files = {path: why for stream in mixture.streams.values() for path, why in stream.bad_files.items()}
    if bad_files:
        log.warning("%d bad file(s) were skipped: %s", len(bad_files), "; ".join(bad_files.values()))
    return {"losses": losses, "checkpoint": last_checkpoint, "bad_files": bad_files, "species": species}


def train_step(cfg, ctx, model, ddp, optimizer, scheduler, scaler, batches, dtype) -> tuple[float, float]:
    """One optimizer step over `accumulation_steps` micro-batches, then the bucket memory commit."""
    step_loss = 0.0
    for micro in range(cfg.accumulation_steps):
        batch = next(batches)
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
    return all_reduce_mean(step_loss), float(grad_norm)


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
        "epoch %d step %d loss %.4f lr %.2e grad_norm %.3f %.1f samples/s %.0f tokens/s rss %.2f GiB%s",
        epoch + 1,
        step,
        loss,
        lr,
        grad_norm,
        record["samples_per_s"],
        record["tokens_per_s"],
        record["cpu_rss_gib"],
        "".join(f" {k} {v:.2f}" for k, v in record.items() if k.startswith(("cuda", "gpu"))),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    try:
        result = train(cfg)
    except (PlantDataError, CheckpointError, TrainingSetupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    losses = result["losses"]
    if losses:
        n = min(10, len(losses))  # single steps are noisy: compare the means of the first and last n steps
        first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
        print(f"done: loss (mean of {n} steps) {first:.4f} -> {last:.4f}; checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
