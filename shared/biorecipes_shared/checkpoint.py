"""Atomic, verifiable training checkpoints that resume the exact same trajectory.

A checkpoint is a directory `step_{N:08d}/`:
  model.safetensors   model weights (or `sharded/` written by torch.distributed.checkpoint for FSDP2)
  training_state.pt   optimizer, LR scheduler, grad scaler, step, caller's extra dict
  rank_{r}.pt         per-rank RNG states (python, numpy, torch, cuda), named torch.Generators, data-loader state
  manifest.json       step, time, world size, and every file with its size and sha256 — written last
Everything is written into `.tmp-step_{N:08d}/`, fsynced, and renamed, so a crash never leaves a directory that
looks complete. Everything is read back with safetensors or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .distributed import barrier
from .preemption import PreemptionHandler

__all__ = [
    "CheckpointError",
    "CheckpointState",
    "PreemptionHandler",
    "export_safetensors",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

MANIFEST = "manifest.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-step_"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be trusted or loaded."""


@dataclass
class CheckpointState:
    """What a loaded checkpoint hands back to the training loop."""

    step: int
    path: Path
    data_state: Any = None
    extra: dict = field(default_factory=dict)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensor_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies; tied tensors are cloned so safetensors stores each name (it refuses shared storage)."""
    tensors, seen = {}, set()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. Transformer Engine's `_extra_state` blobs, which hold no weights we need to resume
        value = value.detach().cpu().contiguous()
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        tensors[name] = value.clone() if key in seen else value
        seen.add(key)
    return tensors


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


def _write_manifest(tmp_dir: Path, step: int, world_size: int, sharded: bool) -> None:
    files = {}
    for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[str(path.relative_to(tmp_dir))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"step": step, "time": time.time(), "world_size": world_size, "sharded": sharded, "files": files}
    manifest_path = tmp_dir / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=1))
    _fsync_file(manifest_path)
    _fsync_dir(tmp_dir)


def _publish(tmp_dir: Path, final_dir: Path) -> None:
    """Rename the finished temp dir into place; a re-save of the same step replaces the old one only after."""
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)
    _fsync_dir(final_dir.parent)


def _step_dirs(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in Path(checkpoint_dir).glob(f"{STEP_PREFIX}*"):
        suffix = path.name[len(STEP_PREFIX) :]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def verify_checkpoint(path: str | Path, check_hashes: bool = True) -> dict[str, Any]:
    """Check the manifest against the files on disk; return the manifest or raise CheckpointError."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (an unfinished or foreign checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from err
    for name, info in files.items():
        file_path = path / name
        if not file_path.is_file():
            raise CheckpointError(f"{file_path}: listed in the manifest but missing")
        if file_path.stat().st_size != info["size"]:
            raise CheckpointError(f"{file_path}: size {file_path.stat().st_size} != {info['size']} in the manifest")
        if check_hashes and _sha256(file_path) != info["sha256"]:
            raise CheckpointError(f"{file_path}: sha256 does not match the manifest (corrupt file)")
    return manifest


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """Highest-step valid checkpoint under `checkpoint_dir`, skipping (with a warning) partial or corrupt ones."""
    for step, path in reversed(_step_dirs(Path(checkpoint_dir))):
        try:
            verify_checkpoint(path, check_hashes=False)
            return path
        except CheckpointError as err:
            warnings.warn(f"skipping checkpoint step {step}: {err}", stacklevel=2)
    return None


def _rotate(checkpoint_dir: Path, keep_last_k: int, current: Path) -> None:
    """Keep the newest `keep_last_k` valid checkpoints; drop leftovers of crashed saves."""
    for leftover in checkpoint_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last_k <= 0:
        return
    valid = [path for _, path in _step_dirs(checkpoint_dir) if (path / MANIFEST).is_file()]
    for path in valid[:-keep_last_k]:
        if path != current:
            shutil.rmtree(path, ignore_errors=True)


def _begin_save(checkpoint_dir: str | Path, step: int, rank: int) -> tuple[Path, Path]:
    checkpoint_dir = Path(checkpoint_dir)
    tmp_dir = checkpoint_dir / f"{TMP_PREFIX}{step:08d}"
    final_dir = checkpoint_dir / f"{STEP_PREFIX}{step:08d}"
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
    barrier()
    return tmp_dir, final_dir


