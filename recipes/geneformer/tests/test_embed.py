"""embed.py: one float32 row per cell, in input order, with padding never pooled; h5ad and token inputs agree."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_DIR, tiny_bert

import embed
import export
from preprocess import preprocess

VOCAB = (SAMPLE_DIR / "vocab.txt").read_text().splitlines()


@pytest.fixture
def model_dir(tmp_path):
    return tiny_model(tmp_path, len(VOCAB))


def tiny_model(tmp_path, vocab_size: int):
    """A random 3-layer model exported as train.py does, without a vocab.txt (like a published folder)."""
    model = tiny_bert(vocab_size, layers=3, intermediate=48, positions=256, hidden_act="relu")
    export.export_final_model(model, model.state_dict(), tmp_path / "final_model")
    return tmp_path / "final_model"


def sample_cells(count: int) -> embed.Cells:
    table = pq.read_table(SAMPLE_DIR / "cells.parquet").slice(0, count)
    tokens = [np.asarray(c, dtype=np.int64) for c in table.column("input_ids").to_pylist()]
    return embed.Cells(tokens, table.column("cell_id").to_pylist(), "sample")


@pytest.mark.smoke
def test_a_cell_alone_equals_the_same_cell_in_a_padded_batch(model_dir):
    model = embed.load_model(model_dir)
    cells = sample_cells(12)
    short = min(range(12), key=lambda i: len(cells.tokens[i]))
    assert len(cells.tokens[short]) < max(len(t) for t in cells.tokens)  # so it is padded in the batch
    together = embed.embed_cells(model, cells, tokens_per_batch=10**6, special_ids=[0, 1], progress=False)
    alone = embed.embed_cells(
        model, embed.Cells([cells.tokens[short]], ["x"], "one"), special_ids=[0, 1], progress=False
    )
    np.testing.assert_allclose(together[short], alone[0], rtol=1e-5, atol=1e-6)
    assert together.dtype == np.float32 and together.shape == (12, 32)
    small_batches = embed.embed_cells(model, cells, tokens_per_batch=300, special_ids=[0, 1], progress=False)
    np.testing.assert_allclose(small_batches, together, rtol=1e-5, atol=1e-6)  # order kept across batches


def test_layers_differ_and_out_of_range_layers_are_refused(model_dir):
    model = embed.load_model(model_dir)
    cells = sample_cells(3)
    by_layer = [embed.embed_cells(model, cells, layer=layer, progress=False) for layer in (0, -2, -1, 3)]
    assert not np.allclose(by_layer[0], by_layer[1]) and not np.allclose(by_layer[1], by_layer[2])
    np.testing.assert_array_equal(by_layer[2], by_layer[3])  # -1 is the last of 3 layers
    with pytest.raises(embed.ConfigError, match="layers 0..3"):
        embed.embed_cells(model, cells, layer=4, progress=False)


def test_h5ad_and_its_tokenized_parquet_give_the_same_rows_and_ids(model_dir, tmp_path, capsys):
    from_tokens, from_h5ad = tmp_path / "tokens.npy", tmp_path / "h5ad.parquet"
    assert embed.main([str(model_dir), str(SAMPLE_DIR / "cells.parquet"), "--out", str(from_tokens)]) == 0
    args = ["--vocab", str(SAMPLE_DIR / "vocab.txt"), "--gene-medians", str(SAMPLE_DIR / "gene_medians.json")]
    h5ad = str(SAMPLE_DIR / "pbmc500_counts.h5ad")
    assert embed.main([str(model_dir), h5ad, "--out", str(from_h5ad), "--max-length", "256", *args]) == 0
    matrix, ids = np.load(from_tokens), (tmp_path / "tokens.ids.txt").read_text().splitlines()
    table = pq.read_table(from_h5ad)
    assert matrix.shape == (500, 32) and ids == pq.read_table(SAMPLE_DIR / "cells.parquet")["cell_id"].to_pylist()
    assert table["cell_id"].to_pylist() == ids
    np.testing.assert_allclose(np.stack(table["embedding"].to_numpy(zero_copy_only=False)), matrix, atol=1e-5)
    record = json.loads((tmp_path / "tokens.json").read_text())
    assert record["layer"] == -2 and record["pool"] == "mean" and record["shape"] == [500, 32]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []


def test_bad_inputs_are_one_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[5, 6], [7, 9999]], type=pa.list_(pa.int32()))}), bad)
    assert embed.main([str(model_dir), str(bad), "--out", str(tmp_path / "e.npy")]) == 1
    h5ad = str(SAMPLE_DIR / "pbmc500_counts.h5ad")
    assert embed.main([str(model_dir), h5ad, "--out", str(tmp_path / "e.npy")]) == 1
    assert (
        embed.main(
            [str(model_dir), str(SAMPLE_DIR / "cells.parquet"), "--out", str(tmp_path / "e.npy"), "--pool", "cls"]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {bad}: row 1 is empty or has a token id outside the model's vocabulary (767)",
        f"error: {h5ad}: an h5ad is tokenized here: give --vocab and --gene-medians",
        "error: --pool cls needs V2 cells (a vocabulary with <cls>) that all start with <cls>",
    ]
    assert not list(tmp_path.glob("e*")) and not list(tmp_path.glob(".tmp*"))


def test_parquet_folders_and_datasets_folders_read_like_one_parquet(tmp_path):
    table = pq.read_table(SAMPLE_DIR / "cells.parquet").slice(0, 10)
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 4), tmp_path / "parts" / "a.parquet")
    pq.write_table(table.slice(4), tmp_path / "parts" / "b.parquet")
    saved = tmp_path / "cells.dataset"  # the layout of datasets' save_to_disk: Arrow stream files + state.json
    saved.mkdir()
    with (
        pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as out,
    ):
        out.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    expected = embed.read_tokenized(SAMPLE_DIR / "cells.parquet", len(VOCAB))
    for path in (tmp_path / "parts", saved):
        cells = embed.read_tokenized(path, len(VOCAB))
        assert cells.ids == expected.ids[:10]
        assert all(np.array_equal(a, b) for a, b in zip(cells.tokens, expected.tokens[:10]))


def test_cls_pooling_of_v2_cells_takes_the_first_state_and_ignores_padding(model_dir, tmp_path, capsys):
    vocab = ["<pad>", "<mask>", "<cls>", "<eos>", *VOCAB[4:]]  # a V2 vocabulary of the model's size
    (tmp_path / "v2_vocab.txt").write_text("\n".join(vocab) + "\n")
    cells = sample_cells(6)
    v2 = [np.concatenate([[2], cell[: 40 + 10 * i], [3]]) for i, cell in enumerate(cells.tokens)]
    pq.write_table(
        pa.table({"input_ids": pa.array(v2, type=pa.list_(pa.int32())), "cell_id": cells.ids}), tmp_path / "v2.parquet"
    )
    args = [str(model_dir), str(tmp_path / "v2.parquet"), "--vocab", str(tmp_path / "v2_vocab.txt"), "--pool", "cls"]
    assert embed.main([*args, "--out", str(tmp_path / "cls.npy")]) == 0
    together = np.load(tmp_path / "cls.npy")
    model = embed.load_model(model_dir)
    alone = embed.embed_cells(model, embed.Cells(v2[:1], ["a"], "one"), pool="cls", progress=False)
    np.testing.assert_allclose(together[0], alone[0], rtol=1e-5, atol=1e-6)
    mean = embed.embed_cells(model, embed.Cells(v2, cells.ids, "v2"), special_ids=[0, 1, 2, 3], progress=False)
    assert not np.allclose(mean, together)


@pytest.fixture(scope="module")
def v2_corpus(tmp_path_factory):
    """The bundled cells tokenized V2-style (<cls> genes <eos>, 64 tokens), with preprocess.py's recorded metadata."""
    out = tmp_path_factory.mktemp("v2") / "corpus"
    preprocess(SAMPLE_DIR / "pbmc500_counts.h5ad", out, style="v2", max_length=64)
    return out


