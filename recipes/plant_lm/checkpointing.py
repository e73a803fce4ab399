"""Checkpoints, a thin layer over `biorecipes_shared.checkpoint`, plus the seed's per-epoch model files.

Resume state lives in shared checkpoints `<output_dir>/checkpoints/step_{N:08d}/` (atomic, manifest-checked):
  model.safetensors    weights incl. the bucket memory (`memory.sums/counts/commits`) and the species embedding
  training_state.pt    optimizer, LR schedule, grad scaler, step, and `extra` = {epoch, step_in_epoch, species,
                       architecture}: what the loop needs to continue and what a resume must match
  rank_{r}.pt          RNG (dropout stream) and `data_state` = the job-wide data position
The data position is global: `positions[species]` counts windows consumed job-wide and the species draws of an
epoch are replayed from `step_in_epoch`, both the same on every rank, so another world size continues exactly
from it (the dropout stream then restarts from the seed, with a warning).

The seed's users read `<output_dir>/dna_model/model_epoch_N.pt` (a weights-only torch dict); it is still written
after every epoch, atomically, and is not used to resume.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from biorecipes_shared.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from biorecipes_shared.files import WriteError, atomic_write, describe_write_error

__all__ = [
    "ARCHITECTURE_FIELDS",
    "CheckpointError",
    "check_compatible",
    "load_training_state",
    "save_training_state",
    "write_epoch_file",
]

# Config fields that fix the shape of the model: a checkpoint only resumes when they match.
ARCHITECTURE_FIELDS = ("d_model", "n_heads", "n_layers", "local_attn_window", "context_size")


def architecture(cfg) -> dict:
    return {name: getattr(cfg, name) for name in ARCHITECTURE_FIELDS}


def save_training_state(run, cfg, checkpoint_dir: Path, positions: dict[str, int], epoch: int, step_in_epoch: int):
    """Every rank calls this; writes `checkpoint_dir/step_{run.step:08d}/`. Raises CheckpointWriteError (one line)."""
    return save_checkpoint(
        checkpoint_dir,
        run.step,
        run.model,
        run.optimizer,
        run.scheduler,
        run.scaler if run.scaler.is_enabled() else None,
        data_state={"positions": dict(positions), "epoch": epoch, "step_in_epoch": step_in_epoch},
        extra={"species": list(run.mixture.species), "architecture": architecture(cfg)},
        keep_last_k=cfg.keep_checkpoints,
    )


def check_compatible(path: Path, extra: dict, cfg, species: list[str]) -> None:
    """Refuse to resume a checkpoint whose architecture or species list differs from this run's (one line)."""
    saved = extra.get("architecture", {})
    diffs = [
        f"{k}={saved.get(k)} (now {getattr(cfg, k)})" for k in ARCHITECTURE_FIELDS if saved.get(k) != getattr(cfg, k)
    ]
    if extra.get("species") != species:
        diffs.append(f"species={extra.get('species')} (now {species})")
    if diffs:
        raise CheckpointError(f"{path}: checkpoint was trained with {', '.join(diffs)}; use a new output_dir")


def peek_training_state(path: Path) -> dict:
    """`extra` and `data_state` of a checkpoint without building a model (to build the data stream first)."""
    try:
        training = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
        rank0 = torch.load(path / "rank_0.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a file the manifest check passed but torch cannot read
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    return {"extra": training.get("extra") or {}, "data_state": rank0["data_state"], "step": int(training["step"])}


def load_training_state(run, path: Path) -> dict:
    """Restore model (incl. bucket memory), optimizer, schedule, scaler and this rank's RNG; returns data_state."""
    state = load_checkpoint(
        path,
        run.model,
        run.optimizer,
        run.scheduler,
        run.scaler if run.scaler.is_enabled() else None,
        data_position="global",
    )
    return {"step": state.step, "rng_restored": state.world_size == _world_size(), **state.data_state}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def write_epoch_file(run, cfg, path: Path, epochs_done: int, positions: dict[str, int]) -> None:
    """The seed's `dna_model/model_epoch_N.pt` (rank 0 only), written to a temporary name and renamed."""
    state = {
        "model_state_dict": run.model.state_dict(),  # includes the bucket memory (memory.sums/counts/commits)
        "optimizer_state_dict": run.optimizer.state_dict(),
        "scheduler_state_dict": run.scheduler.state_dict(),
        "epoch": epochs_done,
        "step": run.step,
        "config": dataclasses.asdict(cfg),
        "species": list(run.mixture.species),
        "data_positions": dict(positions),
    }
    try:
        with atomic_write(path, "wb") as handle:
            torch.save(state, handle)
    except RuntimeError as err:  # torch's writer reports a full disk as RuntimeError("... iostream error")
        if isinstance(err, WriteError):
            raise
        raise WriteError(describe_write_error(err, path)) from None
