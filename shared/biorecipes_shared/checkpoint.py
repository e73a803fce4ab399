"""Atomic, verifiable training checkpoints that resume the exact same trajectory.

A checkpoint is a directory `step_{N:08d}/`:
  model.safetensors   model weights (or `sharded/` written by torch.distributed.checkpoint for FSDP2)
  training_state.pt   optimizer, LR scheduler, grad scaler, step, caller's extra dict
  rank_{r}.pt         per-rank RNG states (python, numpy, torch, cuda), named torch.Generators, data-loader state
  manifest.json       step, time, world size, and every file with its size and sha256 — written last
Everything is written into `.tmp-step_{N:08d}/`, fsynced, and renamed, so a crash never leaves a directory that
looks complete; a failed write (full disk, no permission) removes the temporary directory and raises one
`CheckpointWriteError` line. Old checkpoints are removed by renaming them to `.trash-…` first, so a kill during
rotation never leaves a half-deleted `step_…`; `clean_incomplete` removes every such leftover. Everything is read
back with safetensors or `torch.load(weights_only=True)`.

One save/load pair serves DDP and FSDP2: `save_checkpoint(..., sharded=True)` writes model and optimizer through
torch.distributed.checkpoint, and `load_checkpoint` reads the manifest to know which kind it holds.
"""

from __future__ import annotations

import random
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .checkpoint_files import (  # noqa: F401  (re-exported: the public API is biorecipes_shared.checkpoint)
    MANIFEST,
    STEP_PREFIX,
    TMP_PREFIX,
    TRASH_PREFIX,
    CheckpointError,
    clean_incomplete,
    latest_checkpoint,
    publish,
    rotate_checkpoints,
    training_state,
    verify_checkpoint,
    write_manifest,
)
from .distributed import all_reduce_max, barrier
from .export import export_safetensors, tensor_state_dict, unwrap_model
from .files import WriteError, write_failure_reason
from .preemption import PreemptionHandler

__all__ = [
    "CheckpointError",
    "CheckpointState",
    "CheckpointWriteError",
    "clean_incomplete",
    "PreemptionHandler",
    "export_safetensors",
    "latest_checkpoint",
    "load_checkpoint",
    "peek_checkpoint",
    "publish",
    "save_checkpoint",
    "write_manifest",
]


class CheckpointWriteError(CheckpointError, WriteError):
    """A checkpoint could not be written (e.g. the disk is full); the temporary directory was removed."""


@dataclass
class CheckpointState:
    """What a loaded checkpoint hands back to the training loop."""

    step: int
    path: Path
    data_state: Any = None
    extra: dict = field(default_factory=dict)
    world_size: int = 1  # of the run that saved it


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _python_state(generators: dict[str, torch.Generator] | None, data_state: Any) -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        # numpy arrays are not weights-only loadable: store the key array as a tensor.
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
        "data_state": data_state,
    }


