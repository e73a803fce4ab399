"""Every corpus knows what made it: vocabulary fingerprints, gene ids that miss the vocabulary, the original
tokenizer's input conventions, and the published pickled dictionaries (loaded without running their code)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import SAMPLE_DIR, tiny_overrides

import train
from data import CACHE_ENV, CorpusWarning, check_corpus_fingerprint
from preprocess import DataError, preprocess
from preprocess import main as preprocess_main

CASES = Path(__file__).resolve().parent / "data"  # copies of ../shared/cases/geneformer_versioned_ids


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def token_rows(path):
    return pq.read_table(path).column("input_ids").to_pylist()


@pytest.fixture(scope="module")
def v1_v2(tmp_path_factory):
    """The bundled counts tokenized as v1 (767 tokens) and v2 (769 tokens)."""
    root = tmp_path_factory.mktemp("styles")
    for style in ("v1", "v2"):
        preprocess(SAMPLE_DIR / "pbmc500_counts.h5ad", root / style, style=style, max_length=256)
    return root


def test_fingerprint_refuses_another_vocabulary(v1_v2):
    with pytest.raises(DataError) as error:
        check_corpus_fingerprint(v1_v2 / "v1" / "cells.parquet", v1_v2 / "v2" / "vocab.txt")
    message = str(error.value)
    assert "\n" not in message
    assert str(v1_v2 / "v1" / "vocab.txt") in message and str(v1_v2 / "v2" / "vocab.txt") in message
    record = check_corpus_fingerprint(v1_v2 / "v2" / "cells.parquet", v1_v2 / "v2" / "vocab.txt")
    assert record["style"] == "v2" and record["cells"] == 500 and record["max_length"] == 256
    assert record["id_dtype"] == "uint16" and record["special_token_ids"] == {
        "<pad>": 0,
        "<mask>": 1,
        "<cls>": 2,
        "<eos>": 3,
    }
    shard = next((v1_v2 / "v2" / "cells.parquet").glob("*.parquet"))
    assert check_corpus_fingerprint(shard, v1_v2 / "v2" / "vocab.txt")["cells"] == 500  # one shard alone


def test_train_refuses_a_corpus_of_another_vocabulary_in_one_line(v1_v2, tmp_path, capsys):
    overrides = tiny_overrides(tmp_path / "run") + [
        f"data.train_path={v1_v2 / 'v1' / 'cells.parquet'}",
        f"data.vocab_path={v1_v2 / 'v2' / 'vocab.txt'}",
    ]
    assert train.main(overrides) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "was tokenized with the vocabulary" in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_fingerprint_mixed_shards_and_old_outputs(v1_v2, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for style in ("v1", "v2"):
        shard = next((v1_v2 / style / "cells.parquet").glob("*.parquet"))
        (mixed / f"{style}.parquet").write_bytes(shard.read_bytes())
    with pytest.raises(DataError, match=r"shards v1.parquet and v2.parquet come from different corpora \(\["):
        check_corpus_fingerprint(mixed, v1_v2 / "v1" / "vocab.txt")
    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[2, 3]], type=pa.list_(pa.int32()))}), old)
    with pytest.warns(CorpusWarning, match="no preprocessing metadata"):
        assert check_corpus_fingerprint(old, v1_v2 / "v1" / "vocab.txt") == {}
    (mixed / "v2.parquet").unlink()
    pq.write_table(pa.table({"input_ids": pa.array([[2, 3]], type=pa.list_(pa.int32()))}), mixed / "v3.parquet")
    with pytest.raises(DataError, match="shard v3.parquet has no preprocessing metadata but others do"):
        check_corpus_fingerprint(mixed, v1_v2 / "v1" / "vocab.txt")


def test_recorded_metadata(v1_v2):
    metadata = json.loads((v1_v2 / "v1" / "metadata.json").read_text())
    vocab_bytes = (v1_v2 / "v1" / "vocab.txt").read_bytes()
    import hashlib

    assert metadata["vocab_sha256"] == hashlib.sha256(vocab_bytes).hexdigest()
    assert (
        metadata["gene_medians_sha256"] == hashlib.sha256((v1_v2 / "v1" / "gene_medians.json").read_bytes()).hexdigest()
    )
    assert metadata["cells"] == 500 and metadata["tokens"] == sum(
        len(r) for r in token_rows(v1_v2 / "v1" / "cells.parquet")
    )
    assert (metadata["style"], metadata["max_length"], metadata["format_version"]) == ("v1", 256, 2)


# ---- gene ids outside the vocabulary ----------------------------------------------------------------------------


def test_versioned_ensembl_ids_map_to_the_unversioned_vocabulary(tmp_path, caplog):
    """corpus_b carries `.7` on 10 of its 20 genes: stripped by default, it tokenizes exactly like corpus_a."""
    reference = preprocess(CASES / "corpus_a.csv", tmp_path / "a")
    given = (tmp_path / "a" / "vocab.txt", tmp_path / "a" / "gene_medians.json")
    for case in ("corpus_b_half_versioned.csv", "corpus_c_all_versioned.csv"):
        out = preprocess(CASES / case, tmp_path / case, *given)
        assert token_rows(out) == token_rows(reference)
    lengths = [len(r) for r in token_rows(reference)]
    assert np.mean(lengths) == pytest.approx(19.0, abs=0.6)  # not the 9.5 of a silently halved vocabulary

    with pytest.raises(DataError, match=r"corpus_b_half_versioned.csv: 51.4% of counts are in genes outside"):
        preprocess(CASES / "corpus_b_half_versioned.csv", tmp_path / "x", *given, keep_version=True)
    caplog.clear()  # the refused run above logs the same report when an earlier test left the logger at INFO
    with caplog.at_level(logging.INFO, logger="geneformer.preprocess"):
        kept = preprocess(
            CASES / "corpus_b_half_versioned.csv",
            tmp_path / "kept",
            *given,
            keep_version=True,
            max_unmapped_fraction=0.6,
        )
    report = [r.getMessage() for r in caplog.records if "not in the vocabulary" in r.getMessage()]
    assert len(report) == 1 and "10 of 20 genes (51.4% of counts)" in report[0], report
    fraction = json.loads((tmp_path / "kept" / "metadata.json").read_text())["inputs"][0]["unmapped_count_fraction"]
    assert fraction == pytest.approx(0.514, abs=0.001)
    assert np.mean([len(r) for r in token_rows(kept)]) < 10.5
    assert not (tmp_path / "x").exists()


def test_all_versioned_with_keep_version_is_a_one_line_error(tmp_path, capsys):
    preprocess(CASES / "corpus_a.csv", tmp_path / "a")
    code = preprocess_main(
        [str(CASES / "corpus_c_all_versioned.csv"), "--out-dir", str(tmp_path / "c"), "--keep-version"]
        + ["--vocab", str(tmp_path / "a" / "vocab.txt"), "--gene-medians", str(tmp_path / "a" / "gene_medians.json")]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: ") and "none of the genes is in the vocabulary" in lines[-1]
    assert not (tmp_path / "c").exists()


# ---- the original tokenizer's input conventions ----------------------------------------------------------------


def original_layout_h5ad(path):
    """5 cells x 5 genes laid out as the original Geneformer tokenizer expects (var['ensembl_id'], obs['n_counts'],
    obs['filter_pass']), with a repeated id in another case, a versioned id and a cell without counts."""
    counts = np.array(
        [
            [1, 3, 8, 2, 0],  # c0  n_counts 10,000
            [4, 0, 4, 0, 0],  # c1  n_counts 20,000
            [9, 9, 9, 9, 9],  # c2  filter_pass 0: removed
            [0, 0, 0, 0, 0],  # c3  no counts: dropped with a warning
            [0, 0, 0, 0, 6],  # c4  n_counts 5,000
        ],
        dtype=np.float32,
    )
    obs = pd.DataFrame(
        {"n_counts": [10_000.0, 20_000.0, 10_000.0, 10_000.0, 5_000.0], "filter_pass": [1, 1, 0, 1, 1]},
        index=[f"c{i}" for i in range(5)],
    )
    ensembl = ["ENSG00000000001", "ENSG00000000002.3", "ENSG00000000003", "ensg00000000001", "ENSG00000000004"]
    var = pd.DataFrame({"ensembl_id": ensembl}, index=["A", "B", "C", "A_dup", "D"])
    anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var).write_h5ad(path)
    return path


def test_original_layout_matches_hand_computed_tokens(tmp_path, caplog):
    """Columns 1 and 4 are one gene (summed); values are count / n_counts x 10,000:
        c0: g1 3, g2 3, g3 8      c1: g1 2, g3 2      c4: g4 12
    non-zero medians: g1 2.5, g2 3, g3 5, g4 12 (row sums instead of n_counts would give others)
    scores: c0 g3 1.6 > g1 1.2 > g2 1.0; c1 g1 0.8 > g3 0.4; c4 g4 1.0. Ids: g1 2, g2 3, g3 4, g4 5."""
    with caplog.at_level(logging.INFO, logger="geneformer.preprocess"):
        out = preprocess(original_layout_h5ad(tmp_path / "original.h5ad"), tmp_path / "out", cells_per_shard=2)
    vocab = (tmp_path / "out" / "vocab.txt").read_text().split()
    assert vocab == ["<pad>", "<mask>", "ENSG00000000001", "ENSG00000000002", "ENSG00000000003", "ENSG00000000004"]
    medians = json.loads((tmp_path / "out" / "gene_medians.json").read_text())
    assert medians == pytest.approx({vocab[2]: 2.5, vocab[3]: 3.0, vocab[4]: 5.0, vocab[5]: 12.0})
    assert token_rows(out) == [[4, 2, 3], [2, 4], [5]]
    assert pq.read_table(out).column("cell_id").to_pylist() == ["c0", "c1", "c4"]
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "summed the counts of 1 repeated gene ids" in messages
    assert "dropped 1 of 5 cells that express no gene" in messages
    assert "filter_pass == 1, dropped 1" in messages


def test_n_counts_that_is_not_positive_is_refused(tmp_path):
    path = original_layout_h5ad(tmp_path / "original.h5ad")
    adata = anndata.read_h5ad(path)
    adata.obs.loc["c1", "n_counts"] = 0.0
    adata.write_h5ad(path)
    with pytest.raises(DataError, match=r"original.h5ad: cell 'c1' has n_counts 0.0; it must be positive"):
        preprocess(path, tmp_path / "out")


# ---- published pickled dictionaries --------------------------------------------------------------------------


def test_pickled_dictionaries_with_numpy_scalars(tmp_path):
    """token_dictionary.pkl / gene_median_dictionary.pkl as the published models ship them."""
    vocab = (SAMPLE_DIR / "vocab.txt").read_text().split()
    medians = json.loads((SAMPLE_DIR / "gene_medians.json").read_text())
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps({t: np.int64(i) for i, t in enumerate(vocab)}))
    (tmp_path / "medians.pkl").write_bytes(pickle.dumps({g: np.float64(m) for g, m in medians.items()}))
    counts = SAMPLE_DIR / "pbmc500_counts.h5ad"
    code = preprocess_main(
        [str(counts), "--out-dir", str(tmp_path / "out"), "--token-dictionary", str(tmp_path / "tokens.pkl")]
        + ["--gene-median-dictionary", str(tmp_path / "medians.pkl")]
    )
    assert code == 0
    assert token_rows(tmp_path / "out" / "cells.parquet") == token_rows(SAMPLE_DIR / "cells.parquet")
    assert (tmp_path / "out" / "vocab.txt").read_text() == (SAMPLE_DIR / "vocab.txt").read_text()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("flag", ["--token-dictionary", "--gene-median-dictionary", "--vocab"])
def test_malicious_pickle_is_refused_without_running(tmp_path, capsys, flag):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": _Exploit(marker)}))
    code = preprocess_main(
        [str(SAMPLE_DIR / "pbmc500_counts.h5ad"), "--out-dir", str(tmp_path / "out"), flag, str(evil)]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and not marker.exists()
    assert len(lines) == 1 and f"{evil}: not a usable" in lines[0] and "refused to load posix.system" in lines[0]
    assert not (tmp_path / "out").exists()


def test_pickle_of_the_wrong_shape_is_refused(tmp_path):
    from dictionaries import read_gene_medians, read_vocab

    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="must hold a dict, not list"):
        read_gene_medians(tmp_path / "list.pkl")
    (tmp_path / "gap.pkl").write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "G": 3}))
    with pytest.raises(DataError, match=r"token ids are not 0..2 \(id 2 is missing\)"):
        read_vocab(tmp_path / "gap.pkl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading a float32 median needs no other global than numpy's scalar
        (tmp_path / "f32.pkl").write_bytes(pickle.dumps({"G": np.float32(2.5)}))
        assert read_gene_medians(tmp_path / "f32.pkl") == {"G": 2.5}
