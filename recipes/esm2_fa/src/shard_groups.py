"""Windows -> `shard-XXXXX/` datasets, one group of windows per worker process (data_processing.py's parallel part).

A group is `shard_size // chunk_size` consecutive windows (at least one). Its worker builds the windows, writes their
shards and its part of the refined FASTA under temporary names, and returns only counts; the main process numbers the
shards in input order. So no shard depends on another worker, and the output is the same at any process count.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetInfo, Features, Sequence, Value
from datasets.table import InMemoryTable

from fasta_reader import FastaError, Span, read_span, record_blocks
from model import IGNORE_INDEX, PAD_ID
from packing import Window, build_window

SHARD_FEATURES = Features(
    {
        "input_ids": Sequence(Value("int8")),
        "attention_mask": Sequence(Value("int8")),
        "labels": Sequence(Value("int8")),
        "sequence_length": Value("int32"),
        "batch_id": Value("int64"),
        "id": Value("string"),
    }
)


class ShardWriter:
    """Takes one group's windows in order and writes `<prefix>NNN/` datasets of at most shard_size rows (batches
    never split; shard_size=None: one shard for the whole group).

    Holds at most one shard's rows (references into the windows it came from), so memory is bounded by
    shard_size and the windows of one group, not by the input.
    """

    def __init__(self, out_dir: Path, shard_size: int | None, prefix: str = "shard-"):
        self.out_dir, self.shard_size, self.prefix = out_dir, shard_size, prefix
        self.written: list[Path] = []
        self.pending: list[tuple[Window, int, int]] = []  # (window, first batch, end batch) of the open shard
        self.pending_rows = 0
        self.n_shards = self.n_batches = self.n_rows = self.real_tokens = self.padded_tokens = 0

    def add_window(self, window: Window) -> None:
        """Append a window's batches, closing a shard before a batch that would push it past shard_size."""
        first = 0
        for b, n in enumerate(window.batch_rows.tolist()):
            if self.shard_size and self.pending_rows and self.pending_rows + n > self.shard_size:
                if b > first:
                    self.pending.append((window, first, b))
                self.flush()
                first = b
            self.pending_rows += n
        self.pending.append((window, first, len(window.batch_rows)))
        self.n_batches += len(window.batch_rows)
        self.n_rows += len(window.ids)
        self.real_tokens += int(window.lengths.sum())
        self.padded_tokens += int(window.widths.sum())

    def flush(self) -> None:
        """Write the open shard (if it has rows)."""
        if not self.pending_rows:
            return
        parts = []
        for window, b0, b1 in self.pending:
            r0, r1 = int(window.row_offsets[b0]), int(window.row_offsets[b1])
            t0, t1 = int(window.token_offsets[r0]), int(window.token_offsets[r1])
            parts.append((window.input_ids[t0:t1], window.widths[r0:r1], window.lengths[r0:r1]))
            parts[-1] += (window.batch_rows[b0:b1], window.ids[r0:r1])
        input_ids, widths, lengths, batch_rows = (np.concatenate([p[i] for p in parts]) for i in range(4))
        ids = [seq_id for p in parts for seq_id in p[4]]
        batch_id = np.repeat(np.arange(len(batch_rows)), batch_rows)  # numbered within the shard
        self._write(input_ids, widths, lengths, batch_id, ids)
        self.pending, self.pending_rows = [], 0

    def _write(self, input_ids, widths, lengths, batch_id, ids) -> None:
        # Columns are built as Arrow arrays from one flat numpy buffer each: Dataset.from_dict would encode
        # every row in Python, which made it ~5x slower than everything else in preprocessing together.
        offsets = pa.array(np.concatenate([[0], np.cumsum(widths)]).astype(np.int32))
        real = input_ids != PAD_ID  # no real token is <pad>: residues, <cls> and <eos> only
        labels = np.where(real, input_ids, np.int8(IGNORE_INDEX))  # stays int8: no temporary int64 copy
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(offsets, pa.array(input_ids)),
                "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(real.view(np.int8))),
                "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
                "sequence_length": pa.array(lengths.astype(np.int32)),
                "batch_id": pa.array(batch_id.astype(np.int64)),
                "id": pa.array(ids, pa.string()),
            }
        ).cast(SHARD_FEATURES.arrow_schema)
        # A hash of the ids and row widths as the fingerprint: datasets would otherwise hash the whole pickled
        # table, and a random one would make state.json differ between identical runs.
        digest = hashlib.blake2b(widths.tobytes(), digest_size=8)
        digest.update("\n".join(ids).encode("utf-8"))
        shard = Dataset(InMemoryTable(table), info=DatasetInfo(features=SHARD_FEATURES), fingerprint=digest.hexdigest())
        path = self.out_dir / f"{self.prefix}{self.n_shards:03d}"
        shard.save_to_disk(str(path))
        self.written.append(path)
        self.n_shards += 1


