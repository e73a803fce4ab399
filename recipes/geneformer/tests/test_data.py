"""Masking statistics, dataset validation and the rank-sharded, resumable order."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SAMPLE_DIR

from data import CellDataset, MaskingCollator, epoch_order, iterate_batches
from model import IGNORE_INDEX
from preprocess import DataError, read_vocab

VOCAB = ["<pad>", "<mask>", "<cls>", "<eos>"] + [f"G{i}" for i in range(996)]


def write_cells(path, cells, column="input_ids"):
    pq.write_table(pa.table({column: pa.array(cells, type=pa.list_(pa.int32()))}), path)
    return path


def test_masking_statistics():
    rng = np.random.default_rng(0)
    cells = [np.concatenate([[2], rng.integers(4, 1000, size=n), [3]]) for n in rng.integers(50, 400, size=400)]
    batch = MaskingCollator(VOCAB, generator=torch.Generator().manual_seed(1))(cells)
    original = torch.full_like(batch["input_ids"], 0)
    for row, cell in enumerate(cells):
        original[row, : len(cell)] = torch.from_numpy(cell)
    chosen = batch["labels"] != IGNORE_INDEX
    genes = original >= 4
    assert not chosen[~genes].any(), "special tokens and padding are never chosen"
    assert torch.equal(batch["labels"][chosen], original[chosen])
    assert torch.equal(batch["attention_mask"].bool(), original != 0)
    assert chosen.sum() / genes.sum() == pytest.approx(0.15, abs=0.005)
    masked = (batch["input_ids"] == 1) & chosen
    kept = (batch["input_ids"] == original) & chosen
    n = chosen.sum().item()
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.01)
    # "random gene" sometimes draws the original gene, so kept is slightly above 10%
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / 996, abs=0.01)
    assert (batch["input_ids"][chosen & ~masked & ~kept] >= 4).all(), "random replacements are genes"
    assert batch["input_ids"].shape[1] % 16 == 0
    assert torch.equal(batch["input_ids"][~genes & (original != 0)], original[~genes & (original != 0)])


def test_every_batch_has_a_prediction_target():
    collator = MaskingCollator(VOCAB, generator=torch.Generator().manual_seed(0))
    for _ in range(50):
        batch = collator([np.array([2, 7, 3])])  # <cls> one gene <eos>: chosen only 15% of the time by chance
        assert (batch["labels"] != IGNORE_INDEX).sum() >= 1
        assert batch["labels"][0, 0] == IGNORE_INDEX and batch["labels"][0, 2] == IGNORE_INDEX


def test_masking_is_reproducible_from_generator_state():
    cells = [np.arange(4, 300)] * 8
    collator = MaskingCollator(VOCAB, generator=torch.Generator().manual_seed(5))
    collator(cells)
    state = collator.generator.get_state()
    second = collator(cells)
    collator.generator.set_state(state)
    assert torch.equal(collator(cells)["input_ids"], second["input_ids"])


def test_dataset_reads_sample_and_truncates():
    vocab = read_vocab(SAMPLE_DIR / "vocab.txt")
    dataset = CellDataset(SAMPLE_DIR / "cells.parquet", len(vocab), max_length=100)
    full = pq.read_table(SAMPLE_DIR / "cells.parquet").column("input_ids").to_pylist()
    assert len(dataset) == 500
    assert dataset[7].tolist() == full[7][:100]
    assert dataset.lengths().max() == 100


@pytest.mark.parametrize(
    ("cells", "column", "message"),
    [
        ([[5, 6], [7, 2000]], "input_ids", r"row 1 has token id 2000 outside the vocabulary \(size 1000\)"),
        ([[5, 6], []], "input_ids", "cell at row 1 has no tokens"),
        ([[5, 6]], "tokens", "no 'input_ids' column"),
    ],
)
def test_dataset_rejects_bad_files(tmp_path, cells, column, message):
    path = write_cells(tmp_path / "cells.parquet", cells, column)
    with pytest.raises(DataError, match=message):
        CellDataset(path, vocab_size=1000, max_length=64)


def test_dataset_missing_and_non_parquet(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        CellDataset(tmp_path / "nope.parquet", 10, 8)
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        CellDataset(tmp_path / "text.parquet", 10, 8)


def test_rank_shards_are_disjoint(tmp_path):
    shards = [set(epoch_order(103, epoch=2, seed=7, rank=r, world_size=3)) for r in range(3)]
    assert sum(len(s) for s in shards) == 102 and len(set.union(*shards)) == 102
    assert not np.array_equal(epoch_order(103, 0, 7, 0, 1), epoch_order(103, 1, 7, 0, 1))

    # iterate_batches' global position and exact resume (any world size): tests/test_data_position.py


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array([5, 6, 7], type=pa.int64()), "'input_ids' is int64, not a list of integer token ids per cell"),
        (pa.array([[5.0, 6.7]], type=pa.list_(pa.float32())), "'input_ids' is list<element: float>, not a list of"),
        (pa.array([[5, 6], [7, None, 8]], type=pa.list_(pa.int32())), "row 1 has a null token id"),
        (pa.array([[5, 6], [7], None], type=pa.list_(pa.int32())), "row 2 has a null input_ids"),
    ],
)
def test_dataset_needs_integer_lists_without_nulls(tmp_path, column, message):
    path = tmp_path / "cells.parquet"
    pq.write_table(pa.table({"input_ids": column}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        CellDataset(path, vocab_size=1000, max_length=64)


def test_dataset_counts_truncated_cells(tmp_path):
    path = write_cells(tmp_path / "cells.parquet", [[5] * 10, [6] * 64, [7] * 65, [8] * 100])
    assert CellDataset(path, 1000, max_length=64).num_truncated == 2
    assert CellDataset(path, 1000, max_length=100).num_truncated == 0


def test_too_few_cells_fail_when_iteration_is_set_up(tmp_path):
    """The check runs when iterate_batches is called, before the training loop creates any output."""
    dataset = CellDataset(write_cells(tmp_path / "cells.parquet", [[5, 6]] * 3), 1000, 64)
    collator = MaskingCollator(VOCAB)
    with pytest.raises(DataError, match="3 cells cannot fill one micro-batch of 4 on 1 ranks"):
        iterate_batches(dataset, collator, micro_batch_size=4, seed=0, rank=0, world_size=1)
    with pytest.raises(DataError, match="3 cells cannot fill one micro-batch of 2 on 2 ranks"):
        iterate_batches(dataset, collator, micro_batch_size=2, seed=0, rank=0, world_size=2)
