"""The files of a checkpoint directory: its manifest, its check, finding the newest valid one, and clean-up.

A checkpoint is `step_{N:08d}/` holding its files and `manifest.json` (step, time, world size, sharded, every file
with size and sha256), written last: its presence marks a finished save. Saves go through `.tmp-step_N/` and old
checkpoints through `.trash-step_N/`, so a kill never leaves a half-written or half-deleted `step_N/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .files import fsync_dir, swap_into_place

MANIFEST = "manifest.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-step_"
TRASH_PREFIX = ".trash-step_"


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be trusted or loaded."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_manifest(tmp_dir: Path, step: int, world_size: int, sharded: bool) -> None:
    files = {}
    for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
        _fsync_file(path)
        files[str(path.relative_to(tmp_dir))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"step": step, "time": time.time(), "world_size": world_size, "sharded": sharded, "files": files}
    manifest_path = tmp_dir / MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=1))
    _fsync_file(manifest_path)
    fsync_dir(tmp_dir)


def write_manifest(directory: str | Path, step: int, world_size: int = 1, sharded: bool = False) -> Path:
    """Fsync every file under `directory` and write `manifest.json` (sizes + sha256) last; returns its path.

    For checkpoints written by another library (e.g. HF Trainer) into a temporary directory: after this and
    `publish`, `verify_checkpoint` / `latest_checkpoint` / `resolve_resume` treat them like `save_checkpoint`'s.
    """
    directory = Path(directory)
    _write_manifest(directory, step, world_size, sharded)
    return directory / MANIFEST


def publish(tmp_dir: str | Path, final_dir: str | Path) -> Path:
    """Rename a complete temporary checkpoint dir (manifest written) to its final name, atomically."""
    swap_into_place(Path(tmp_dir), Path(final_dir))  # a re-save of the same step replaces the old one only after
    return Path(final_dir)


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


def clean_incomplete(checkpoint_dir: str | Path) -> list[Path]:
    """Remove leftovers of killed saves and rotations: `.tmp-step_*`, `.trash-step_*`, `step_*` without a manifest.

    A `step_*` directory whose manifest exists is never removed here, even if its files fail the check: that is
    corruption, not an interrupted save, and the user should see it. Returns what was removed. Call on one rank.
    """
    checkpoint_dir = Path(checkpoint_dir)
    removed = [p for pattern in (f"{TMP_PREFIX}*", f"{TRASH_PREFIX}*") for p in checkpoint_dir.glob(pattern)]
    removed += [path for _, path in _step_dirs(checkpoint_dir) if not (path / MANIFEST).is_file()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def rotate_checkpoints(checkpoint_dir: Path, keep_last: int, current: Path, keep_steps: Iterable[int] = ()) -> None:
    """Keep the newest `keep_last` valid checkpoints, plus those of `keep_steps` (e.g. the best one so far), which
    neither count nor go; rename first, so a kill never half-deletes a `step_*`."""
    if keep_last > 0:
        kept = set(keep_steps)
        valid = [path for step, path in _step_dirs(checkpoint_dir) if (path / MANIFEST).is_file() and step not in kept]
        for path in valid[:-keep_last]:
            if path != current:
                trash = checkpoint_dir / (TRASH_PREFIX + path.name[len(STEP_PREFIX) :])
                path.rename(trash)
    fsync_dir(checkpoint_dir)
    clean_incomplete(checkpoint_dir)


def training_state(optimizer, scheduler, scaler, step: int, extra: dict | None) -> dict[str, Any]:
    """The non-weight part of a checkpoint (`training_state.pt`), for the dense and the sharded writer alike."""
    return {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "extra": extra or {},
    }
