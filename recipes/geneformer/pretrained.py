"""Start from a published Geneformer: a Hugging Face `BertForMaskedLM` folder (config.json + weights).

Geneformer V1 (2,048 positions, `<pad>`/`<mask>` only) and V2 (4,096 positions, also `<cls>`/`<eos>`) are both plain
BERT masked-LMs, so the folder's config.json fixes the architecture and its weights load by name into this recipe's
model (the plain layers use Hugging Face's parameter names). Weights are read with safetensors, or with
`torch.load(weights_only=True)` for `pytorch_model.bin`: a pickled folder never runs code here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from biorecipes_shared import ConfigError
from dictionaries import read_text

# Keys that define the network: taken from the folder, and an explicit model.* override that differs is an error.
ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "layer_norm_eps",
)
# Training choices: taken from the folder unless given on the command line.
TRAINING_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range")
# Weights a BertForPreTraining / BertModel export carries that a masked-LM does not use.
UNUSED_PREFIXES = ("bert.pooler.", "cls.seq_relationship.", "bert.embeddings.position_ids")
# One tensor under two names in BertForMaskedLM (tied to the gene embeddings / the head bias): often not stored.
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def read_folder_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict; ConfigError (one line) when it is missing, unreadable or not BERT."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"model.init_from={folder}: no config.json (expected a Hugging Face BertForMaskedLM folder)")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if config.get("model_type", "bert") != "bert":
        raise ConfigError(f"{path}: model_type={config.get('model_type')!r}, not a BERT (Geneformer) model")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{path}: position_embedding_type={config['position_embedding_type']!r} is not supported")
    missing = [key for key in ARCHITECTURE_KEYS if key not in config]
    if missing:
        raise ConfigError(f"{path}: lacks {missing}")
    return config


def merge_folder_config(model_cfg, folder_config: dict[str, Any], explicit: set[str], folder: Path) -> None:
    """Fill `model_cfg` (the model.* config node) from the folder; an explicit architecture override that differs is
    a ConfigError naming both values."""
    for key in ARCHITECTURE_KEYS:
        value = folder_config[key]
        if key in explicit and model_cfg[key] != value:
            raise ConfigError(
                f"model.{key}={model_cfg[key]} conflicts with {folder}/config.json ({key}={value}): the published "
                "architecture is fixed; drop the override"
            )
        model_cfg[key] = value
    for key in TRAINING_KEYS:
        if key not in explicit and key in folder_config:
            model_cfg[key] = folder_config[key]


def check_folder_vocab(folder: str | Path, vocab: list[str], vocab_path: str | Path, vocab_size: int) -> None:
    """The folder's vocabulary must be the data's: always by size, and by content when the folder holds `vocab.txt`
    or `token_dictionary.json` ({token: id}). Raises ConfigError (one line)."""
    folder = Path(folder)
    if vocab_size != len(vocab):
        raise ConfigError(
            f"{folder}/config.json has vocab_size={vocab_size} but {vocab_path} has {len(vocab)} tokens: tokenize the "
            "data with the published model's vocabulary"
        )
    theirs, source = _folder_tokens(folder)
    if theirs is None or theirs == vocab:
        return
    if len(theirs) != len(vocab):
        raise ConfigError(f"{source} has {len(theirs)} tokens but {vocab_path} has {len(vocab)}")
    first = next(i for i, (a, b) in enumerate(zip(theirs, vocab)) if a != b)
    raise ConfigError(
        f"{source} and {vocab_path} differ first at token id {first} ({theirs[first]!r} vs {vocab[first]!r}): "
        "tokenize the data with the published model's vocabulary"
    )


def _folder_tokens(folder: Path) -> tuple[list[str] | None, Path | None]:
    if (folder / "vocab.txt").is_file():
        return read_text(folder / "vocab.txt", "vocabulary").splitlines(), folder / "vocab.txt"
    path = folder / "token_dictionary.json"
    if path.is_file():
        try:
            ids = json.loads(read_text(path, "token dictionary"))
            tokens = [None] * len(ids)
            for token, index in ids.items():
                tokens[int(index)] = token
        except (ValueError, TypeError, IndexError) as error:
            raise ConfigError(f"{path}: not a {{token: id}} dictionary with ids 0..n-1 ({error})") from None
        return tokens, path
    return None, None  # a token_dictionary.pkl is never unpickled here: only the size is compared


def read_folder_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` (or its shards), else `pytorch_model.bin` read with weights_only=True."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        if (folder / "model.safetensors").is_file():
            return load_file(folder / "model.safetensors", device="cpu")
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {name: t for shard in shards for name, t in load_file(folder / shard, device="cpu").items()}
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, json and torch.load raise several kinds for a damaged file
        raise ConfigError(f"{folder}: weights cannot be read ({type(error).__name__}: {error})") from None
    raise ConfigError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_folder_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the folder's weights into `model` (plain layers, Hugging Face names); ConfigError naming what misfits."""
    weights = {k: v for k, v in read_folder_weights(folder).items() if not k.startswith(UNUSED_PREFIXES)}
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in weights and k not in TIED_KEYS]
    unexpected = [k for k in weights if k not in own]
    if wrong or missing or unexpected:
        raise ConfigError(
            f"{folder}: weights do not fit a BertForMaskedLM of its config.json "
            f"(shape {wrong[:2]}, missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor)
