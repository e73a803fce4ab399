"""Rank-value tokenizer against a hand-computed example, real-data rebuild, and bad inputs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import RECIPE_DIR, SAMPLE_DIR

from preprocess import DataError, preprocess, tokenize_file
from preprocess import main as preprocess_main

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


def test_empty_cell_is_dropped_with_a_warning_and_bad_tables(tmp_path, caplog):
    """As in the original tokenizer, a cell without any vocabulary gene is dropped and the drop is reported."""
    empty = COUNTS.copy()
    empty.loc[1, ["A", "B", "C", "D"]] = 0
    empty.to_csv(tmp_path / "empty.csv", index=False)
    with caplog.at_level(logging.INFO, logger="geneformer.preprocess"):
        out = preprocess(tmp_path / "empty.csv", tmp_path / "kept")
    assert pq.read_table(out).column("cell_id").to_pylist() == ["c1", "c3"]
    assert any("dropped 1 of 3 cells that express no gene" in r.getMessage() for r in caplog.records)
    empty.loc[[0, 2], ["A", "B", "C", "D"]] = 0
    empty.to_csv(tmp_path / "all_empty.csv", index=False)
    with pytest.raises(DataError, match="no cell expresses a gene of the vocabulary"):
        preprocess(
            tmp_path / "all_empty.csv",
            tmp_path / "out",
            tmp_path / "kept" / "vocab.txt",
            tmp_path / "kept" / "gene_medians.json",
        )
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


def test_tokenize_file_in_memory_equals_the_written_corpus():
    vocab = (SAMPLE_DIR / "vocab.txt").read_text().split()
    medians = json.loads((SAMPLE_DIR / "gene_medians.json").read_text())  # pandas would round the floats
    cells, ids = tokenize_file(SAMPLE_DIR / "pbmc500_counts.h5ad", vocab, medians, 2048, "v1")
    assert [c.tolist() for c in cells] == token_rows(SAMPLE_DIR / "cells.parquet")
    assert ids == pq.read_table(SAMPLE_DIR / "cells.parquet").column("cell_id").to_pylist()


def test_cli_error_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(RECIPE_DIR / "preprocess.py"), str(tmp_path / "nope.h5ad"), "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.h5ad'}: no such file"]


def test_missing_csv_value_names_the_cell(tmp_path):
    (tmp_path / "short.csv").write_text("cell_id,A,B,C,D\nc1,4,2,0,4\nc2,1,1,8\n")  # c2 lacks its D value
    with pytest.raises(DataError, match=r"short.csv: cell 'c2', gene 'D' has no value"):
        preprocess(tmp_path / "short.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_repeated_gene_in_a_csv_header_is_summed(tmp_path, caplog):
    """The original tokenizer sums the counts of a repeated gene id (pandas alone would rename it A.1)."""
    (tmp_path / "dup.csv").write_text("cell_id,A,B,a\nc1,4,2,1\nc2,1,1,8\n")  # ids are compared upper-cased
    (tmp_path / "summed.csv").write_text("cell_id,A,B\nc1,5,2\nc2,9,1\n")
    with caplog.at_level(logging.INFO, logger="geneformer.preprocess"):
        out = preprocess(tmp_path / "dup.csv", tmp_path / "out")
    assert any("summed the counts of 1 repeated gene ids" in r.getMessage() for r in caplog.records)
    assert token_rows(out) == token_rows(preprocess(tmp_path / "summed.csv", tmp_path / "reference"))
    assert (tmp_path / "out" / "vocab.txt").read_text() == (tmp_path / "reference" / "vocab.txt").read_text()


def test_pandas_index_column_is_refused(tmp_path):
    COUNTS.drop(columns="cell_id").to_csv(tmp_path / "with_index.csv")  # pandas' default writes the index too
    with pytest.raises(DataError, match=r"with_index.csv: column 'Unnamed: 0' has no header.*index=False"):
        preprocess(tmp_path / "with_index.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("style", "max_length", "message"),
    [("v1", 0, "--max-length 0 is too small: style v1 needs at least 1"), ("v2", 2, "style v2 needs at least 3")],
)
def test_max_length_too_small_is_refused(tmp_path, style, max_length, message):
    COUNTS.to_csv(tmp_path / "counts.csv", index=False)
    with pytest.raises(DataError, match=message):
        preprocess(tmp_path / "counts.csv", tmp_path / "out", max_length=max_length, style=style)
    assert not (tmp_path / "out").exists()
    out = preprocess(tmp_path / "counts.csv", tmp_path / "out", max_length=max_length + 1, style=style)
    assert all(len(cell) == max_length + 1 for cell in token_rows(out))


def write_bad_counts(tmp_path, case):
    """A few unusable count files, as users produce them."""
    if case == "empty.csv":
        (tmp_path / case).write_text("")
    elif case == "text.parquet":
        (tmp_path / case).write_text("cell_id,A\nc1,3\n")
    elif case == "corrupt.h5ad":
        (tmp_path / case).write_bytes(b"\x89HDF\r\n\x1a\n" + b"junk" * 100)
    elif case == "header_only.csv":
        (tmp_path / case).write_text("cell_id,A,B\n")
    elif case == "short.csv":
        (tmp_path / case).write_text("cell_id,A,B\nc1,1,2\nc2,3\n")
    elif case == "with_index.csv":
        COUNTS.to_csv(tmp_path / case)
    return tmp_path / case


@pytest.mark.parametrize(
    ("case", "args", "message"),
    [
        ("empty.csv", [], "empty.csv: not a readable csv file (No columns to parse from file)"),
        ("text.parquet", [], "text.parquet: not a readable parquet file ("),
        ("corrupt.h5ad", [], "corrupt.h5ad: not a readable h5ad file ("),
        ("header_only.csv", [], "header_only.csv: no cells or no genes (0 x 2)"),
        ("short.csv", [], "short.csv: cell 'c2', gene 'B' has no value"),
        ("with_index.csv", [], "with_index.csv: column 'Unnamed: 0' has no header"),
        ("short.csv", ["--max-length", "0"], "--max-length 0 is too small"),
        ("short.csv", ["--style", "v2", "--max-length", "2"], "--max-length 2 is too small: style v2"),
    ],
)
def test_cli_bad_counts_are_one_line_errors_and_write_nothing(tmp_path, capsys, case, args, message):
    path = write_bad_counts(tmp_path, case)
    code = preprocess_main([str(path), "--out-dir", str(tmp_path / "out"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in lines[0]
    assert not (tmp_path / "out").exists()
