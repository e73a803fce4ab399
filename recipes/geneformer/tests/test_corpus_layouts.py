"""Input layouts of preprocess.py (many files, directories, globs, backed h5ad in blocks, loom) and of training data
(parquet file, parquet shard directory, Hugging Face `datasets` folder), all read back token for token."""

from __future__ import annotations

import filecmp
from pathlib import Path

import anndata
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import SAMPLE_DIR

from data import CACHE_ENV, CellDataset
from preprocess import main as preprocess_main
from preprocess import preprocess


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def token_rows(path):
    return pq.read_table(path).column("input_ids").to_pylist()


def split_sample(directory, pieces=3):
    """The bundled 500 PBMCs as `pieces` h5ad files in `directory` (cell order kept across the sorted names)."""
    whole = anndata.read_h5ad(SAMPLE_DIR / "pbmc500_counts.h5ad")
    directory.mkdir()
    bounds = np.linspace(0, whole.n_obs, pieces + 1).astype(int)
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        whole[start:stop].copy().write_h5ad(directory / f"part_{i}.h5ad")
    return directory


def test_many_h5ad_files_read_in_blocks_equal_the_whole_file(tmp_path):
    """Medians over three files read 64 rows at a time are those of the one file; the tokens and vocabulary too."""
    split = split_sample(tmp_path / "split")
    out = preprocess(split, tmp_path / "out", cells_per_shard=64)
    assert (tmp_path / "out" / "vocab.txt").read_text() == (SAMPLE_DIR / "vocab.txt").read_text()
    assert (tmp_path / "out" / "gene_medians.json").read_text() == (SAMPLE_DIR / "gene_medians.json").read_text()
    assert token_rows(out) == token_rows(SAMPLE_DIR / "cells.parquet")
    assert len(list(out.glob("*.parquet"))) == 9  # 167/167/166 cells in blocks of 64: 3 shards per file
    schema = pq.read_schema(next(out.glob("*.parquet")))
    assert schema.field("input_ids").type == pa.list_(pa.uint16())  # 767 tokens fit in 16 bits
    glob_out = preprocess(str(split / "part_*.h5ad"), tmp_path / "glob")
    assert token_rows(glob_out) == token_rows(out)


@pytest.mark.slow
def test_num_proc_two_and_three_write_identical_files(tmp_path):
    """Medians pass and tokenizing pass on 1, 2 and 3 processes (this one and 0-2 workers claiming blocks)."""
    split = split_sample(tmp_path / "split")
    for n in (1, 2, 3):
        code = preprocess_main(
            [str(split), "--out-dir", str(tmp_path / f"p{n}"), "--num_proc", str(n)] + ["--cells-per-shard", "100"]
        )
        assert code == 0
    shards = sorted(p.name for p in (tmp_path / "p1" / "cells.parquet").iterdir())
    assert len(shards) == 6
    for n in (2, 3):
        compare = filecmp.dircmp(tmp_path / "p1", tmp_path / f"p{n}")
        assert not compare.diff_files and not compare.left_only and not compare.right_only
        for name in shards:
            assert filecmp.cmp(
                tmp_path / "p1" / "cells.parquet" / name, tmp_path / f"p{n}" / "cells.parquet" / name, False
            )
    assert token_rows(tmp_path / "p2" / "cells.parquet") == token_rows(SAMPLE_DIR / "cells.parquet")


@pytest.mark.slow
def test_num_proc_two_reports_the_first_bad_block_like_one_process(tmp_path, capsys):
    """A bad n_counts in the second and third files (found when a block is tokenized): both process counts name the
    first bad cell in input order."""
    split = split_sample(tmp_path / "split")
    for part, row in ((1, 150), (2, 3)):
        adata = anndata.read_h5ad(split / f"part_{part}.h5ad")
        adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)
        adata.obs.iloc[row, adata.obs.columns.get_loc("n_counts")] = 0.0
        adata.write_h5ad(split / f"part_{part}.h5ad")
    args = ["--vocab", str(SAMPLE_DIR / "vocab.txt"), "--gene-medians", str(SAMPLE_DIR / "gene_medians.json")]
    errors = []
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        assert (
            preprocess_main([str(split), "--out-dir", str(out), "--num_proc", str(n), "--cells-per-shard", "50", *args])
            == 1
        )
        errors.append(capsys.readouterr().err.strip().splitlines())
        assert not out.exists() and not list(tmp_path.glob(".p*"))
    bad_cell = anndata.read_h5ad(split / "part_1.h5ad").obs_names[150]
    assert (
        errors[0]
        == errors[1]
        == [f"error: {split / 'part_1.h5ad'}: cell {bad_cell!r} has n_counts 0.0; it must be positive"]
    )