def _restore_rank_state(
    state: dict[str, Any], generators: dict[str, torch.Generator] | None, restore_rng: bool
) -> None:
    if restore_rng:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        npy = state["numpy"]
        np.random.set_state(
            (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
        )
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and state["cuda"]:
            torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for generator {name!r}")
        gen.set_state(state["generators"][name])


def _begin_save(checkpoint_dir: str | Path, step: int, rank: int) -> tuple[Path, Path]:
    checkpoint_dir = Path(checkpoint_dir)
    tmp_dir = checkpoint_dir / f"{TMP_PREFIX}{step:08d}"
    final_dir = checkpoint_dir / f"{STEP_PREFIX}{step:08d}"
    error = None
    if rank == 0:
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir()
        except OSError as err:
            error = err
    _raise_if_any_rank_failed(error, tmp_dir, rank)
    return tmp_dir, final_dir


def _raise_if_any_rank_failed(error: BaseException | None, tmp_dir: Path, rank: int) -> None:
    """All ranks learn whether any rank failed to write; the temp dir goes, and every rank raises one line."""
    if all_reduce_max(1.0 if error is not None else 0.0) == 0:
        return
    if rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    where = tmp_dir.parent / tmp_dir.name.replace(TMP_PREFIX, STEP_PREFIX)
    if error is None:
        raise CheckpointWriteError(f"cannot write checkpoint {where}: another process failed to write its part")
    raise CheckpointWriteError(f"cannot write {where}: {write_failure_reason(error, tmp_dir)}") from error


def _finish_save(
    tmp_dir: Path,
    final_dir: Path,
    step: int,
    world_size: int,
    rank: int,
    keep: tuple[int, Iterable[int]],
    sharded: bool,
) -> Path:
    barrier()
    error = None
    if rank == 0:
        try:
            write_manifest(tmp_dir, step, world_size, sharded)
            publish(tmp_dir, final_dir)
        except Exception as err:  # every rank must learn of it, or the others wait in the next collective
            error = err
    _raise_if_any_rank_failed(error, tmp_dir, rank)
    if rank == 0:
        rotate_checkpoints(final_dir.parent, keep[0], final_dir, keep[1])
    barrier()
    return final_dir


def _write_dense_parts(tmp_dir: Path, rank: int, model, optimizer, scheduler, scaler, step, extra) -> None:
    if rank == 0:
        save_file(
            tensor_state_dict(unwrap_model(model).state_dict()),
            tmp_dir / "model.safetensors",
            metadata={"format": "pt"},
        )
        torch.save(training_state(optimizer, scheduler, scaler, step, extra), tmp_dir / "training_state.pt")


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    scaler=None,
    data_state: Any = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict | None = None,
    keep_last: int = 2,
    sharded: bool = False,
    keep_steps: Iterable[int] = (),
) -> Path:
    """Save a complete, resumable checkpoint as `checkpoint_dir/step_{step:08d}`; every rank must call it.

    Rotation keeps the newest `keep_last` (0: all) and, outside that count, the checkpoints of `keep_steps`.
    sharded=True (FSDP2): model and optimizer through torch.distributed.checkpoint, each rank its shards.
    Raises CheckpointWriteError (one line: path and cause, e.g. a full disk) after removing the temp dir; earlier
    checkpoints are untouched.
    """
    rank, world_size = _rank_and_world()
    tmp_dir, final_dir = _begin_save(checkpoint_dir, step, rank)
    error = None
    try:
        torch.save(_python_state(generators, data_state), tmp_dir / f"rank_{rank}.pt")
        if sharded:
            from .fsdp_checkpoint import write_sharded_parts  # FSDP2 imports stay out of the DDP path

            write_sharded_parts(tmp_dir, rank, model, optimizer, scheduler, scaler, step, extra)
        else:
            _write_dense_parts(tmp_dir, rank, model, optimizer, scheduler, scaler, step, extra)
    except Exception as err:  # full disk: OSError, torch's RuntimeError, safetensors' own SafetensorError
        error = err
    _raise_if_any_rank_failed(error, tmp_dir, rank)
    return _finish_save(tmp_dir, final_dir, step, world_size, rank, (keep_last, keep_steps), sharded=sharded)


def _load_weights_only(path: Path, map_location) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip → RuntimeError, empty file → EOFError, foreign pickle → UnpicklingError
        raise CheckpointError(f"{path}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]})") from err


def _check_world_size(path: Path, saved_world_size: int, data_position: str, warn: bool) -> None:
    world_size = _rank_and_world()[1]
    if saved_world_size == world_size:
        return
    if data_position != "global":
        raise CheckpointError(
            f"{path} was saved by {saved_world_size} process(es) and this run has {world_size}: "
            f"relaunch with {saved_world_size} process(es) (each process's data position is saved separately), "
            "or start a new output directory"
        )
    if warn and _rank_and_world()[0] == 0:
        warnings.warn(
            f"{path}: saved by {saved_world_size} process(es), resumed by {world_size}: continuing from the "
            "global data position (not bitwise equal to an uninterrupted run)",
            stacklevel=4,
        )


def _rank_file(path: Path, saved_world_size: int) -> tuple[Path, bool]:
    """This rank's state file, and whether it is really this rank's (False: a stand-in under another world size)."""
    rank, world_size = _rank_and_world()
    own = path / f"rank_{rank}.pt"
    if own.is_file() and saved_world_size == world_size:
        return own, True
    return path / "rank_0.pt", False


