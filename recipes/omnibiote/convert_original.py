"""Turn a checkpoint of the original OmniBioTE (nyuolab/OmniBioTE) into this recipe's final_model/ folder.

    python convert_original.py original_model.pt converted/ [--n_head 12]

The head count comes from the attention modules (each records its own `n_head` and a rotary table of width
head_dim/2), never from the pickled config, which the original leaves at its muP delta model (n_embd 48, n_head 12)
whatever it trained; --n_head is only for a checkpoint whose modules record nothing and is refused where it
contradicts them.

The original saves whole pickled model objects (`torch.save(model)`), which only `torch.load(weights_only=False)`
would open, running whatever the file names. Here the pickle is read by a restricted unpickler: every class the
file names becomes an inert stand-in object that only records its attributes, torch's own tensor rebuild functions
and a few containers are the only callables allowed, and a file that tries to call anything else is refused in one
line. What the conversion changes, and why (facts from the original's model code):

- rotary layout: the original rotates interleaved channel pairs (2i, 2i+1) of each head, this model half-split pairs
  (i, i + head_dim/2); permuting the q and k rows of each head [0, 2, 4, ..., 1, 3, 5, ...] makes them equal.
- special ids: the original's <unk>=0, <pad>=1, <mask>=2, </s>=3 become this recipe's <pad>=0, <unk>=1, </s>=2,
  <mask>=3 (embedding and readout rows swapped; `original_to_converted_ids` maps token ids the same way).
- MuReadout: its output is W x * output_mult / width_mult; the original's scale (its own base shapes) is folded
  into the readout weight so that this model's width_mult gives the same logits.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
import types
from pathlib import Path

import torch

from biorecipes_shared import run_cli
from errors import OmniBioteError
from export import export_final_model
from model import OmniBioTA, OmniBioTAConfig

# token ids: original -> this recipe (an involution on the first four ids, the identity after them)
ORIGINAL_TO_CONVERTED = {0: 1, 1: 0, 2: 3, 3: 2}
# the only callables a checkpoint may invoke: torch's tensor/parameter rebuilders and plain containers
SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
}
NAME_MAP = {  # original name (after transformer.h.<i>.) -> this recipe's (after blocks.<i>.)
    "ln_1.weight": "ln_attn.weight",
    "attn.c_attn.weight": "attn.qkv.weight",
    "attn.c_proj.weight": "attn.proj.weight",
    "ln_2.weight": "ln_mlp.weight",
    "mlp.c_fc.weight": "mlp.0.weight",
    "mlp.c_proj.weight": "mlp.2.weight",
}


class ConvertError(OmniBioteError):
    """An original checkpoint that cannot (or must not) be converted."""


class StandIn:
    """An inert object standing for any class an original checkpoint names; it only keeps the state it is given."""

    _global = "?"

    def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ: build without running the real class's code
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        return obj

    def __init__(self, *args, **kwargs):  # only reached when the pickle *calls* the global (REDUCE): refuse
        raise pickle.UnpicklingError(f"it calls {type(self)._global}(...)")


class RestrictedUnpickler(pickle.Unpickler):
    """find_class returns stand-ins (or the few SAFE_GLOBALS); nothing named in the file is imported or run."""

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module  # pickle protocol 2 spells it the Python 2 way
        if (module, name) in SAFE_GLOBALS:
            return getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (StandIn,), {"_global": f"{module}.{name}", "__module__": "stand_in"})


restricted_pickle = types.ModuleType("restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
restricted_pickle.__name__ = "restricted_pickle"


def read_original(path: Path) -> StandIn:
    """The pickled model object as a tree of stand-ins holding real tensors; ConvertError (one line) otherwise."""
    try:
        # torch reads the zip and the tensor storages; every global of the pickle goes through RestrictedUnpickler
        root = torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except pickle.UnpicklingError as err:
        raise ConvertError(f"{path}: refused, the pickle tries to run code ({err}); nothing was executed") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ConvertError(f"{path}: not a readable torch checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(root, StandIn) or "_modules" not in root.__dict__:
        raise ConvertError(f"{path}: holds a {type(root).__name__}, not a whole pickled OmniBioTA model")
    return root


def named_tensors(module: StandIn, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters of a stand-in module tree by their state-dict names (buffers such as freqs_cis are rebuilt)."""
    out = {}
    for name, param in (module.__dict__.get("_parameters") or {}).items():
        if param is not None:
            out[prefix + name] = param
    for name, child in (module.__dict__.get("_modules") or {}).items():
        if child is not None:
            out.update(named_tensors(child, f"{prefix}{name}."))
    return out


