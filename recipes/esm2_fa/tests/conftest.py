"""Shared fixtures: tiny FASTA files and preprocessed shard dirs built once per session."""

import os
import sys
from pathlib import Path

import pytest

# One thread per process, as biorecipes_shared.testing gives the subprocesses: the test models are tiny, and on a
# busy 2-core machine torch's default thread pool made each in-process step ~9x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE_DIR / "src"))  # also works when pytest runs from another cwd without pytest.ini

import torch  # noqa: E402

from data_processing import preprocess_fasta  # noqa: E402

torch.set_num_threads(1)

SAMPLE_TRAIN = RECIPE_DIR / "sample_data" / "train.fasta"
SAMPLE_VAL = RECIPE_DIR / "sample_data" / "val.fasta"
TINY_CONFIG = RECIPE_DIR / "src" / "config_tiny_cpu.yaml"


def shared_data_dir() -> Path | None:
    """`../shared/data` beside the checkout (walking up from here), or $BIORECIPES_SHARED_DATA; None if absent."""
    if os.environ.get("BIORECIPES_SHARED_DATA"):
        path = Path(os.environ["BIORECIPES_SHARED_DATA"])
        return path if (path / "README.md").is_file() else None
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if (candidate / "README.md").is_file():
            return candidate
    return None


def write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{name}\n{seq}\n" for name, seq in records))
    return path


def head_fasta(src: Path, dst: Path, n: int, max_len: int | None = None) -> Path:
    """The first n records of src (optionally truncated to max_len residues) written to dst."""
    from Bio.SeqIO.FastaIO import SimpleFastaParser

    with open(src) as handle:
        records = [(t, s[:max_len] if max_len else s) for _, (t, s) in zip(range(n), SimpleFastaParser(handle))]
    return write_fasta(dst, records)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """(train_dir, val_dir) from real sample proteins: short pieces, a small token budget and 8 train shards."""
    root = tmp_path_factory.mktemp("tiny")
    train_fa = head_fasta(SAMPLE_TRAIN, root / "train.fasta", 240, max_len=300)
    val_fa = head_fasta(SAMPLE_VAL, root / "val.fasta", 12, max_len=300)  # small: runs evaluate it often
    common = dict(chunk_size=120, max_aa_length=126, token_budget=1024, max_position_embeddings=1026, progress=False)
    preprocess_fasta(train_fa, root / "train", shard_size=90, **common)
    preprocess_fasta(val_fa, root / "val", shard_size=1000, **common)
    return root / "train", root / "val"


def padded_batch():
    """(input_ids [3, 40], attention_mask [3, 40]): ESM-2 rows with <cls>/<eos>, one padded, one with <mask>s."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 24, (3, 40), generator=generator)
    ids[:, 0] = 0
    ids[:, -1] = 2
    ids[1, 25:] = 1  # a shorter sequence: <eos> then padding
    ids[1, 24] = 2
    ids[2, 5:9] = 32  # masked tokens exercise token_dropout's rescaling
    return ids, (ids != 1).long()
