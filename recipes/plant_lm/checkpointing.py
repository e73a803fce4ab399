"""Checkpoints: `dna_model/model_epoch_N.pt` after each epoch, `dna_model/model_step_S.pt` mid-epoch (on
preemption or every `save_every_steps`); atomic save, weights-only load, resume selection.

A checkpoint holds only tensors and plain values (loadable with `torch.load(..., weights_only=True)`):
model_state_dict (incl. the bucket memory `memory.sums/counts/commits`), optimizer_state_dict,
scheduler_state_dict, [scaler_state_dict], epoch (completed epochs), step, step_in_epoch, config (a dict),
species, data_positions, and mid-epoch also rng_states (one per rank).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from biorecipes_shared.distributed import barrier

EPOCH_FILE = re.compile(r"^model_epoch_(\d+)\.pt$")
STEP_FILE = re.compile(r"^model_step_(\d+)\.pt$")
# Config fields that fix the shape of the model: a checkpoint only resumes when they match.
ARCHITECTURE_FIELDS = ("d_model", "n_heads", "n_layers", "local_attn_window", "context_size")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run (message names the file or setting)."""


def save_checkpoint_atomic(state: dict, path: Path) -> None:
    """torch.save to a temporary name in the same folder, fsync, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def list_checkpoints(checkpoint_dir: Path, steps_per_epoch: int) -> list[tuple[int, Path]]:
    """(optimizer step, path) of every epoch and mid-epoch checkpoint in the folder, newest first."""
    found = []
    for path in checkpoint_dir.glob("model_*.pt"):
        if match := EPOCH_FILE.match(path.name):
            found.append((int(match.group(1)) * steps_per_epoch, path))
        elif match := STEP_FILE.match(path.name):
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def load_checkpoint_file(path: Path) -> dict:
    """Load a checkpoint with weights_only=True; CheckpointError naming the file when it is damaged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # truncated, empty or not a checkpoint
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    missing = {"model_state_dict", "optimizer_state_dict", "epoch", "config"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
    return state


def find_resume_checkpoint(cfg, checkpoint_dir: Path, log: logging.Logger) -> dict | None:
    """The checkpoint to resume from: explicit path (must load), newest loadable one (auto), or None."""
    if cfg.resume == "none":
        return None
    if cfg.resume != "auto":
        return load_checkpoint_file(Path(cfg.resume))
    for _, path in list_checkpoints(checkpoint_dir, cfg.steps_per_epoch):
        try:
            return load_checkpoint_file(path)
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s", err)
    return None


def check_compatible(saved: dict, cfg, species: list[str]) -> None:
    """Refuse to resume a checkpoint whose architecture or species list differs from this run's."""
    diffs = [
        f"{k}={saved['config'].get(k)} (now {getattr(cfg, k)})"
        for k in ARCHITECTURE_FIELDS
        if saved["config"].get(k) != getattr(cfg, k)
    ]
    if saved.get("species") != species:
        diffs.append(f"species={saved.get('species')} (now {species})")
    if diffs:
        raise CheckpointError(f"checkpoint was trained with {', '.join(diffs)}; use --resume none or a new output_dir")


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG state (CPU, and CUDA when present): the dropout stream."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(
    cfg,
    ctx,
    model,
    optimizer,
    scheduler,
    scaler,
    *,
    epoch,
    step,
    step_in_epoch,
    species,
    positions,
    checkpoint_dir: Path,
    log: logging.Logger,
) -> Path:
    """Every rank calls this. Rank 0 writes model_epoch_N.pt (step_in_epoch 0, N = epochs done) or, mid-epoch,
    model_step_S.pt with every rank's RNG state; then prunes superseded and surplus files."""
    rng_states = None
    if step_in_epoch:
        rng_states = [None] * ctx.world_size
        if ctx.is_distributed:
            dist.all_gather_object(rng_states, rng_state())
        else:
            rng_states[0] = rng_state()
    name = f"model_step_{step}.pt" if step_in_epoch else f"model_epoch_{epoch}.pt"
    path = checkpoint_dir / name
    if ctx.is_main:
        state = {
            "model_state_dict": model.state_dict(),  # includes the bucket memory (memory.sums/counts/commits)
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
            "step_in_epoch": step_in_epoch,
            "config": dataclasses.asdict(cfg),
            "species": species,
            "data_positions": dict(positions),  # windows consumed per species, job-wide
        }
        if rng_states is not None:
            state["rng_states"] = rng_states
        if scaler.is_enabled():
            state["scaler_state_dict"] = scaler.state_dict()
        save_checkpoint_atomic(state, path)
        log.info("saved %s", path)
        _prune(cfg, checkpoint_dir, keep=path)
    barrier()
    return path


def _prune(cfg, checkpoint_dir: Path, keep: Path) -> None:
    """Drop mid-epoch files older than the newest epoch file, then the oldest beyond `keep_checkpoints`."""
    found = list_checkpoints(checkpoint_dir, cfg.steps_per_epoch)
    newest_epoch_step = max((s for s, p in found if EPOCH_FILE.match(p.name)), default=-1)
    for step, path in found:
        if path != keep and STEP_FILE.match(path.name) and step <= newest_epoch_step:
            path.unlink()
    if cfg.keep_checkpoints > 0:
        for _, path in list_checkpoints(checkpoint_dir, cfg.steps_per_epoch)[cfg.keep_checkpoints :]:
            if path != keep:
                path.unlink()