def readout_scale(module: StandIn, weight: torch.Tensor) -> float:
    """output_mult / width_mult of the original's MuReadout (mup: width_mult = dim / base_dim of the width axis)."""
    output_mult = float(module.__dict__.get("output_mult", 1.0))
    infshape = getattr(weight, "infshape", None)
    width_mult = 1.0
    main = infshape.__dict__.get("main") if isinstance(infshape, StandIn) else None
    if isinstance(main, StandIn) and main.__dict__.get("base_dim"):
        width_mult = main.__dict__["dim"] / main.__dict__["base_dim"]
    return output_mult / width_mult


def half_split_order(n_embd: int, n_head: int) -> torch.Tensor:
    """Row order that turns interleaved rotary pairs into half-split ones, head by head: (n_embd,) indices."""
    head_dim = n_embd // n_head
    within = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    return torch.cat([h * head_dim + within for h in range(n_head)])


def id_order(vocab_size: int) -> torch.Tensor:
    """rows_converted = rows_original[order]: (vocab_size,) indices."""
    order = torch.arange(vocab_size)
    for old, new in ORIGINAL_TO_CONVERTED.items():
        order[new] = old
    return order


def original_to_converted_ids(ids: torch.Tensor) -> torch.Tensor:
    """Token ids of the original tokenizer -> ids of the converted model (same shape)."""
    out = ids.clone()
    for old, new in ORIGINAL_TO_CONVERTED.items():
        out[ids == old] = new
    return out


def module_of(root: StandIn, dotted: str) -> StandIn | None:
    """The stand-in submodule at a dotted path ("transformer.h.0.attn"), or None."""
    module = root
    for name in dotted.split("."):
        module = (module.__dict__.get("_modules") or {}).get(name) if isinstance(module, StandIn) else None
    return module if isinstance(module, StandIn) else None


def recorded_heads(root: StandIn, n_layer: int, n_embd: int, path: Path) -> dict[str, int]:
    """Head counts the checkpoint itself states, by witness: each attention module's own `n_head` (set when it was
    built, unlike the model's config object, which the original leaves at its muP delta shape) and the width of its
    rotary table `freqs_cis` (ctx_len, head_dim/2). ConvertError where two witnesses disagree."""
    said: dict[str, int] = {}
    for i in range(n_layer):
        attn = module_of(root, f"transformer.h.{i}.attn")
        if attn is None:
            continue
        if isinstance(attn.__dict__.get("n_head"), int):
            said[f"transformer.h.{i}.attn.n_head"] = attn.__dict__["n_head"]
        table = (attn.__dict__.get("_buffers") or {}).get("freqs_cis")
        if isinstance(table, torch.Tensor) and table.ndim == 2 and table.shape[-1]:
            head_dim = 2 * table.shape[-1]
            said[f"transformer.h.{i}.attn.freqs_cis (head_dim {head_dim})"] = n_embd / head_dim
    if len(set(said.values())) > 1:
        first = {}  # one witness per distinct value keeps the line short on a 24-layer model
        for witness, value in said.items():
            first.setdefault(value, witness)
        views = ", ".join(f"{witness}={value:g}" for value, witness in first.items())
        raise ConvertError(f"{path}: the attention modules disagree about the head count ({views})")
    return said


def head_count(root: StandIn, n_layer: int, n_embd: int, n_head: int | None, path: Path) -> int:
    """Heads from the attention modules and their rotary tables; --n_head only where they record nothing, and
    refused where it contradicts them. The model's config object is never trusted for this (see recorded_heads)."""
    said = recorded_heads(root, n_layer, n_embd, path)
    if said:
        recorded = next(iter(said.values()))
        if recorded != int(recorded) or n_embd % int(recorded):
            raise ConvertError(f"{path}: width {n_embd} does not split into the {recorded:g} heads its modules record")
        if n_head is not None and n_head != recorded:
            witness = next(iter(said))
            raise ConvertError(f"{path}: --n_head {n_head} contradicts the checkpoint ({witness}={recorded:g})")
        return int(recorded)
    if n_head is None:
        raise ConvertError(f"{path}: no attention module records its head count; give --n_head")
    return n_head


