"""Every length setting the config accepts goes through dataset + collator + model forward without indexing past
the position table (a width padded to pad_to_multiple_of used to exceed max_position_embeddings)."""

from __future__ import annotations

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_bert

from data import CACHE_ENV, CellDataset, MaskingCollator

VOCAB = {"v1": ["<pad>", "<mask>"], "v2": ["<pad>", "<mask>", "<cls>", "<eos>"]}
GENES = [f"G{i}" for i in range(30)]


def corpus(tmp_path, style: str, longest: int):
    """Cells of every length 1..longest genes (wrapped in <cls> ... <eos> for v2)."""
    first = len(VOCAB[style])
    cells = [[first + (i % len(GENES)) for i in range(n)] for n in range(1, longest + 1)]
    if style == "v2":
        cells = [[2, *cell, 3] for cell in cells]
    path = tmp_path / f"{style}.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(cells, type=pa.list_(pa.uint16()))}), path)
    return path


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_every_length_setting_runs_the_model(tmp_path, monkeypatch, style):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    vocab = VOCAB[style] + GENES
    path = corpus(tmp_path, style, longest=70)
    models, datasets = {}, {}
    shortest = 3 if style == "v2" else 1
    for max_seq_length, pad_to, extra in itertools.product([shortest, 15, 20, 33, 64], [1, 7, 16, 64], [0, 1, 13]):
        max_positions = max_seq_length + extra
        if max_positions not in models:
            models[max_positions] = tiny_bert(len(vocab), 16, 1, 32, max_positions).eval()
        if max_seq_length not in datasets:
            datasets[max_seq_length] = CellDataset(path, len(vocab), max_seq_length)
        dataset = datasets[max_seq_length]
        collator = MaskingCollator(vocab, 0.15, pad_to, torch.Generator().manual_seed(0), max_length=max_positions)
        for rows in ([0], [len(dataset) - 1], list(range(0, len(dataset), 9))):
            batch = collator([dataset[i] for i in rows])
            width = batch["input_ids"].shape[1]
            longest = max(len(dataset[i]) for i in rows)
            setting = (style, max_seq_length, pad_to, max_positions, rows[:2])
            assert longest <= width <= max_positions, setting
            assert width % pad_to == 0 or width == max_positions, setting
            with torch.no_grad():
                output = models[max_positions](**batch)
            assert torch.isfinite(output.loss), setting


def test_collator_refuses_a_cell_longer_than_max_length():
    collator = MaskingCollator(VOCAB["v1"] + GENES, max_length=8)
    with pytest.raises(ValueError, match="a cell of 9 tokens is longer than max_length=8"):
        collator([torch.arange(2, 11).numpy()])
