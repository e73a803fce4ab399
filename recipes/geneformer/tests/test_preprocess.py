"""Rank-value tokenizer against a hand-computed example, real-data rebuild, and bad inputs."""

from __future__ import annotations

import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import RECIPE_DIR, SAMPLE_DIR

from preprocess import DataError, preprocess

# 3 cells x 4 genes. Cells 1 and 2 total 10 counts, cell 3 totals 20, so after scaling to 10,000:
#   A: 4000, 1000       -> non-zero median 2500
#   B: 2000, 1000, 5000 -> median 2000
#   C: 8000, 5000       -> median 6500
#   D: 4000             -> median 4000
# scores = normalised / median:
#   cell1: A 1.6, B 1.0, D 1.0 (tie: vocabulary order B before D)
#   cell2: C 1.23, B 0.5, A 0.4
#   cell3: B 2.5, C 0.77
COUNTS = pd.DataFrame({"cell_id": ["c1", "c2", "c3"], "A": [4, 1, 0], "B": [2, 1, 10], "C": [0, 8, 10], "D": [4, 0, 0]})
V1_IDS = {"A": 2, "B": 3, "C": 4, "D": 5}  # after <pad>, <mask>


def token_rows(path):
    return pq.read_table(path).column("input_ids").to_pylist()


def test_hand_computed_example_v1(tmp_path):
    COUNTS.to_csv(tmp_path / "counts.csv", index=False)
    out = preprocess(tmp_path / "counts.csv", tmp_path / "out")
    assert (tmp_path / "out" / "vocab.txt").read_text().split() == ["<pad>", "<mask>", "A", "B", "C", "D"]
    a, b, c, d = (V1_IDS[g] for g in "ABCD")
    assert token_rows(out) == [[a, b, d], [c, b, a], [b, c]]
    assert pq.read_table(out).column("length").to_pylist() == [3, 3, 2]
    medians = pd.read_json(tmp_path / "out" / "gene_medians.json", typ="series").to_dict()
    assert medians == pytest.approx({"A": 2500.0, "B": 2000.0, "C": 6500.0, "D": 4000.0})


def test_truncation_and_v2_special_tokens(tmp_path):
    COUNTS.to_parquet(tmp_path / "counts.parquet")
    out = preprocess(tmp_path / "counts.parquet", tmp_path / "v1", max_length=2)
    assert token_rows(out) == [[2, 3], [4, 3], [3, 4]]
    out = preprocess(tmp_path / "counts.parquet", tmp_path / "v2", max_length=4, style="v2")
    vocab = (tmp_path / "v2" / "vocab.txt").read_text().split()
    assert vocab[:4] == ["<pad>", "<mask>", "<cls>", "<eos>"]
    cls, eos, a, b, c = 2, 3, 4, 5, 6
    assert token_rows(out) == [[cls, a, b, eos], [cls, c, b, eos], [cls, b, c, eos]]


def test_reuses_given_vocab_and_medians(tmp_path):
    COUNTS.to_csv(tmp_path / "counts.csv", index=False)
    preprocess(tmp_path / "counts.csv", tmp_path / "first")
    (tmp_path / "vocab.txt").write_text("<pad>\n<mask>\nD\nC\nB\nA\n")  # another order, same genes
    out = preprocess(
        tmp_path / "counts.csv", tmp_path / "second", tmp_path / "vocab.txt", tmp_path / "first" / "gene_medians.json"
    )
    assert token_rows(out)[0] == [5, 2, 4]  # A (5), then the B/D tie in this vocabulary's order: D (2), B (4)


def test_h5ad_counts_layer_and_log_normalised_rejected(tmp_path):
    counts = sp.csr_matrix(COUNTS[["A", "B", "C", "D"]].to_numpy(dtype=np.float32))
    adata = anndata.AnnData(X=np.log1p(counts.toarray()), layers={"counts": counts})
    adata.var_names = list("ABCD")
    adata.write_h5ad(tmp_path / "with_layer.h5ad")
    out = preprocess(tmp_path / "with_layer.h5ad", tmp_path / "out")
    assert token_rows(out) == [[2, 3, 5], [4, 3, 2], [3, 4]]
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "log_only.h5ad")
    with pytest.raises(DataError, match="log_only.h5ad: no raw counts"):
        preprocess(tmp_path / "log_only.h5ad", tmp_path / "bad")
    assert not (tmp_path / "bad" / "cells.parquet").exists()


def test_empty_cell_and_bad_tables(tmp_path):
    empty = COUNTS.copy()
    empty.loc[1, ["A", "B", "C", "D"]] = 0
    empty.to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(DataError, match="cell 'c2' has no counts"):
        preprocess(tmp_path / "empty.csv", tmp_path / "out")
    fractional = COUNTS.astype({"A": float})
    fractional.loc[0, "A"] = 0.5
    fractional.to_csv(tmp_path / "fractional.csv", index=False)
    with pytest.raises(DataError, match="cell 'c1' has non-integer"):
        preprocess(tmp_path / "fractional.csv", tmp_path / "out")
    with pytest.raises(DataError, match="no such file"):
        preprocess(tmp_path / "missing.h5ad", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bundled_sample_rebuilds_identically(tmp_path):
    """The committed parquet is exactly what preprocess.py makes from the committed real PBMC counts."""
    out = preprocess(SAMPLE_DIR / "pbmc500_counts.h5ad", tmp_path)
    assert (tmp_path / "vocab.txt").read_text() == (SAMPLE_DIR / "vocab.txt").read_text()
    assert token_rows(out) == token_rows(SAMPLE_DIR / "cells.parquet")
    assert len(token_rows(out)) == 500


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(RECIPE_DIR / "preprocess.py"), str(tmp_path / "nope.h5ad"), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.h5ad'}: no such file"]
