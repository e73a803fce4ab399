"""What a run writes for use outside training: the exported model (`<output_dir>/final_model/`: what it records,
reading it back, `--init_from`) and the seed's per-epoch files (`<output_dir>/dna_model/model_epoch_N.pt`).

`config.json` records what the weights depend on: the recipe, the k-mer size (6-mers: the vocabulary and the
bucket memory), the species list (rows of the species embedding, in order) and the model config. `--init_from` and
`embed.py` refuse an export whose record does not fit, in one line.

The seed's users read `dna_model/model_epoch_N.pt` (a weights-only torch dict); it is written after every epoch,
atomically, and is not used to resume (the shared checkpoints are).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from biorecipes_shared import RunError, WriteError, atomic_write, describe_write_error, export_safetensors
from data import KMER
from model import PlantLM

RECIPE = "plant_lm"
MODEL_FIELDS = ("d_model", "n_heads", "n_layers", "dropout", "local_attn_window")


class ExportError(RunError):
    """An export that is missing, damaged or made for another model or species list (one line naming the folder)."""


def export_record(cfg, species: list[str]) -> dict:
    """`config.json` of an export: recipe, kmer, species, context_size, overlap_ratio, model fields."""
    return {
        "recipe": RECIPE,
        "kmer": KMER,
        "species": list(species),
        "context_size": cfg.context_size,
        "overlap_ratio": cfg.overlap_ratio,
        "model": {name: getattr(cfg, name) for name in MODEL_FIELDS},
    }


def write_export(model: torch.nn.Module, cfg, species: list[str], out_dir: Path) -> Path:
    """`model.safetensors` (incl. the bucket memory) + `config.json`, atomically (rank 0 only)."""
    return export_safetensors(model, export_record(cfg, species), out_dir)


def read_export(path: str | Path) -> dict:
    """The record of an export folder; ExportError when it is not one of this recipe."""
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file() or not (path / "model.safetensors").is_file():
        raise ExportError(f"{path}: not an exported model (needs config.json and model.safetensors)")
    try:
        record = json.loads(config_path.read_text())
    except ValueError as err:
        raise ExportError(f"{config_path}: unreadable ({err})") from None
    if record.get("recipe") != RECIPE:
        raise ExportError(f"{config_path}: not a plant_lm export (recipe={record.get('recipe')!r})")
    return record


def check_fits(record: dict, cfg, species: list[str], path: str | Path) -> None:
    """Refuse an export made with another k-mer size, species list or model shape (dropout may differ)."""
    wanted = export_record(cfg, species)
    diffs = [
        f"{key}={record.get(key)!r} (this run: {wanted[key]!r})"
        for key in ("kmer", "species", "context_size")
        if record.get(key) != wanted[key]
    ]
    saved_model = record.get("model", {})
    diffs += [
        f"{name}={saved_model.get(name)!r} (this run: {wanted['model'][name]!r})"
        for name in MODEL_FIELDS
        if name != "dropout" and saved_model.get(name) != wanted["model"][name]
    ]
    if diffs:
        raise ExportError(f"{path}: export does not fit this run: {', '.join(diffs)}")


def load_weights(path: str | Path, model: PlantLM) -> None:
    """Copy an export's weights (incl. bucket memory) into `model`; ExportError (one line) when they do not fit."""
    path = Path(path)
    try:
        model.load_state_dict(load_file(path / "model.safetensors", device="cpu"))
    except Exception as err:  # safetensors' header errors and load_state_dict's multi-line RuntimeError
        raise ExportError(
            f"{path / 'model.safetensors'}: cannot be loaded ({' '.join(str(err).split())[:300]})"
        ) from None


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[PlantLM, dict]:
    """The exported model (eval mode, on `device`) and its record."""
    record = read_export(path)
    if record.get("kmer") != KMER:
        raise ExportError(f"{path}: made with {record.get('kmer')}-mers; this code reads {KMER}-mers")
    model = PlantLM(len(record["species"]), max_positions=record["context_size"], **record["model"])
    load_weights(path, model)
    return model.to(device).eval(), record


def write_epoch_file(run, path: Path, epochs_done: int, step: int) -> None:
    """The seed's `dna_model/model_epoch_N.pt` (rank 0 only) of a `run_state.Run`, written to a temporary name and
    renamed; WriteError (one line) when it cannot be written."""
    state = {
        "model_state_dict": run.model.state_dict(),  # includes the bucket memory (memory.sums/counts/commits)
        "optimizer_state_dict": run.optimizer.state_dict(),
        "scheduler_state_dict": run.scheduler.state_dict(),
        "epoch": epochs_done,
        "step": step,
        "config": dataclasses.asdict(run.cfg),
        "species": list(run.mixture.species),
        "data_positions": dict(run.mixture.positions),
    }
    try:
        with atomic_write(path, "wb") as handle:
            torch.save(state, handle)
    except RuntimeError as err:  # torch's writer reports a full disk as RuntimeError("... iostream error")
        if isinstance(err, WriteError):
            raise
        raise WriteError(describe_write_error(err, path)) from None


def rotate_epoch_files(epoch_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` epoch files (0 keeps all), as the checkpoints are rotated."""
    if keep_last > 0:
        files = sorted(epoch_dir.glob("model_epoch_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        for old in files[:-keep_last]:
            old.unlink(missing_ok=True)