def original_config(root: StandIn, tensors: dict, n_head: int | None, path: Path) -> OmniBioTAConfig:
    """This recipe's config for the original's shapes: width and depth from the weights, heads from the attention
    modules (head_count), context length and dropout from the original's config object."""
    settings = root.__dict__.get("config")
    settings = settings.__dict__ if isinstance(settings, StandIn) else {}
    if settings.get("bias") or any(name.endswith("bias") for name in tensors):
        raise ConvertError(f"{path}: the model has bias terms; this recipe's model has none")
    vocab_size, n_embd = tensors["transformer.wte.weight"].shape
    n_layer = len({name.split(".")[2] for name in tensors if name.startswith("transformer.h.")})
    heads = head_count(root, n_layer, n_embd, n_head, path)
    try:
        return OmniBioTAConfig(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_head=heads,
            n_embd=n_embd,
            ctx_len=int(settings.get("block_size", settings.get("context_length", 2048))),
            dropout=float(settings.get("dropout", 0.0)),
            pad_id=0,
        )
    except ValueError as err:
        raise ConvertError(f"{path}: {err}") from None


def convert_state(root: StandIn, tensors: dict, config: OmniBioTAConfig, path: Path) -> dict[str, torch.Tensor]:
    """The original's weights under this recipe's names, rotary rows permuted, ids remapped, readout rescaled."""
    state, used = {}, set()
    for i in range(config.n_layer):
        for old, new in NAME_MAP.items():
            key = f"transformer.h.{i}.{old}"
            if key not in tensors:
                raise ConvertError(f"{path}: no {key} (not an OmniBioTA checkpoint of the GELU/MuReadout version)")
            state[f"blocks.{i}.{new}"], used = tensors[key].detach().float().clone(), used | {key}
        qkv = state[f"blocks.{i}.attn.qkv.weight"]
        order = half_split_order(config.n_embd, config.n_head)
        for part in (0, 1):  # q and k rows; v is not rotated
            rows = slice(part * config.n_embd, (part + 1) * config.n_embd)
            qkv[rows] = qkv[rows][order]
    rows = id_order(config.vocab_size)
    state["tok_emb.weight"] = tensors["transformer.wte.weight"].detach().float()[rows].clone()
    state["ln_f.weight"] = tensors["transformer.ln_f.weight"].detach().float().clone()
    target = OmniBioTA(config)
    ours = target.lm_head.output_mult / target.lm_head.width_mult()
    lm_head = root.__dict__["_modules"]["lm_head"]
    scale = readout_scale(lm_head, tensors["lm_head.weight"]) / ours
    state["lm_head.weight"] = (tensors["lm_head.weight"].detach().float() * scale)[rows].clone()
    used |= {"transformer.wte.weight", "transformer.ln_f.weight", "lm_head.weight"}
    if unknown := sorted(set(tensors) - used):
        raise ConvertError(f"{path}: parameters this model has no place for: {unknown[:5]}")
    return state


def convert(path: Path, out_dir: Path, n_head: int | None = None) -> Path:
    """Read an original checkpoint without running it and write out_dir/ (config.json, model.safetensors, provenance)."""
    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists():
        raise ConvertError(f"{out_dir} already exists; nothing was written (choose another folder)")
    root = read_original(path)
    tensors = named_tensors(root)
    if "transformer.wte.weight" not in tensors:
        raise ConvertError(f"{path}: no transformer.wte.weight (not an OmniBioTA model)")
    config = original_config(root, tensors, n_head, path)
    model = OmniBioTA(config)
    model.load_state_dict(convert_state(root, tensors, config, path), strict=True)
    provenance = {
        "source": str(path),
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "conversion": "convert_original.py: half-split rotary rows, ids remapped (original->converted)",
        "original_to_converted_ids": {str(k): v for k, v in ORIGINAL_TO_CONVERTED.items()},
    }
    return export_final_model(model, None, out_dir, provenance=provenance)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the original's whole-model .pt file")
    parser.add_argument("out_dir", type=Path, help="new folder for the converted final_model")
    parser.add_argument(
        "--n_head", type=int, default=None, help="heads, only for a checkpoint whose attention modules record none"
    )
    args = parser.parse_args(argv)
    out = convert(args.checkpoint, args.out_dir, args.n_head)
    print(f"converted {args.checkpoint} -> {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, user_errors=(OmniBioteError,)))
