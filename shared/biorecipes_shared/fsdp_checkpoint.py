"""FSDP2 parts of a checkpoint: model and optimizer sharded through torch.distributed.checkpoint.

Used by `checkpoint.save_checkpoint(..., sharded=True)` and by `load_checkpoint` when the manifest says
`sharded`; the per-rank RNG/data state, training state and manifest are the ones every checkpoint has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint_files import CheckpointError, training_state

__all__ = ["gather_full_state_dict", "read_sharded_parts", "write_sharded_parts"]


def write_sharded_parts(tmp_dir: Path, rank: int, model, optimizer, scheduler, scaler, step: int, extra) -> None:
    """Every rank writes its model/optimizer shards into `tmp_dir/sharded`; rank 0 the scheduler/scaler state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizers = [optimizer] if optimizer is not None else []
    model_state, optim_state = get_state_dict(model, optimizers)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp_dir / "sharded"))
    if rank == 0:
        torch.save(training_state(None, scheduler, scaler, step, extra), tmp_dir / "training_state.pt")


def read_sharded_parts(path: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Restore an FSDP2 model (and optimizer) from `path/sharded`; every rank calls it. Raises CheckpointError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict of an FSDP2 model, for export; every rank must call it, rank 0 gets it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
