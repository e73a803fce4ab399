"""Everything that writes `final_model/`: the trained weights in the Hugging Face BERT layout, plus the vocabulary.

`final_model/` holds model.safetensors + config.json (`architectures: ["BertForMaskedLM"]`, loadable by transformers'
`BertForMaskedLM.from_pretrained`) and vocab.txt (embed.py and `model.init_from` check tokens against it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from biorecipes_shared import atomic_write, export_safetensors
from model import BertForMaskedLM, te_to_hf_state_dict


def export_final_model(
    model: BertForMaskedLM, state_dict: dict[str, torch.Tensor], folder: str | Path, vocab: list[str] | None = None
) -> Path:
    """Write `folder` (model.safetensors + config.json atomically, then vocab.txt when `vocab` is given).

    `state_dict` is the full (unsharded) state of `model`; Transformer Engine layer names are mapped to the plain
    BERT ones. Raises WriteError (one line) when the folder cannot be written."""
    if getattr(model.config, "use_te_layers", False):
        state_dict = te_to_hf_state_dict(state_dict)
    config = model.config.to_dict()
    config["architectures"] = ["BertForMaskedLM"]
    folder = Path(folder)
    export_safetensors(None, config, folder, state_dict=state_dict)
    if vocab is not None:
        with atomic_write(folder / "vocab.txt") as handle:
            handle.write("\n".join(vocab) + "\n")
    return folder
