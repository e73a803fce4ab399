"""Write a `final_model/` folder (config.json, model.safetensors, tokenizer.model, optional provenance) atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from biorecipes_shared import atomic_dir


def export_final_model(model, tokenizer_file: Path | None, out_dir: Path, provenance: dict | None = None) -> Path:
    """The folder appears under its name only when complete; an older one is replaced only after.

    Raises WriteError (one line naming the folder and the cause: full disk, no permission) after removing the
    temporary folder.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replace=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
        if provenance is not None:
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return out_dir
