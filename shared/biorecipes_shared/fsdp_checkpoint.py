"""FSDP2 checkpoints: the same `step_{N:08d}/` layout as checkpoint.py, with model and optimizer sharded.

Model and optimizer state go through torch.distributed.checkpoint (each rank writes its own shards); the
per-rank RNG/data state, training state and manifest are the ones save_checkpoint writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    CheckpointError,
    CheckpointState,
    _begin_save,
    _finish_save,
    _load_common,
    _python_state,
    _rank_and_world,
    _training_state,
    verify_checkpoint,
)

__all__ = ["gather_full_state_dict", "load_sharded_checkpoint", "save_sharded_checkpoint"]


def save_sharded_checkpoint(
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
    """FSDP2 variant of save_checkpoint: model and optimizer sharded through torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    del dist_ctx
    rank, world_size = _rank_and_world()
    tmp_dir, final_dir = _begin_save(checkpoint_dir, step, rank)
    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp_dir / "sharded"))
    torch.save(_python_state(generators, data_state), tmp_dir / f"rank_{rank}.pt")
    if rank == 0:
        torch.save(_training_state(None, scheduler, scaler, step, extra), tmp_dir / "training_state.pt")
    return _finish_save(tmp_dir, final_dir, step, world_size, rank, keep_last_k, sharded=True)


def load_sharded_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer=None,
    scheduler=None,
    scaler=None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    dist_ctx=None,
    check_hashes: bool = False,
) -> CheckpointState:
    """Restore an FSDP2 model/optimizer saved by save_sharded_checkpoint (all ranks call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    del dist_ctx
    path = Path(path)
    verify_checkpoint(path, check_hashes=check_hashes)
    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path / "sharded"))
    except BaseException as err:  # CheckpointException derives from BaseException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"{path / 'sharded'}: cannot be loaded ({str(err).splitlines()[0]})") from err
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return _load_common(path, None, scheduler, scaler, generators, restore_rng, "cpu")


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of an FSDP2 model, for export; every rank must call it, rank 0 gets it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