def write_loom(path, counts, gene_ids, cell_ids):
    """The loom layout (genes x cells matrix, row and column attributes), written with h5py."""
    with h5py.File(path, "w") as handle:
        handle["matrix"] = np.asarray(counts).T
        handle.create_group("row_attrs")["ensembl_id"] = np.array(gene_ids, dtype="S")
        handle.create_group("col_attrs")["CellID"] = np.array(cell_ids, dtype="S")
        handle.create_group("layers")


def test_loom_file_equals_h5ad(tmp_path):
    whole = anndata.read_h5ad(SAMPLE_DIR / "pbmc500_counts.h5ad")[:40]
    write_loom(tmp_path / "cells.loom", whole.X.toarray(), list(whole.var_names), list(whole.obs_names))
    out = preprocess(
        tmp_path / "cells.loom", tmp_path / "out", SAMPLE_DIR / "vocab.txt", SAMPLE_DIR / "gene_medians.json"
    )
    assert token_rows(out) == token_rows(SAMPLE_DIR / "cells.parquet")[:40]
    assert pq.read_table(out).column("cell_id").to_pylist() == list(whole.obs_names)


def test_dataset_reads_a_shard_directory_and_caches_once(tmp_path):
    out = preprocess(SAMPLE_DIR / "pbmc500_counts.h5ad", tmp_path / "out", cells_per_shard=128)
    dataset = CellDataset(out, vocab_size=767, max_length=4096)
    expected = token_rows(SAMPLE_DIR / "cells.parquet")
    assert len(dataset) == 500 and [dataset[i].tolist() for i in (0, 127, 128, 499)] == [
        expected[i] for i in (0, 127, 128, 499)
    ]
    assert dataset[5].dtype == np.uint16
    assert len(CellDataset(tmp_path / "out", 767, 4096)) == 500  # --out-dir stands for its cells.parquet/
    cached = sorted((tmp_path / "cache").glob("*.arrow"))
    assert len(cached) == 1
    maps = Path("/proc/self/maps")
    if maps.is_file():  # Linux: the token ids are pages of the cache file, not a copy in this process
        assert str(cached[0].resolve()) in maps.read_text()
    before = cached[0].stat().st_mtime_ns
    assert CellDataset(out, 767, 100)[3].tolist() == expected[3][:100]
    assert cached[0].stat().st_mtime_ns == before, "a second open maps the cache, it does not rebuild it"
    shard = sorted(out.glob("*.parquet"))[0]
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 100), shard)  # a changed shard gets a new cache entry
    assert len(CellDataset(out, 767, 100)) == 472


def test_dataset_reads_a_hugging_face_datasets_folder(tmp_path):
    """The layout the original Geneformer tokenizer writes: save_to_disk, int64 `input_ids`, a `length` column."""
    datasets = pytest.importorskip("datasets")
    cells = [[5, 9, 7], [8] * 40, [6, 5]]
    folder = tmp_path / "corpus.dataset"
    datasets.Dataset.from_dict({"input_ids": cells, "length": [len(c) for c in cells]}).save_to_disk(folder)
    dataset = CellDataset(folder, vocab_size=10, max_length=16)
    assert [dataset[i].tolist() for i in range(3)] == [cells[0], cells[1][:16], cells[2]]
    assert dataset.num_truncated == 1
    with pytest.raises(
        Exception, match=r"data-00000-of-00001.arrow: row 0 has token id 9 outside the vocabulary \(size 8\)"
    ):
        CellDataset(folder, vocab_size=8, max_length=16)


def test_sparse_h5ad_in_raw_read_in_blocks(tmp_path):
    """Counts in raw.X (X log-normalised) are found and read block by block."""
    whole = anndata.read_h5ad(SAMPLE_DIR / "pbmc500_counts.h5ad")[:30].copy()
    counts = sp.csr_matrix(whole.X)
    whole.raw = whole
    whole.X = np.log1p(counts.toarray())
    whole.write_h5ad(tmp_path / "raw.h5ad")
    out = preprocess(
        tmp_path / "raw.h5ad",
        tmp_path / "out",
        SAMPLE_DIR / "vocab.txt",
        SAMPLE_DIR / "gene_medians.json",
        cells_per_shard=7,
    )
    assert token_rows(out) == token_rows(SAMPLE_DIR / "cells.parquet")[:30]