def test_v2_cells_without_vocab_leave_cls_and_eos_out_of_the_mean(v2_corpus, tmp_path):
    """Issue 18 item 7: the special ids come from the corpus' record when --vocab is not given."""
    vocab = (v2_corpus / "vocab.txt").read_text().splitlines()
    folder = tiny_model(tmp_path, len(vocab))
    cells = str(v2_corpus / "cells.parquet")
    assert embed.main([str(folder), cells, "--out", str(tmp_path / "plain.npy")]) == 0
    assert (
        embed.main([str(folder), cells, "--vocab", str(v2_corpus / "vocab.txt"), "--out", str(tmp_path / "v.npy")]) == 0
    )
    plain = np.load(tmp_path / "plain.npy")
    np.testing.assert_array_equal(plain, np.load(tmp_path / "v.npy"))
    record = json.loads((tmp_path / "plain.json").read_text())
    assert record["special_token_ids"] == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    # Reference: the mean of layer -2 over the gene positions alone (every cell is <cls> genes <eos>).
    model = embed.load_model(folder)
    tokens = embed.read_tokenized(cells, len(vocab)).tokens[:5]
    assert all(t[0] == 2 and t[-1] == 3 and (t[1:-1] > 3).all() for t in tokens)
    for row, cell in enumerate(tokens):
        input_ids = torch.from_numpy(cell)[None]
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        keep[0, 1:-1] = True
        with torch.no_grad():
            expected = embed.pooled_states(model, input_ids, torch.ones_like(input_ids), keep, 2, "mean")
        np.testing.assert_allclose(plain[row], expected[0].numpy(), rtol=1e-5, atol=1e-6)
    old_rule = embed.embed_cells(model, embed.read_tokenized(cells, len(vocab)), special_ids=[0, 1], progress=False)
    assert np.abs(old_rule - plain).max() > 1e-3  # averaging <cls>/<eos> in (the old default) is visibly different


def test_cells_that_record_no_vocabulary_or_another_one_are_refused(v2_corpus, tmp_path, capsys):
    vocab = (v2_corpus / "vocab.txt").read_text().splitlines()
    folder = tiny_model(tmp_path, len(vocab))
    table = pq.read_table(v2_corpus / "cells.parquet")
    pq.write_table(table.replace_schema_metadata(None), tmp_path / "bare.parquet")  # e.g. written by another tool
    swapped = vocab[:4] + [vocab[5], vocab[4]] + vocab[6:]  # same size and specials, two genes exchanged
    (tmp_path / "swapped.txt").write_text("\n".join(swapped) + "\n")
    out = ["--out", str(tmp_path / "e.npy")]
    assert embed.main([str(folder), str(tmp_path / "bare.parquet"), *out]) == 1
    assert (
        embed.main([str(folder), str(v2_corpus / "cells.parquet"), "--vocab", str(tmp_path / "swapped.txt"), *out]) == 1
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"error: {tmp_path / 'bare.parquet'}: these cells record no vocabulary")
    assert lines[0].endswith("give --vocab (the model's vocab.txt or token_dictionary.pkl)")
    assert lines[1].startswith(
        f"error: {v2_corpus / 'cells.parquet'} was tokenized with another vocabulary (769 tokens"
    )
    assert not list(tmp_path.glob("e.*"))
    # the bare cells with --vocab are fine
    assert embed.main([str(folder), str(tmp_path / "bare.parquet"), "--vocab", str(v2_corpus / "vocab.txt"), *out]) == 0
