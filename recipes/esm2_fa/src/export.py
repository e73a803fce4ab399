"""What a finished run publishes: `final_model/` in transformers' EsmForMaskedLM layout (model.safetensors,
config.json, tokenizer files), from the best checkpoint's weights when training.load_best_model_at_end asks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from biorecipes_shared import CheckpointError, WriteError, atomic_dir, verify_checkpoint
from model import REBUILT_BUFFERS, ModelConfigError, load_weights, save_tokenizer

log = logging.getLogger("esm2_fa")


def step_dir(checkpoints: Path, step: int) -> Path:
    """`checkpoints/step_{step:08d}` (the shared naming, so the shared resume code finds it)."""
    return Path(checkpoints) / f"step_{step:08d}"


def export_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to write (checkpoints, final_model): the module's own keys, without rebuilt buffers."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith(REBUILT_BUFFERS)}


def export_config(model: torch.nn.Module) -> dict:
    """config.json of an export: what transformers' EsmForMaskedLM reads (faesm's extras dropped)."""
    config = model.config.to_dict()
    config["architectures"] = ["EsmForMaskedLM"]
    for key in ("use_fa", "_name_or_path", "_attn_implementation_autoset"):
        config.pop(key, None)
    return config


def load_best_weights(model: torch.nn.Module, checkpoints: Path, best_step: int | None) -> None:
    """Put the best checkpoint's weights into `model` (load_best_model_at_end); a warning when it is gone."""
    path = step_dir(checkpoints, best_step) if best_step else None
    if path is None or not (path / "manifest.json").is_file():  # rotated away, or no evaluation yet
        log.warning("best checkpoint (step %s) is not on disk: keeping the last weights", best_step)
        return
    verify_checkpoint(path)  # its files as they were saved: a changed one is refused in one line
    try:
        load_weights(model, path / "model.safetensors")
    except ModelConfigError as err:
        raise CheckpointError(str(err)) from err
    log.info("loaded the best weights (step %d)", best_step)


def export_final_model(model: torch.nn.Module, out_dir: Path) -> None:
    """final_model/: model.safetensors + config.json (transformers' EsmForMaskedLM layout) + tokenizer files,
    written under a temp name and swapped in (rank 0 only).

    Raises WriteError (one line) when the disk is full or the folder unwritable; the temp dir is removed and an
    earlier export stays as it was.
    """
    try:
        with atomic_dir(out_dir, replace=True) as tmp:
            # Copies: safetensors refuses the tied decoder/embedding pair that shares one storage.
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in export_state_dict(model).items()}
            save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(export_config(model), indent=2, sort_keys=True) + "\n")
            save_tokenizer(tmp)
    except WriteError:
        raise
    except Exception as err:  # safetensors' own error on a full disk is no OSError
        raise WriteError(f"cannot write {out_dir}: {str(err).splitlines()[0]}") from err
