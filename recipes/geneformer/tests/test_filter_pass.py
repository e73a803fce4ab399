"""`filter_pass` in every encoding users write (issue 18 item 4): the same cells kept from h5ad, loom, parquet and
CSV; values that are not a yes/no flag refused in one line naming the column, the file and the values."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE_DIR
from test_corpus_layouts import write_loom

from preprocess import main as preprocess_main
from preprocess import preprocess
from readers import DataError, filter_mask

N_CELLS, N_PASS = 200, 150
# 150 of the first 200 bundled PBMC cells pass: every fourth cell fails (not a prefix, so row order is checked too)
PASS = np.arange(N_CELLS) % 4 != 3
DICTIONARIES = (SAMPLE_DIR / "vocab.txt", SAMPLE_DIR / "gene_medians.json")

H5AD_ENCODINGS = {
    "categorical 1/0": pd.Categorical(np.where(PASS, "1", "0")),
    "categorical True/False": pd.Categorical(np.where(PASS, "True", "False")),
    "strings true/false": np.where(PASS, "true", "false").astype(object),
    "strings yes/no": np.where(PASS, "yes", "no").astype(object),
    "bool": PASS,
    "nullable boolean": pd.array(PASS, dtype="boolean"),
    "int": PASS.astype(np.int64),
    "nullable Int64": pd.array(PASS.astype(int), dtype="Int64"),
    "float": PASS.astype(np.float64),
}


@pytest.fixture(scope="module")
def first_cells():
    return anndata.read_h5ad(SAMPLE_DIR / "pbmc500_counts.h5ad")[:N_CELLS].copy()


@pytest.fixture(scope="module")
def expected(first_cells, tmp_path_factory):
    """The 150 passing cells written alone, without a filter_pass column."""
    folder = tmp_path_factory.mktemp("reference")
    first_cells[PASS].copy().write_h5ad(folder / "passing.h5ad")
    out = preprocess(folder / "passing.h5ad", folder / "out", *DICTIONARIES)
    table = pq.read_table(out)
    assert table.num_rows == N_PASS
    return table.column("cell_id").to_pylist(), table.column("input_ids").to_pylist()


def check_kept(out, expected):
    table = pq.read_table(out)
    assert (table.column("cell_id").to_pylist(), table.column("input_ids").to_pylist()) == expected


@pytest.mark.parametrize("encoding", list(H5AD_ENCODINGS))
def test_h5ad_filter_pass_encodings_keep_the_same_cells(first_cells, expected, tmp_path, encoding):
    adata = first_cells.copy()
    adata.obs["filter_pass"] = H5AD_ENCODINGS[encoding]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    check_kept(preprocess(tmp_path / "cells.h5ad", tmp_path / "out", *DICTIONARIES), expected)


@pytest.mark.parametrize("flags", [PASS.astype(np.int64), PASS, np.where(PASS, b"True", b"False")])
def test_loom_filter_pass_encodings(first_cells, expected, tmp_path, flags):
    path = tmp_path / "cells.loom"
    write_loom(path, first_cells.X.toarray(), list(first_cells.var_names), list(first_cells.obs_names))
    with __import__("h5py").File(path, "a") as handle:
        handle["col_attrs"]["filter_pass"] = flags
    check_kept(preprocess(path, tmp_path / "out", *DICTIONARIES), expected)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize("flags", [PASS.astype(int), np.where(PASS, "True", "False"), np.where(PASS, "1", "0")])
def test_table_filter_pass_column_is_a_flag_not_a_gene(first_cells, expected, tmp_path, suffix, flags):
    frame = pd.DataFrame(first_cells.X.toarray(), columns=list(first_cells.var_names))
    frame.insert(0, "cell_id", list(first_cells.obs_names))
    frame["filter_pass"] = flags
    path = tmp_path / f"cells{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path, index=False)
    check_kept(preprocess(path, tmp_path / "out", *DICTIONARIES), expected)
    # without given dictionaries the built vocabulary holds genes only
    preprocess(path, tmp_path / "built")
    assert "filter_pass" not in (tmp_path / "built" / "vocab.txt").read_text().split()


@pytest.mark.parametrize(
    ("flags", "shown"),
    [
        (np.where(PASS, "1", "maybe").astype(object), "'1', 'maybe'"),
        (np.where(PASS, 1.0, np.nan), "1.0, nan"),
        (np.where(PASS, 1, 2), "1, 2"),
    ],
)
def test_unknown_filter_pass_values_are_one_line_errors(first_cells, tmp_path, capsys, flags, shown):
    adata = first_cells.copy()
    adata.obs["filter_pass"] = flags
    adata.write_h5ad(tmp_path / "cells.h5ad")
    code = preprocess_main([str(tmp_path / "cells.h5ad"), "--out-dir", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {tmp_path / 'cells.h5ad'}: filter_pass holds values other than 1/0")
    assert f"(found {shown})" in lines[0]
    assert not (tmp_path / "out").exists()


def test_filter_mask_words():
    values = ["1", "0", "TRUE", "false", " yes ", "No", "t", "F", b"1", True, 0, 1.0]
    assert filter_mask(values, "x").tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1]
    with pytest.raises(DataError, match=r"x: filter_pass holds values .* \(found '1', ''\)"):
        filter_mask(["1", ""], "x")