@dataclass
class GroupResult:
    """What a worker wrote for one group of windows: its shard folders, its refined FASTA part and the counts."""

    shards: list[Path]
    refined: Path
    n_records: int
    batches: int
    rows: int
    real_tokens: int
    padded_tokens: int


def windows_per_group(chunk_size: int, shard_size: int) -> int:
    """Windows a worker turns into shards at once: shard_size // chunk_size (at least 1)."""
    return max(1, shard_size // chunk_size)


def build_group(
    path: Path,
    group: int,
    blocks: list[tuple[int, int, bytes | Span]],
    out_dir: Path,
    shard_size: int,
    chunk_size: int,
    **packing,
) -> GroupResult:
    """One worker's job: build the windows of `blocks` [(window index, records before it, bytes)], write their shards
    as `out_dir/group-GGGGGG-NNN/` and their refined FASTA as `out_dir/refined-GGGGGG.part`; FastaError on bad input.
    """
    # Below one window per shard, shards are cut by rows inside the window; otherwise a shard is the whole group.
    writer = ShardWriter(out_dir, shard_size if shard_size < chunk_size else None, prefix=f"group-{group:06d}-")
    refined = out_dir / f"refined-{group:06d}.part"
    n_records = 0
    with open(refined, "wb") as handle:
        for index, first_record, block in blocks:
            block = read_span(path, block) if isinstance(block, Span) else block
            window = build_window(path, index, first_record, block, **packing)
            handle.write(window.refined)
            writer.add_window(window)
            n_records += window.n_records
        writer.flush()
    return GroupResult(
        writer.written, refined, n_records, writer.n_batches, writer.n_rows, writer.real_tokens, writer.padded_tokens
    )


def append_file(part: Path, out) -> None:
    """Append the file `part` to the open binary file `out`, inside the kernel where it can (os.copy_file_range)."""
    out.flush()
    with open(part, "rb") as source:
        remaining = os.fstat(source.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(source.fileno(), out.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        except (AttributeError, OSError):  # not Linux, or a file system without it: copy through user space
            shutil.copyfileobj(source, out, 1 << 20)
            return
        if remaining:
            shutil.copyfileobj(source, out, 1 << 20)


def grouped_blocks(
    input_fasta: Path, chunk_size: int, per_group: int, spans: bool = False
) -> Iterator[list[tuple[int, int, bytes | Span]]]:
    """Consecutive groups of `per_group` windows [(window index, records before it, bytes or Span)]. A reader error
    (e.g. a cut gzip) is raised after the group holding the windows read before it, so those are still checked first.
    """
    group, error = [], None
    try:
        for index, (first_record, block) in enumerate(record_blocks(input_fasta, chunk_size, spans)):
            group.append((index, first_record, block))
            if len(group) == per_group:
                yield group
                group = []
    except FastaError as err:
        error = err
    if group:
        yield group
    if error is not None:
        raise error


def map_groups(input_fasta: Path, chunk_size: int, per_group: int, work, num_proc: int) -> Iterator[GroupResult]:
    """work(path, group index, blocks) over groups of windows, results in input order.

    With num_proc > 1 the groups go to a process pool; at most num_proc + 1 are in flight, so memory is bounded by
    the group size. Errors surface in input order: a reader error found while reading ahead waits until the groups
    before it are done, so the first bad record in the file is the one reported, as in 1 process.
    """
    # Workers read their own blocks of an uncompressed file: the main process then only finds record starts.
    groups = grouped_blocks(input_fasta, chunk_size, per_group, spans=num_proc > 1)
    if num_proc == 1:
        for index, group in enumerate(groups):
            yield work(input_fasta, index, group)
        return
    # fork: workers inherit the imported modules (a spawned worker would import torch again, seconds each).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    # Frozen objects are skipped by the workers' garbage collector, which would otherwise write to every inherited
    # object and so copy the parent's whole heap into each worker (Python's gc.freeze documentation).
    gc.freeze()
    with ProcessPoolExecutor(num_proc, mp_context=context) as pool:
        pending = deque()
        try:
            for index in itertools.count():
                try:
                    group = next(groups)
                except StopIteration:
                    break
                except FastaError:  # a reader error comes after every group already read
                    while pending:
                        yield pending.popleft().result()
                    raise
                pending.append(pool.submit(work, input_fasta, index, group))
                if len(pending) > num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            gc.unfreeze()
