"""Epoch checkpoints `dna_model/model_epoch_N.pt`: atomic save, weights-only load, resume selection.

A checkpoint holds only tensors and plain values (loadable with `torch.load(..., weights_only=True)`):
model_state_dict (incl. the bucket memory `memory.sums/counts/commits`), optimizer_state_dict,
scheduler_state_dict, [scaler_state_dict], epoch, step, config (a dict), species, data_positions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import torch

from biorecipes_shared.distributed import barrier

CHECKPOINT_NAME = re.compile(r"model_epoch_(\d+)\.pt$")
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


def epoch_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of every model_epoch_N.pt in the folder, newest first."""
    found = [
        (int(m.group(1)), p) for p in checkpoint_dir.glob("model_epoch_*.pt") if (m := CHECKPOINT_NAME.search(p.name))
    ]
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
    for _, path in epoch_checkpoints(checkpoint_dir):
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


def save_epoch(cfg, ctx, model, optimizer, scheduler, scaler, epoch, step, species, positions, checkpoint_dir, log):
    """Write dna_model/model_epoch_N.pt on rank 0 and drop the oldest beyond `keep_checkpoints`."""
    path = checkpoint_dir / f"model_epoch_{epoch}.pt"
    if ctx.is_main:
        state = {
            "model_state_dict": model.state_dict(),  # includes the bucket memory (memory.sums/counts/commits)
            "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(),
            "epoch": epoch,
            "step": step,
            "config": dataclasses.asdict(cfg),
            "species": species,
            "data_positions": dict(positions),  # windows consumed per species, job-wide
        }
        if scaler.is_enabled():
            state["scaler_state_dict"] = scaler.state_dict()
        save_checkpoint_atomic(state, path)
        log.info("saved %s", path)
        if cfg.keep_checkpoints > 0:
            for _, old in epoch_checkpoints(checkpoint_dir)[cfg.keep_checkpoints :]:
                old.unlink()
    barrier()
    return path
