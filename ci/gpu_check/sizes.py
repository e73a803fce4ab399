"""Sizes, step counts and time budgets of every check, keyed by device: the CPU dry run runs the same code at tiny sizes.

The cuda column is budgeted for one H200 (~790 bf16 TFLOP/s measured, 139 GiB): all recipes together within
`TOTAL_BUDGET_S` (9 minutes), each recipe's process killed at its own `budget_s`. A device session has 15 minutes
in all and one command at most 10: the machine's start (1-2 min) and the wheel install come on top, so the whole
check is one `run` with timeout_s=600, and `--only` splits it over two when a rerun is needed.
The switch rows (compile, activation checkpointing) use each recipe's `throughput` size.
"""

from __future__ import annotations

# On CPU the budgets only stop a hang: CI machines are shared and slow, and the dry run has no time target.
TOTAL_BUDGET_S = {"cuda": 540, "cpu": 3000}

SIZES = {
    "cuda": {
        "peak": {"n": 8192, "repeats": 10},
        "esm2_fa": {
            "budget_s": 150,
            "parity": {"model": "esm2_t12_35M", "batch": 4, "length": 512},
            "throughput": {"model": "esm2_t33_650M", "batch": 8, "length": 1024},
            "train": {"steps": 60, "bf16": True},
        },
        "geneformer": {
            "budget_s": 170,
            "parity": {"config": "106m", "layers": 4, "batch": 4, "length": 2048},
            "throughput": {"config": "106m", "layers": None, "batch": 8, "length": 2048},
            "train": {"steps": 60, "bf16": True},
            "fp8": [
                {"name": "fp8 106m", "config": "106m", "overrides": [], "steps": 80, "batch": 32},
                {
                    "name": "fp8 4b width",
                    "config": "4b",
                    "overrides": ["model.num_hidden_layers=2"],
                    "steps": 30,
                    "batch": 32,
                },
            ],
            "v2": {"configs": ["v2_104m", "v2_316m"], "layers": None, "batch": 4, "length": 4096},
            "batching": [
                {"name": "batching at 2048", "config": "106m", "layers": None, "cells": 96, "batch": 8, "length": 2048},
                {
                    "name": "batching at 4096",
                    "config": "v2_104m",
                    "layers": None,
                    "cells": 48,
                    "batch": 4,
                    "length": 4096,
                },
            ],
        },
        "gtdb_mamba": {
            "budget_s": 80,
            "parity": {"d_model": 256, "n_layers": 2, "batch": 4, "length": 512},
            "throughput": {"d_model": 1536, "n_layers": 8, "batch": 8, "length": 512},
            "train": {"steps": 60, "overrides": []},
        },
        "omnibiote": {
            "budget_s": 75,
            "parity": {"n_layer": 2, "n_head": 8, "n_embd": 256, "vocab": 512, "batch": 4, "length": 512},
            "throughput": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab": 65536, "batch": 16, "length": 1024},
            "train": {"token_budget": 240000, "stop_step": 20},
        },
        "plant_lm": {
            "budget_s": 65,
            "parity": {"d_model": 256, "n_heads": 4, "n_layers": 2, "batch": 4, "length": 256, "window": 32},
            "throughput": {"d_model": 512, "n_heads": 8, "n_layers": 6, "batch": 16, "length": 64, "window": 32},
            "train": {"steps_per_epoch": 30},
        },
    },
    "cpu": {
        "peak": {"n": 512, "repeats": 5},
        "esm2_fa": {
            "budget_s": 600,
            "parity": {"model": "esm2_tiny", "batch": 2, "length": 64},
            "throughput": {"model": "esm2_tiny", "batch": 2, "length": 64},
            "train": {"steps": 8, "bf16": False},
        },
        "geneformer": {
            "budget_s": 600,
            "parity": {"config": "l0_sanity", "layers": 2, "batch": 2, "length": 64},
            "throughput": {"config": "l0_sanity", "layers": 2, "batch": 2, "length": 64},
            "train": {"steps": 8, "bf16": False},
            "fp8": [
                {"name": "fp8 106m", "config": "106m", "overrides": [], "steps": 80, "batch": 32},
                {
                    "name": "fp8 4b width",
                    "config": "4b",
                    "overrides": ["model.num_hidden_layers=2"],
                    "steps": 30,
                    "batch": 32,
                },
            ],
            "v2": {"configs": ["v2_104m", "v2_316m"], "layers": 1, "batch": 1, "length": 64},
            "batching": [
                {"name": "batching at 2048", "config": "l0_sanity", "layers": 1, "cells": 12, "batch": 4, "length": 64},
                {
                    "name": "batching at 4096",
                    "config": "l0_sanity_v2",
                    "layers": 1,
                    "cells": 8,
                    "batch": 2,
                    "length": 128,
                },
            ],
        },
        "gtdb_mamba": {
            "budget_s": 600,
            "parity": {"d_model": 32, "n_layers": 1, "batch": 2, "length": 64},
            "throughput": {"d_model": 32, "n_layers": 1, "batch": 2, "length": 64},
            "train": {
                "steps": 8,
                "overrides": ["val.fragments_per_genome=2", "data.val_tokens=128"],
            },
        },
        "omnibiote": {
            "budget_s": 600,
            "parity": {"n_layer": 1, "n_head": 4, "n_embd": 64, "vocab": 512, "batch": 2, "length": 64},
            "throughput": {"n_layer": 1, "n_head": 4, "n_embd": 64, "vocab": 512, "batch": 2, "length": 64},
            "train": {"token_budget": 20000, "stop_step": 3},
        },
        "plant_lm": {
            "budget_s": 600,
            "parity": {"d_model": 64, "n_heads": 4, "n_layers": 1, "batch": 2, "length": 96, "window": 32},
            "throughput": {"d_model": 64, "n_heads": 4, "n_layers": 1, "batch": 2, "length": 64, "window": 32},
            "train": {"steps_per_epoch": 4},
        },
    },
}
# esm2_fa's faesm row runs in a process of its own with this folder (transformers 4.53 + faesm, from
# .whl/faesm) first on PYTHONPATH; run.py sets it on CUDA. Without it the row SKIPs (CI runs faesm in .venv-faesm).
FAESM_SITE_VARIABLE = "GPU_CHECK_FAESM_SITE"
# Timing repeats for the throughput rows (median of `repeats` after `warmup`).
TIMING = {"cuda": {"warmup": 3, "repeats": 7}, "cpu": {"warmup": 1, "repeats": 3}}
RECIPES = ("esm2_fa", "geneformer", "gtdb_mamba", "omnibiote", "plant_lm")
CHECKS = {recipe: ("parity", "throughput", "train+resume") for recipe in RECIPES}
CHECKS["esm2_fa"] += ("attention flash_attention_2", "attention sdpa", "attention flex_attention", "attention eager")
CHECKS["esm2_fa"] += ("attention faesm",)
CHECKS["geneformer"] += tuple(spec["name"] for spec in SIZES["cuda"]["geneformer"]["fp8"])
CHECKS["geneformer"] += tuple(SIZES["cuda"]["geneformer"]["v2"]["configs"])
CHECKS["geneformer"] += tuple(spec["name"] for spec in SIZES["cuda"]["geneformer"]["batching"])
CHECKS = {recipe: (*checks, "compile", "activation checkpointing") for recipe, checks in CHECKS.items()}


def sizes_for(device: str, recipe: str) -> dict:
    """The size table of one recipe on one device, with the timing repeats merged in."""
    return {**SIZES[device][recipe], **TIMING[device]}
