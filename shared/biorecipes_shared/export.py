"""Export trained weights for inference or further training: `model.safetensors` + `config.json`, atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .files import WriteError, describe_write_error, swap_into_place


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def tensor_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
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
    try:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
        save_file(tensor_state_dict(state_dict), tmp_dir / "model.safetensors", metadata={"format": "pt"})
        (tmp_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=str))
        for name in ("model.safetensors", "config.json"):
            with open(tmp_dir / name, "rb") as handle:
                os.fsync(handle.fileno())
        swap_into_place(tmp_dir, out_dir)
    except Exception as err:  # safetensors raises its own SafetensorError on a full disk, not an OSError
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise WriteError(describe_write_error(err, out_dir)) from err
    return out_dir
