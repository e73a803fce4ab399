"""The order cells are trained in: one global, resumable stream per `data.batching` mode.

- `random`: a seeded permutation per epoch; batches of `micro_batch_size` cells padded to their longest.
- `length_grouped`: the same permutation cut into mega-batches of 50 micro-batches, each sorted by length (longest
  first), the longest cell of the epoch moved to the front (an out-of-memory shows at step 1): Hugging Face's
  `LengthGroupedSampler`, which the original Geneformer pretraining used. Little padding, the same randomness.
- `packed`: the permutation cut into windows of PACK_WINDOW_CELLS cells; each window is packed best-fit-decreasing
  into rows of at most `max_seq_length` tokens (cells never split), rows shuffled; a batch is `micro_batch_size` rows.

Every mode is a function of (seed, epoch, lengths, micro_batch_size) only, never of the world size: a global step
takes the next `world_size × micro_batch_size` units (cells, or rows when packed) of the stream and rank r gets the
r-th block. The position `{"epoch": e, "cells_done": n}` counts the cells of epoch e in the units already taken, so a
run resumed under any world size continues with the next unit, nothing replayed or skipped. Lengths come from the
corpus offsets (`CellDataset.lengths`), not from reading the cells. Changing data.batching (or, for length_grouped,
micro_batch_size) between a save and its resume keeps the count, not the order, of the epoch under way: until it ends,
some of its cells may repeat or be skipped.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from dictionaries import DataError

BATCHING_MODES = ("random", "length_grouped", "packed")
MEGABATCH_BATCHES = 50  # transformers' LengthGroupedSampler megabatch_mult
# Cells packed together. pack_rows on the Genecorpus-like lengths (bench_batching.genecorpus_like_lengths): windows
# of 100 cells fill rows to 0.958, 1,000 to 0.982, 2,000 to 0.984; a fixed count keeps the stream independent of the
# batch size.
PACK_WINDOW_CELLS = 1000


def epoch_order(num_cells: int, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's cell indices for one epoch: a seeded permutation, cut to a multiple of world_size, strided."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_cells, generator=generator).numpy()
    usable = (num_cells // world_size) * world_size
    return order[:usable][rank::world_size]


def length_grouped_order(lengths: np.ndarray, epoch: int, seed: int, micro_batch_size: int) -> np.ndarray:
    """The epoch's permutation with each mega-batch (MEGABATCH_BATCHES micro-batches) sorted longest first and the
    longest cell of the epoch swapped to position 0 (as transformers does). Shape [num_cells], int64."""
    order = epoch_order(len(lengths), epoch, seed, 0, 1)
    megabatch = np.arange(len(order)) // (MEGABATCH_BATCHES * micro_batch_size)
    order = order[np.lexsort((-lengths[order], megabatch))]  # lexsort is stable: ties keep the permutation's order
    longest = int(np.argmax(lengths[order]))  # the first of the longest (a mega-batch head)
    order[[0, longest]] = order[[longest, 0]]
    return order


def pack_rows(cells: np.ndarray, lengths: np.ndarray, row_length: int, generator: torch.Generator) -> list[np.ndarray]:
    """Cells (indices) packed best-fit-decreasing into rows of at most `row_length` tokens, rows in a seeded
    random order. Each row is an array of cell indices, longest first. Hand-written: the bin-packing libraries on
    PyPI return bins without a reproducible order; this is 20 lines."""
    free: list[int] = []  # free tokens of the open rows, ascending (bisect finds the tightest fit)
    owner: list[int] = []  # row index of each entry in `free`
    rows: list[list[int]] = []
    for cell in cells[np.argsort(-lengths[cells], kind="stable")]:
        size = int(lengths[cell])
        slot = bisect.bisect_left(free, size)
        if slot < len(free):
            room, row = free.pop(slot), owner.pop(slot)
            rows[row].append(int(cell))
        else:
            room, row = row_length, len(rows)
            rows.append([int(cell)])
        slot = bisect.bisect_left(free, room - size)
        free.insert(slot, room - size)
        owner.insert(slot, row)
    shuffle = torch.randperm(len(rows), generator=generator).tolist()
    return [np.array(rows[i], dtype=np.int64) for i in shuffle]


def _cell_units(order: np.ndarray, cells_done: int):
    for index in range(cells_done, len(order)):
        yield order[index : index + 1], index + 1


def _packed_units(lengths: np.ndarray, order: np.ndarray, row_length: int, seed: int, epoch: int, cells_done: int):
    """Rows of each window; window w holds cells [w, w + PACK_WINDOW_CELLS) of the permutation, so a resume packs
    only the window it stands in."""
    first = cells_done - cells_done % PACK_WINDOW_CELLS
    for start in range(first, len(order), PACK_WINDOW_CELLS):
        generator = torch.Generator().manual_seed(seed + 7919 * epoch + start)
        done = start
        for row in pack_rows(order[start : start + PACK_WINDOW_CELLS], lengths, row_length, generator):
            done += len(row)
            if done > cells_done:
                yield row, done


def units_of_epoch(lengths, batching: str, epoch: int, seed: int, micro_batch_size: int, row_length: int, done: int):
    """An iterator of (unit, cells of the epoch done after it) from `done` on, for one epoch of `batching`."""
    if batching == "random":
        return _cell_units(epoch_order(len(lengths), epoch, seed, 0, 1), done)
    if batching == "length_grouped":
        return _cell_units(length_grouped_order(lengths, epoch, seed, micro_batch_size), done)
    if batching == "packed":
        order = epoch_order(len(lengths), epoch, seed, 0, 1)
        return _packed_units(lengths, order, row_length, seed, epoch, done)
    raise ValueError(f"batching={batching!r}: use one of {', '.join(BATCHING_MODES)}")


def check_fills_a_batch(dataset, micro_batch_size: int, world_size: int, batching: str = "random") -> None:
    """Raise DataError when the corpus cannot give every rank one full micro-batch (cells, or packed rows: a corpus
    of at least world_size × micro_batch_size × max_seq_length tokens always packs into that many rows)."""
    cells = len(dataset)
    if (cells // world_size) // micro_batch_size == 0:
        raise DataError(
            f"{dataset.path}: {cells} cells cannot fill one micro-batch of {micro_batch_size} on {world_size} ranks"
        )
    if batching == "packed":
        tokens, need = int(dataset.lengths().sum()), world_size * micro_batch_size * dataset.max_length
        if tokens < need:
            raise DataError(
                f"{dataset.path}: {tokens} tokens cannot fill one micro-batch of {micro_batch_size} packed rows of "
                f"{dataset.max_length} tokens on {world_size} ranks ({need} tokens); use data.batching=length_grouped"
            )


def iterate_batches(
    dataset,
    collator,
    micro_batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    position: dict | None = None,
    batching: str = "random",
):
    """An iterator of (position, batch), forever; `position` is where the data stands *after* that batch.

    `collator(cells)` makes the batch of the cell modes, `collator.pack(rows)` (rows of cells, at most
    `dataset.max_length` tokens each) the packed one. A step may span two epochs. Checks the corpus now, not at the
    first next() (a generator body would only run then); DataError for a corpus too small or an old position."""
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching={batching!r}: use one of {', '.join(BATCHING_MODES)}")
    check_fills_a_batch(dataset, micro_batch_size, world_size, batching)
    position = dict(position or {"epoch": 0, "cells_done": 0})
    if "cells_done" not in position:  # written by the per-rank (epoch, batch) version of this recipe
        raise DataError(f"data position {position} predates the global one: start a new training.output_dir")
    return _batches(dataset, collator, micro_batch_size, seed, rank, world_size, position, batching)


def _batches(dataset, collator, micro_batch_size, seed, rank, world_size, position, batching):
    lengths = dataset.lengths()
    epoch, done = int(position["epoch"]), int(position["cells_done"])

    def units(epoch: int, done: int):
        return units_of_epoch(lengths, batching, epoch, seed, micro_batch_size, dataset.max_length, done)

    stream = units(epoch, done)
    while True:
        step_units = []
        while len(step_units) < world_size * micro_batch_size:
            unit, done = next(stream)
            step_units.append(unit)
            if done == len(lengths):
                epoch, done = epoch + 1, 0
                stream = units(epoch, 0)
        mine = step_units[rank * micro_batch_size : (rank + 1) * micro_batch_size]
        if batching == "packed":
            batch = collator.pack([[dataset[int(i)] for i in row] for row in mine])
        else:
            batch = collator([dataset[int(unit[0])] for unit in mine])
        yield {"epoch": epoch, "cells_done": done}, batch
