"""The data position is global: a resume under another world size continues the same cell stream exactly, in every
batching mode (random, length_grouped, packed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batching
from data import CellDataset, iterate_batches
from preprocess import DataError

MODES = batching.BATCHING_MODES


@pytest.fixture(autouse=True)
def small_pack_windows(monkeypatch):
    """Windows of 10 cells: resumes land inside and across packing windows, not only in the first."""
    monkeypatch.setattr(batching, "PACK_WINDOW_CELLS", 10)


def numbered_cells(path, count: int, lengths=None) -> CellDataset:
    """Cell i holds the token i, `lengths[i]` times (2 by default): the first token names the cell."""
    lengths = [2] * count if lengths is None else lengths
    cells = [[i] * n for i, n in zip(range(count), lengths)]
    pq.write_table(pa.table({"input_ids": pa.array(cells, type=pa.list_(pa.int32()))}), path)
    return CellDataset(path, vocab_size=count, max_length=8)


class FirstTokens:
    """A collator that returns the names of the cells it is given, in order."""

    def __call__(self, cells) -> list[int]:
        return [int(cell[0]) for cell in cells]

    def pack(self, rows) -> list[int]:
        assert all(sum(len(cell) for cell in row) <= 8 for row in rows), "a packed row fits max_length"
        return [int(cell[0]) for row in rows for cell in row]


def run(dataset, world_size: int, steps: int, position=None, mode="random", micro_batch_size: int = 4, seed: int = 5):
    """Cells seen over `steps` global steps (ranks in order) and the position after the last, for `world_size` ranks."""
    streams = [
        iterate_batches(dataset, FirstTokens(), micro_batch_size, seed, rank, world_size, position, batching=mode)
        for rank in range(world_size)
    ]
    seen, positions = [], []
    for _ in range(steps):
        for stream in streams:
            pos, cells = next(stream)
            seen += cells
            positions.append(pos)
        assert all(p == positions[-1] for p in positions[-world_size:]), "every rank holds the same global position"
    return seen, positions[-1]


def varied_cells(tmp_path) -> CellDataset:
    return numbered_cells(tmp_path / "cells.parquet", 37, lengths=[1 + (i * 7) % 8 for i in range(37)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (3, 2)])
def test_resume_under_another_world_size_neither_replays_nor_skips(tmp_path, before, after, mode):
    dataset = varied_cells(tmp_path)  # 37 cells: not a multiple of any batch, so steps span epochs
    straight, _ = run(dataset, 1, steps=30, mode=mode)  # 120 units (cells, or packed rows): three epochs or more
    first, position = run(dataset, before, steps=5, mode=mode)
    rest_steps = (120 - 20 * before) // (4 * after)
    second, end = run(dataset, after, steps=rest_steps, position=position, mode=mode)
    assert first + second == straight[: len(first) + len(second)]
    assert end["epoch"] >= 3, "the resumed part crossed epoch boundaries"


@pytest.mark.parametrize("mode", MODES)
def test_every_epoch_is_a_permutation_of_all_cells(tmp_path, mode):
    dataset = varied_cells(tmp_path)
    lengths = dataset.lengths()
    epochs = []
    for epoch in range(3):
        units = list(batching.units_of_epoch(lengths, mode, epoch, seed=5, micro_batch_size=4, row_length=8, done=0))
        assert units[-1][1] == 37 and all(a[1] < b[1] for a, b in zip(units, units[1:])), "cells done only grows"
        assert all(lengths[unit].sum() <= 8 for unit, _ in units)
        epochs.append(np.concatenate([unit for unit, _ in units]))
    assert all(sorted(epoch) == list(range(37)) for epoch in epochs)
    assert not np.array_equal(epochs[0], epochs[1])
    cells, _ = run(dataset, 1, steps=10, mode=mode)  # the stream: these epochs back to back
    assert 40 <= len(cells) <= 111 and cells == [int(i) for i in np.concatenate(epochs)][: len(cells)]
    if mode != "packed":
        assert run(dataset, 2, steps=37, mode=mode)[1] == {"epoch": 8, "cells_done": 0}  # 296 cells = 8 epochs


def test_a_per_rank_position_of_the_old_format_is_refused(tmp_path):
    dataset = numbered_cells(tmp_path / "cells.parquet", 37)
    with pytest.raises(DataError, match="predates the global one"):
        iterate_batches(dataset, FirstTokens(), 4, 0, 0, 1, {"epoch": 0, "batch": 3})
