"""Tokenized cells -> masked-LM batches, with a resumable, rank-sharded order.

The training loop owns the position in the data (epoch, batch) instead of a DataLoader iterator: on resume it starts at
exactly the next batch without replaying any randomness, so a resumed run sees the same batches and masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model import IGNORE_INDEX
from preprocess import DataError


class CellDataset(torch.utils.data.Dataset):
    """Cells of a token parquet (`input_ids` column), validated against the vocabulary and truncated to max_length.

    Truncation keeps the first (highest-ranked) genes, which is what rank-value encoding means by a shorter context;
    `num_truncated` counts the cells it cuts, so the caller can say so once.
    """

    def __init__(self, parquet_path: str | Path, vocab_size: int, max_length: int):
        path = Path(parquet_path)
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        try:
            schema = pq.read_schema(path)
        except Exception as error:  # pyarrow raises several types for a non-parquet file
            raise DataError(f"{path}: not a readable parquet file ({error})") from None
        if "input_ids" not in schema.names:
            raise DataError(f"{path}: no 'input_ids' column (has {schema.names}); tokenize with preprocess.py")
        kind = schema.field("input_ids").type
        # Float ids would be truncated silently by the int64 cast below, and a flat column is not one list per cell.
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
            raise DataError(f"{path}: 'input_ids' is {kind}, not a list of integer token ids per cell")
        column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
        if column.null_count:
            raise DataError(f"{path}: row {_first_null(column)} has a null input_ids")
        if column.values.null_count:
            position = _first_null(column.values)
            row = int(np.searchsorted(np.asarray(column.offsets), position, side="right") - 1)
            raise DataError(f"{path}: row {row} has a null token id")
        # Flat token array + offsets: one allocation for the whole corpus instead of a Python list per cell.
        offsets = np.asarray(column.offsets, dtype=np.int64)
        tokens = np.asarray(column.values, dtype=np.int64)
        lengths = np.diff(offsets)
        if len(lengths) == 0:
            raise DataError(f"{path}: contains no cells")
        if (lengths == 0).any():
            raise DataError(f"{path}: cell at row {int(np.argmax(lengths == 0))} has no tokens (empty cell)")
        bad = (tokens < 0) | (tokens >= vocab_size)
        if bad.any():
            position = int(np.argmax(bad))
            row = int(np.searchsorted(offsets, position, side="right") - 1)
            raise DataError(
                f"{path}: row {row} has token id {int(tokens[position])} outside the vocabulary (size {vocab_size})"
            )
        self.path, self.tokens, self.offsets, self.max_length = path, tokens, offsets, max_length
        self.num_truncated = int((lengths > max_length).sum())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        start = self.offsets[index]
        end = min(self.offsets[index + 1], start + self.max_length)
        return self.tokens[start:end]

    def lengths(self) -> np.ndarray:
        """Tokens per cell after truncation."""
        return np.minimum(np.diff(self.offsets), self.max_length)


def _first_null(array: pa.Array) -> int:
    return int(np.argmax(array.is_null().to_numpy(zero_copy_only=False)))


@dataclass
class MaskingCollator:
    """Pads a list of cells and applies BERT masking: of the `mlm_probability` chosen gene tokens, 80% become
    `<mask>`, 10% a random gene and 10% stay; labels are IGNORE_INDEX elsewhere. Special tokens are never chosen.
    Draws only from its own generator, so a resumed run reproduces the masks exactly."""

    vocab: list[str]
    mlm_probability: float = 0.15
    pad_to_multiple_of: int = 16
    generator: torch.Generator | None = None

    def __post_init__(self):
        special = [i for i, token in enumerate(self.vocab) if token.startswith("<") and token.endswith(">")]
        self.pad_id, self.mask_id = self.vocab.index("<pad>"), self.vocab.index("<mask>")
        self.special_ids = torch.tensor(special)
        self.first_gene_id = max(special) + 1  # random replacements come from the genes, which follow the specials
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(0)

    def __call__(self, cells: list[np.ndarray]) -> dict[str, torch.Tensor]:
        longest = max(len(cell) for cell in cells)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(cells), width), self.pad_id, dtype=torch.long)
        for row, cell in enumerate(cells):
            input_ids[row, : len(cell)] = torch.from_numpy(np.array(cell, dtype=np.int64))
        attention_mask = (input_ids != self.pad_id).long()

        maskable = ~torch.isin(input_ids, self.special_ids)
        draw = torch.rand(input_ids.shape, generator=self.generator)
        chosen = maskable & (draw < self.mlm_probability)
        if not chosen.any():  # tiny batches: keep at least one prediction target so the loss is defined
            candidates = maskable.flatten().nonzero().squeeze(1)
            pick = candidates[torch.randint(len(candidates), (1,), generator=self.generator)]
            chosen.view(-1)[pick], draw.view(-1)[pick] = True, 0.0
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        # Re-use the same uniform draw to split the chosen tokens 80/10/10 (it is uniform on [0, p) there).
        fraction = draw / self.mlm_probability
        to_mask = chosen & (fraction < 0.8)
        to_random = chosen & (fraction >= 0.8) & (fraction < 0.9)
        random_genes = torch.randint(self.first_gene_id, len(self.vocab), input_ids.shape, generator=self.generator)
        input_ids = torch.where(to_mask, torch.full_like(input_ids, self.mask_id), input_ids)
        input_ids = torch.where(to_random, random_genes, input_ids)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(num_cells: int, epoch: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's cell indices for one epoch: a seeded permutation, cut to a multiple of world_size, strided."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_cells, generator=generator).numpy()
    usable = (num_cells // world_size) * world_size
    return order[:usable][rank::world_size]


def batches_per_epoch(num_cells: int, micro_batch_size: int, world_size: int) -> int:
    """Full micro-batches per rank per epoch (a trailing partial batch is dropped so every rank steps together)."""
    return (num_cells // world_size) // micro_batch_size


def check_fills_a_batch(dataset: CellDataset, micro_batch_size: int, world_size: int) -> None:
    """Raise DataError when the corpus cannot give every rank one full micro-batch."""
    if batches_per_epoch(len(dataset), micro_batch_size, world_size) == 0:
        raise DataError(
            f"{dataset.path}: {len(dataset)} cells cannot fill one micro-batch of {micro_batch_size} on {world_size} ranks"
        )


def iterate_batches(
    dataset: CellDataset,
    collator: MaskingCollator,
    micro_batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    position: dict | None = None,
):
    """An iterator of (position, batch), forever; `position` is where the data stands *after* that batch.

    The cells form one global stream, the same for every world size: the seeded permutation of epoch 0, then of
    epoch 1, and so on. Each global step takes the next `world_size × micro_batch_size` cells of the stream and rank r
    gets the r-th block of `micro_batch_size`, so a position `{"epoch": e, "cells_done": n}` (identical on every rank)
    lets a resumed run continue under any world size with no cell replayed or skipped. A step may span two epochs.
    Checks the corpus now, not at the first next() (a generator body would only run then)."""
    check_fills_a_batch(dataset, micro_batch_size, world_size)
    position = dict(position or {"epoch": 0, "cells_done": 0})
    if "cells_done" not in position:  # written by the per-rank (epoch, batch) version of this recipe
        raise DataError(f"data position {position} predates the global one: start a new training.output_dir")
    return _batches(dataset, collator, micro_batch_size, seed, rank, world_size, position)


def _batches(dataset, collator, micro_batch_size, seed, rank, world_size, position):
    epoch, done, num_cells = int(position["epoch"]), int(position["cells_done"]), len(dataset)
    order = epoch_order(num_cells, epoch, seed, 0, 1)  # the whole permutation; ranks take blocks of each step
    while True:
        step_cells = []
        while len(step_cells) < world_size * micro_batch_size:
            take = order[done : done + world_size * micro_batch_size - len(step_cells)]
            step_cells.extend(int(i) for i in take)
            done += len(take)
            if done == num_cells:
                epoch, done = epoch + 1, 0
                order = epoch_order(num_cells, epoch, seed, 0, 1)
        mine = step_cells[rank * micro_batch_size : (rank + 1) * micro_batch_size]
        yield {"epoch": epoch, "cells_done": done}, collator([dataset[i] for i in mine])
