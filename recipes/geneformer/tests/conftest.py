"""Shared fixtures: paths to the bundled sample and to the optional real Genecorpus cells."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

RECIPE_DIR = Path(__file__).resolve().parents[1]
SAMPLE_DIR = RECIPE_DIR / "sample_data"


def find_shared_data() -> Path | None:
    """`$BIORECIPES_SHARED_DATA`, else the first `<ancestor>/../shared/data` holding a README.md."""
    if os.environ.get("BIORECIPES_SHARED_DATA"):
        path = Path(os.environ["BIORECIPES_SHARED_DATA"])
        return path if (path / "README.md").is_file() else None
    for ancestor in Path(__file__).resolve().parents:
        candidate = ancestor.parent / "shared" / "data"
        if (candidate / "README.md").is_file():
            return candidate
    return None


@pytest.fixture
def genecorpus_dir() -> Path:
    shared = find_shared_data()
    corpus = shared / "genecorpus_500" if shared else None
    if corpus is None or not (corpus / "genecorpus_500_samples.parquet").is_file():
        pytest.skip("real Genecorpus sample not found (../shared/data/genecorpus_500 or $BIORECIPES_SHARED_DATA)")
    return corpus


def tiny_overrides(output_dir: Path, steps: int = 6, **extra) -> list[str]:
    """l0_sanity shrunk further for tests: short cells, small batches, every step logged."""
    values = {
        "training.output_dir": str(output_dir),
        "training.num_train_steps": steps,
        "training.log_every_n_steps": 1,
        "training.save_every_n_steps": steps,
        "data.max_seq_length": 64,
        "data.micro_batch_size": 4,
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_attention_heads": 2,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(autouse=True)
def recipe_logger_to_real_stderr():
    """In-process runs: the recipe's logger writes to the process's stderr, not to a capsys stream that a later test
    has closed, so captured stderr holds only what `main` prints (its one `error:` line)."""
    logger = logging.getLogger("geneformer")
    saved = logger.handlers[:]
    handler = logging.StreamHandler(sys.__stderr__)
    handler._biorecipes = True  # get_logger keeps a handler marked like this instead of adding its own
    logger.handlers[:] = [handler]
    logger.propagate = False
    yield
    logger.handlers[:] = saved
