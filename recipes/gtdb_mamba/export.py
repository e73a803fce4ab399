"""The exported embedder (`<output_dir>/final_model/`): write it, read it back, and start a new run from it.

`config.json` records everything the weights depend on: the model config, the k-mer size (hence the vocabulary) and
the recipe. `train.init_from=<final_model dir>` and `embed.py` refuse an export whose record does not fit, in one line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from biorecipes_shared import RunError, export_safetensors
from data import KmerTokenizer
from model import EmbedderConfig, GenomeFragmentEmbedder

RECIPE = "gtdb_mamba"
# Model settings that do not change the weights' meaning: the kernel choice only.
NOT_RECORDED = ("backend",)


class ExportError(RunError):
    """An export that is missing, damaged or made for another model (one line naming the folder)."""


def export_config(model_config: EmbedderConfig, kmer: int) -> dict:
    """What `config.json` must match: the EmbedderConfig fields, `kmer` and `recipe`."""
    return {**dataclasses.asdict(model_config), "kmer": kmer, "recipe": RECIPE}


def fragment_record(cfg) -> dict:
    """The run's fragment rules, recorded so that `embed.py` cuts the same fragments as validation by default."""
    return {
        "fragment_bp": int(cfg.data.fragment_bp),
        "tokens": int(cfg.data.val_tokens),
        "max_n_fraction": float(cfg.data.max_n_fraction),
        "reverse_complement": bool(cfg.data.reverse_complement),
        "fragments_per_genome": int(cfg.val.fragments_per_genome),
        "seed": int(cfg.seed),
    }


def write_export(
    embedder: GenomeFragmentEmbedder, model_config: EmbedderConfig, kmer: int, out_dir: Path, fragments: dict
) -> Path:
    """`model.safetensors` (the embedder only) + `config.json` (+ the fragment rules), atomically (rank 0 only)."""
    return export_safetensors(embedder, {**export_config(model_config, kmer), "fragments": fragments}, out_dir)


def read_export_config(path: str | Path) -> dict:
    """The record of an export folder; ExportError when it is not one of this recipe."""
    path = Path(path)
    config_path, weights = path / "config.json", path / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise ExportError(f"{path}: not an exported model (needs config.json and model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ExportError(f"{config_path}: unreadable ({err})") from None
    if config.get("recipe") != RECIPE or "kmer" not in config:
        raise ExportError(f"{config_path}: not a gtdb_mamba export (recipe={config.get('recipe')!r})")
    return config


def check_fits(config: dict, model_config: EmbedderConfig, kmer: int, path: Path) -> None:
    """Refuse an export whose k-mer size or model config differs from this run's (ExportError naming each)."""
    wanted = export_config(model_config, kmer)
    diffs = [
        f"{key}={config.get(key)!r} (this run: {value!r})"
        for key, value in wanted.items()
        if key not in NOT_RECORDED and config.get(key) != value
    ]
    if diffs:
        raise ExportError(f"{path}: export does not fit this run: {', '.join(diffs)}")


def load_weights(path: Path, embedder: GenomeFragmentEmbedder) -> None:
    try:
        weights = load_file(path / "model.safetensors", device="cpu")
        embedder.load_state_dict(weights)
    except Exception as err:  # safetensors' header errors and load_state_dict's multi-line RuntimeError
        detail = " ".join(str(err).split())[:300]
        raise ExportError(f"{path / 'model.safetensors'}: cannot be loaded ({detail})") from None


def init_from(path: str | Path, embedder: GenomeFragmentEmbedder, model_config: EmbedderConfig, kmer: int) -> None:
    """Copy an export's embedder weights into `embedder` after checking its record (the head starts fresh)."""
    path = Path(path)
    check_fits(read_export_config(path), model_config, kmer, path)
    load_weights(path, embedder)


def load_export(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GenomeFragmentEmbedder, KmerTokenizer, dict]:
    """The exported embedder (eval mode, on `device`), its tokenizer and the export's record."""
    path = Path(path)
    config = read_export_config(path)
    fields = {f.name for f in dataclasses.fields(EmbedderConfig)}
    model_config = EmbedderConfig(**{key: value for key, value in config.items() if key in fields})
    tokenizer = KmerTokenizer(int(config["kmer"]))
    if (model_config.vocab_size, model_config.pad_token) != (tokenizer.vocab_size, tokenizer.pad_token):
        raise ExportError(f"{path}: vocab_size/pad_token do not match kmer={tokenizer.k}")
    embedder = GenomeFragmentEmbedder(model_config)
    load_weights(path, embedder)
    return embedder.to(device).eval(), tokenizer, config