def _training_state(optimizer, scheduler, scaler, step: int, extra: dict | None) -> dict[str, Any]:
    return {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "extra": extra or {},
    }


def _finish_save(
    tmp_dir: Path, final_dir: Path, step: int, world_size: int, rank: int, keep_last_k: int, sharded: bool
) -> Path:
    barrier()
    if rank == 0:
        _write_manifest(tmp_dir, step, world_size, sharded)
        _publish(tmp_dir, final_dir)
        _rotate(final_dir.parent, keep_last_k, final_dir)
    barrier()
    return final_dir


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
    keep_last_k: int = 2,
    dist_ctx=None,
) -> Path:
    """Save a complete, resumable checkpoint as `checkpoint_dir/step_{step:08d}`; every rank must call it (DDP)."""
    del dist_ctx  # the process group tells us the rank; kept in the signature for symmetry with load
    rank, world_size = _rank_and_world()
    tmp_dir, final_dir = _begin_save(checkpoint_dir, step, rank)
    torch.save(_python_state(generators, data_state), tmp_dir / f"rank_{rank}.pt")
    if rank == 0:
        save_file(
            _tensor_state_dict(unwrap_model(model).state_dict()),
            tmp_dir / "model.safetensors",
            metadata={"format": "pt"},
        )
        torch.save(_training_state(optimizer, scheduler, scaler, step, extra), tmp_dir / "training_state.pt")
    return _finish_save(tmp_dir, final_dir, step, world_size, rank, keep_last_k, sharded=False)


def _load_weights_only(path: Path, map_location) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip → RuntimeError, empty file → EOFError, foreign pickle → UnpicklingError
        raise CheckpointError(f"{path}: cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0]})") from err


def _load_common(path: Path, optimizer, scheduler, scaler, generators, restore_rng, map_location) -> CheckpointState:
    training_state = _load_weights_only(path / "training_state.pt", map_location)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is not None:
            if training_state.get(name) is None:
                raise CheckpointError(f"{path}: holds no {name} state but one was asked for")
            try:
                target.load_state_dict(training_state[name])
            except (ValueError, KeyError, RuntimeError) as err:  # e.g. another number of parameter groups
                raise CheckpointError(f"{path}: {name} state does not fit ({str(err).splitlines()[0]})") from err
    rank, world_size = _rank_and_world()
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        warnings.warn(f"{path}: no state for rank {rank} (saved with another world size); using rank 0's", stacklevel=3)
        rank_file = path / "rank_0.pt"
    rank_state = _load_weights_only(rank_file, "cpu")
    _restore_rank_state(rank_state, generators, restore_rng)
    return CheckpointState(
        step=int(training_state["step"]),
        path=path,
        data_state=rank_state["data_state"],
        extra=training_state.get("extra") or {},
    )


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    scaler=None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    dist_ctx=None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
    check_hashes: bool = True,
) -> CheckpointState:
    """Restore model, optimizer, scheduler, scaler, RNG and generators from a checkpoint dir; raise CheckpointError."""
    del dist_ctx
    path = Path(path)
    verify_checkpoint(path, check_hashes=check_hashes)
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
    return _load_common(path, optimizer, scheduler, scaler, generators, restore_rng, map_location)


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    raise TypeError(f"cannot turn a {type(config).__name__} into config.json (give a dict, dataclass or to_dict())")


def export_safetensors(
    model: torch.nn.Module | None, config: Any, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `model.safetensors` + `config.json` into `out_dir` (atomically, replacing an older export)."""
    out_dir = Path(out_dir)
    config_dict = _config_dict(config)
    if state_dict is None:
        state_dict = unwrap_model(model).state_dict()
    tmp_dir = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    save_file(_tensor_state_dict(state_dict), tmp_dir / "model.safetensors", metadata={"format": "pt"})
    (tmp_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str))
    for name in ("model.safetensors", "config.json"):
        _fsync_file(tmp_dir / name)
    _publish(tmp_dir, out_dir)
    return out_dir
