"""The data position is global: a resume under another world size continues the same cell stream exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import CellDataset, iterate_batches
from preprocess import DataError


def numbered_cells(path, count: int) -> CellDataset:
    """Cell i holds the tokens [i, i]: the first token names the cell."""
    pq.write_table(pa.table({"input_ids": pa.array([[i, i] for i in range(count)], type=pa.list_(pa.int32()))}), path)
    return CellDataset(path, vocab_size=count, max_length=8)


def first_tokens(cells) -> list[int]:
    return [int(cell[0]) for cell in cells]


def run(dataset, world_size: int, steps: int, position=None, micro_batch_size: int = 4, seed: int = 5):
    """Cells seen per global step (ranks in order) and the position after the last step, for `world_size` ranks."""
    streams = [
        iterate_batches(dataset, first_tokens, micro_batch_size, seed, rank, world_size, position)
        for rank in range(world_size)
    ]
    seen, positions = [], []
    for _ in range(steps):
        step_cells = []
        for stream in streams:
            pos, cells = next(stream)
            step_cells += cells
            positions.append(pos)
        assert all(p == positions[-1] for p in positions[-world_size:]), "every rank holds the same global position"
        seen.append(step_cells)
    return [cell for step in seen for cell in step], positions[-1]


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (3, 2)])
def test_resume_under_another_world_size_neither_replays_nor_skips(tmp_path, before, after):
    dataset = numbered_cells(tmp_path / "cells.parquet", 37)  # not a multiple of any batch: steps span epochs
    straight, _ = run(dataset, 1, steps=30)  # 120 cells: more than three epochs
    first, position = run(dataset, before, steps=5)
    rest_steps = (120 - len(first)) // (4 * after)
    second, _ = run(dataset, after, steps=rest_steps, position=position)
    assert first + second == straight[: len(first) + len(second)]
    assert len(first) + len(second) > 37 * 3 - 4 * after  # a resume that crossed epoch boundaries


def test_every_epoch_is_a_permutation_of_all_cells(tmp_path):
    dataset = numbered_cells(tmp_path / "cells.parquet", 37)
    cells, position = run(dataset, 2, steps=37)  # 296 cells = 8 epochs exactly
    assert position == {"epoch": 8, "cells_done": 0}
    epochs = [cells[i * 37 : (i + 1) * 37] for i in range(8)]
    assert all(sorted(epoch) == list(range(37)) for epoch in epochs)
    assert not np.array_equal(epochs[0], epochs[1])


def test_a_per_rank_position_of_the_old_format_is_refused(tmp_path):
    dataset = numbered_cells(tmp_path / "cells.parquet", 37)
    with pytest.raises(DataError, match="predates the global one"):
        iterate_batches(dataset, first_tokens, 4, 0, 0, 1, {"epoch": 0, "batch": 3})
