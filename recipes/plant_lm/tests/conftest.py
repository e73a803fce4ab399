"""Helpers shared by the tests: tiny synthetic FASTA data directories."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest


def write_fasta(path: Path, records: dict[str, str], gz: bool = False, width: int = 60) -> Path:
    """Write records {id: sequence} as FASTA (gzip when `gz`), `width` bases a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        f">{rid} test\n" + "".join(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
        for rid, seq in records.items()
    )
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def random_dna(n: int, seed: int, gc: float = 0.4) -> str:
    rng = np.random.default_rng(seed)
    probs = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
    return "".join(rng.choice(list("ACGT"), size=n, p=probs))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Two species with different composition, one gzip and one plain file."""
    root = tmp_path / "data"
    write_fasta(root / "oryza_sativa" / "chr1.fa.gz", {"chr1": random_dna(30_000, 1, gc=0.6)}, gz=True)
    write_fasta(root / "arabidopsis" / "chr1.fna", {"chr1": random_dna(20_000, 2, gc=0.3)})
    return root