def _load_common(
    path: Path, manifest: dict, optimizer, scheduler, scaler, generators, restore_rng, map_location, data_position
) -> CheckpointState:
    training_state = _load_weights_only(path / "training_state.pt", map_location)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is not None:
            if training_state.get(name) is None:
                raise CheckpointError(f"{path}: holds no {name} state but one was asked for")
            try:
                target.load_state_dict(training_state[name])
            except (ValueError, KeyError, RuntimeError) as err:  # e.g. another number of parameter groups
                raise CheckpointError(f"{path}: {name} state does not fit ({str(err).splitlines()[0]})") from err
    saved_world_size = int(manifest.get("world_size", 1))
    _check_world_size(path, saved_world_size, data_position, warn=True)
    rank_file, own = _rank_file(path, saved_world_size)
    rank_state = _load_weights_only(rank_file, "cpu")
    if own:  # another rank's RNG streams would duplicate that rank's dropout and masking: keep this rank's seeds
        _restore_rank_state(rank_state, generators, restore_rng)
    return _state_of(path, training_state, rank_state, saved_world_size)


def _state_of(path: Path, training_state: dict, rank_state: dict, saved_world_size: int) -> CheckpointState:
    return CheckpointState(
        step=int(training_state["step"]),
        path=path,
        data_state=rank_state["data_state"],
        extra=training_state.get("extra") or {},
        world_size=saved_world_size,
    )


def peek_checkpoint(path: str | Path) -> CheckpointState:
    """What `load_checkpoint` would hand back (step, this rank's data state, extra, world size), restoring nothing:
    for checks against the current settings before a model is built. Raises CheckpointError (one line)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    training_state = _load_weights_only(path / "training_state.pt", "cpu")
    saved_world_size = int(manifest.get("world_size", 1))
    rank_state = _load_weights_only(_rank_file(path, saved_world_size)[0], "cpu")
    return _state_of(path, training_state, rank_state, saved_world_size)


def _load_dense_weights(path: Path, model: torch.nn.Module, strict: bool) -> None:
    try:
        weights = load_file(path / "model.safetensors", device="cpu")
    except Exception as err:
        raise CheckpointError(f"{path / 'model.safetensors'}: cannot be read ({err})") from err
    target = unwrap_model(model)
    # load_state_dict raises a multi-line RuntimeError on shape mismatches even with strict=False: name them here.
    expected_shapes = {name: tuple(t.shape) for name, t in target.state_dict().items()}
    wrong = [
        f"{name} {tuple(t.shape)} vs model {expected_shapes[name]}"
        for name, t in weights.items()
        if name in expected_shapes and tuple(t.shape) != expected_shapes[name]
    ]
    if wrong:
        raise CheckpointError(f"{path}: weights do not fit the model ({len(wrong)} shape mismatches: {wrong[:3]})")
    missing, unexpected = target.load_state_dict(weights, strict=False)
    missing = [key for key in missing if not key.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    scaler=None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    check_hashes: bool = True,
    data_position: str = "per_rank",
) -> CheckpointState:
    """Restore model, optimizer, scheduler, scaler, RNG and generators from a checkpoint dir (every rank calls it).

    Dense or FSDP2-sharded is read from the manifest. data_position says what `data_state` holds:
    "per_rank" (each rank's own position: another world size is refused with one CheckpointError line) or
    "global" (the same global position on every rank: another world size continues from it, with a warning).
    Raises CheckpointError (one line) for anything missing, corrupt or not fitting the model.
    """
    if data_position not in ("per_rank", "global"):
        raise ValueError(f"data_position={data_position!r}: use 'per_rank' or 'global'")
    path = Path(path)
    manifest = verify_checkpoint(path, check_hashes=check_hashes)
    _check_world_size(path, int(manifest.get("world_size", 1)), data_position, warn=False)  # before the model
    if manifest.get("sharded"):
        from .fsdp_checkpoint import read_sharded_parts

        read_sharded_parts(path, model, optimizer)
        optimizer = None  # restored with the shards
    else:
        _load_dense_weights(path, model, strict)
    return _load_common(
        path, manifest, optimizer, scheduler, scaler, generators, restore_rng, map_location, data_position
    )
