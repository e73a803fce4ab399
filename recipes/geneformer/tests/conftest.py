"""Shared fixtures: paths to the bundled sample and to the optional real Genecorpus cells."""

from __future__ import annotations

import logging
import os
import shutil
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
        "training.max_steps": steps,
        "training.log_every_n_steps": 1,
        "training.save_every": steps,
        "data.max_seq_length": 64,
        "data.micro_batch_size": 4,
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_attention_heads": 2,
        **extra,
    }
    return [f"{key}={value}" for key, value in values.items()]


def tiny_bert(
    vocab_size: int, hidden: int = 32, layers: int = 2, intermediate: int = 64, positions: int = 64, **config
):
    """A small recipe BertForMaskedLM, seeded (0) so every test that builds one starts from the same weights;
    `config` sets further `geneformer_config` fields (dropout, activation, heads)."""
    import torch

    from model import BertForMaskedLM, geneformer_config

    config = {"num_attention_heads": 2, **config}
    torch.manual_seed(0)
    return BertForMaskedLM(
        geneformer_config(
            vocab_size, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
            max_position_embeddings=positions, **config,
        )
    )  # fmt: skip


def published_folder(path: Path, safe=True, with_vocab=True, vocab_file=SAMPLE_DIR / "vocab.txt", seed=3, **config):
    """A tiny BertForMaskedLM saved by transformers itself, as a published Geneformer folder would be (`config`
    changes its BertConfig), with `vocab_file` as its vocab.txt."""
    import torch
    import transformers

    values = dict(
        vocab_size=len(vocab_file.read_text().splitlines()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_act="relu",
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**{**values, **config}))
    with torch.no_grad():  # non-zero biases, so a reset to the recipe's init would show
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    transformers.utils.logging.disable_progress_bar()  # transformers 5 draws one on stderr while saving
    model.save_pretrained(path, safe_serialization=safe)
    if with_vocab:
        shutil.copy(vocab_file, path / "vocab.txt")
    return path


@pytest.fixture(scope="session")
def finished_two_step_run(tmp_path_factory) -> Path:
    """One finished 2-step tiny run (checkpoints/step_00000002, final_model/, metrics), built once for every test that
    only reads it or starts from a copy of it (`copy_run`)."""
    import train

    run_dir = tmp_path_factory.mktemp("two_steps") / "run"
    assert train.main(tiny_overrides(run_dir, steps=2)) == 0
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    """A copy of a finished run folder, to resume or break without touching the shared one."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns(".run.lock"))
    return to


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
