"""Tokenized cells -> masked-LM batches, with a resumable, rank-sharded order.

The training loop owns the position in the data (epoch, batch) instead of a DataLoader iterator: on resume it starts at
exactly the next batch without replaying any randomness, so a resumed run sees the same batches and masks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from batching import check_fills_a_batch, epoch_order, iterate_batches  # noqa: F401  (their old home)
from corpus import FORMAT_VERSION, fingerprint, list_shards, read_shard_metadata, write_text_atomic
from dictionaries import DataError, file_sha256
from model import IGNORE_INDEX

CACHE_ENV = "GENEFORMER_CACHE_DIR"
CACHE_VERSION = 1  # bump when the cached layout changes
CONVERT_ROWS = 1024  # cells per batch while converting parquet into the cache (4 MB at 2,048 uint16 ids)


class CorpusWarning(UserWarning):
    """A corpus without the metadata that lets its consumers check it (written before format version 2)."""


class CellDataset(torch.utils.data.Dataset):
    """Cells of a tokenized corpus (`input_ids` column), memory-mapped, truncated to max_length on access.

    `path`: one parquet file, a directory of parquet shards, or a Hugging Face `datasets` directory written with
    `save_to_disk` (what the original Geneformer tokenizer writes). Parquet is converted once, chunk by chunk, into
    an uncompressed Arrow file in the cache (`$GENEFORMER_CACHE_DIR`, default ~/.cache/biorecipes/geneformer), keyed
    by the shards' paths, sizes and modification times; the ranks of a node share it. Token ids stay in the file:
    each rank maps the same pages instead of holding its own copy. Ids are range-checked chunk-wise when the cache
    is built (or the datasets folder opened); the cache records the largest id, so reopening checks nothing again.

    Truncation keeps the first (highest-ranked) genes, which is what rank-value encoding means by a shorter context;
    `num_truncated` counts the cells it cuts, so the caller can say so once. Raises DataError for unusable files.
    """

    def __init__(self, parquet_path: str | Path, vocab_size: int, max_length: int, cache_dir: str | Path | None = None):
        path = Path(parquet_path)
        if not path.exists():
            raise DataError(f"{path}: no such data file")
        if path.is_dir() and (path / "state.json").is_file():
            table, summary = open_hf_dataset(path, cache_dir)
        else:
            table, summary = open_parquet_cached(list_shards(path), cache_dir)
        if summary["cells"] == 0:
            raise DataError(f"{path}: contains no cells")
        if summary["max_token_id"] >= vocab_size:
            where, row = summary["max_at"]
            raise DataError(
                f"{where}: row {row} has token id {summary['max_token_id']} outside the vocabulary (size {vocab_size})"
            )
        self.path, self.max_length, self._table = path, max_length, table
        self._chunks = [(_numpy(c.offsets), _numpy(c.values)) for c in table.column("input_ids").chunks if len(c)]
        self._starts = np.cumsum([0] + [len(offsets) - 1 for offsets, _ in self._chunks])
        self.num_truncated = int((self._raw_lengths() > max_length).sum())

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"cell {index} of {len(self)}")
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        offsets, values = self._chunks[chunk]
        row = index - self._starts[chunk]
        start = offsets[row]
        return values[start : min(offsets[row + 1], start + self.max_length)]

    def _raw_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(offsets) for offsets, _ in self._chunks])

    def lengths(self) -> np.ndarray:
        """Tokens per cell after truncation."""
        return np.minimum(self._raw_lengths(), self.max_length)


def _numpy(array: pa.Array) -> np.ndarray:
    """A zero-copy numpy view of a null-free Arrow array (a memory-mapped one stays on disk)."""
    return array.to_numpy(zero_copy_only=True)


def _first_null(array: pa.Array) -> int:
    return int(np.argmax(array.is_null().to_numpy(zero_copy_only=False)))


def check_token_column(path: Path, schema: pa.Schema) -> pa.DataType:
    """The integer type of the `input_ids` lists; DataError when the column is missing or not integer lists."""
    if "input_ids" not in schema.names:
        raise DataError(f"{path}: no 'input_ids' column (has {schema.names}); tokenize with preprocess.py")
    kind = schema.field("input_ids").type
    # Float ids would be truncated silently by an integer cast, and a flat column is not one list per cell.
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
        raise DataError(f"{path}: 'input_ids' is {kind}, not a list of integer token ids per cell")
    return kind.value_type


def check_chunk(path: Path, column: pa.Array, first_row: int) -> tuple[int, int]:
    """Validate one chunk of `input_ids` (no nulls, no empty cell, no negative id); returns (max id, its row)."""
    if column.null_count:
        raise DataError(f"{path}: row {first_row + _first_null(column)} has a null input_ids")
    offsets = np.asarray(column.offsets)
    offsets, values = offsets - offsets[0], column.flatten()

    def row_of(position: int) -> int:
        return first_row + int(np.searchsorted(offsets, position, side="right") - 1)

    if values.null_count:
        raise DataError(f"{path}: row {row_of(_first_null(values))} has a null token id")
    lengths = np.diff(offsets)
    if (lengths == 0).any():
        raise DataError(f"{path}: cell at row {first_row + int(np.argmax(lengths == 0))} has no tokens (empty cell)")
    if len(values) == 0:
        return -1, first_row
    extremes = pc.min_max(values)
    low, high = extremes["min"].as_py(), extremes["max"].as_py()
    if low < 0:
        raise DataError(f"{path}: row {row_of(pc.index(values, low).as_py())} has negative token id {low}")
    return high, row_of(pc.index(values, high).as_py())


def open_hf_dataset(path: Path, cache_dir: str | Path | None = None) -> tuple[pa.Table, dict]:
    """A `datasets.save_to_disk` folder, memory-mapped: its Arrow stream files are listed in state.json.

    Read with pyarrow rather than `datasets.load_from_disk`: the training image need not ship `datasets`, and this
    is the same zero-copy mapping it does. The chunk-wise check runs once; its result is kept in the cache."""
    try:
        files = [path / entry["filename"] for entry in json.loads((path / "state.json").read_text())["_data_files"]]
        tables = [pa.ipc.open_stream(pa.memory_map(str(f), "r")).read_all() for f in files]
    except Exception as error:  # KeyError, JSONDecodeError, ArrowInvalid, FileNotFoundError, ...
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path}: not a readable datasets folder ({reason})") from None
    for file, table in zip(files, tables):
        check_token_column(file, table.schema)

    def scan(_target: Path) -> dict:
        summary = {"cells": 0, "max_token_id": -1, "max_at": [str(path), 0]}
        for file, table in zip(files, tables):
            first = 0
            for chunk in table.column("input_ids").chunks:
                top, row = check_chunk(file, chunk, first)
                if top > summary["max_token_id"]:
                    summary["max_token_id"], summary["max_at"] = top, [str(file), row]
                first += len(chunk)
            summary["cells"] += table.num_rows
        return summary

    _, summary = cached(files, "datasets", cache_dir, scan, writes_file=False)
    return pa.concat_tables([t.select(["input_ids"]) for t in tables]), summary


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted corpora are kept: cache_dir, else $GENEFORMER_CACHE_DIR, else ~/.cache/biorecipes/geneformer
    (or the temp folder when the home is not writable)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    default = Path.home() / ".cache" / "biorecipes" / "geneformer"
    try:
        default.mkdir(parents=True, exist_ok=True)
        return default if os.access(default, os.W_OK) else _temp_cache()
    except OSError:  # a read-only or missing home (containers, CI): the node's temp folder still serves all ranks
        return _temp_cache()


def _temp_cache() -> Path:
    return Path(tempfile.gettempdir()) / f"biorecipes-geneformer-{os.getuid()}"


def cached(files: list[Path], kind: str, cache_dir, build, writes_file: bool = True) -> tuple[Path, dict]:
    """(cache file, summary) for these input files: `build(cache file) -> summary` runs once per input version
    (paths, sizes, modification times); concurrent ranks wait on a lock and reuse the first one's result."""
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, kind, stats]).encode()).hexdigest()[:32]
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    target, done = root / f"{key}.arrow", root / f"{key}.json"

    def ready() -> bool:  # a summary whose Arrow file was deleted is rebuilt
        return done.is_file() and (target.is_file() or not writes_file)

    if not ready():
        with open(root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not ready():
                write_text_atomic(json.dumps(build(target)), done)
    return target, json.loads(done.read_text())


def open_parquet_cached(shards: list[Path], cache_dir: str | Path | None = None) -> tuple[pa.Table, dict]:
    """Parquet shards as one memory-mapped Arrow table, converting them into the cache on first use."""
    types = [check_token_column(shard, _read_schema(shard)) for shard in shards]
    value_type = types[0] if all(t == types[0] for t in types) else pa.int64()
    arrow, summary = cached(
        shards, str(value_type), cache_dir, lambda target: convert_to_arrow(shards, value_type, target)
    )
    return pa.ipc.open_file(pa.memory_map(str(arrow), "r")).read_all(), summary


def _read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except Exception as error:  # pyarrow raises several types for a non-parquet file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path}: not a readable parquet file ({reason})") from None


def convert_to_arrow(shards: list[Path], value_type: pa.DataType, target: Path) -> dict:
    """Stream the shards' `input_ids` into an uncompressed Arrow IPC file, validating each batch; returns counts,
    the largest token id and where it is. Memory: one batch (CONVERT_ROWS cells) at a time."""
    schema = pa.schema([("input_ids", pa.list_(value_type))])
    summary = {"cells": 0, "max_token_id": -1, "max_at": [str(shards[0]), 0]}
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for shard in shards:
            first = 0
            # Unbuffered 1 MiB reads: pre-buffering whole row groups raised the peak with the shard size.
            reader = pq.ParquetFile(shard, pre_buffer=False, buffer_size=1 << 20)
            for batch in reader.iter_batches(batch_size=CONVERT_ROWS, columns=["input_ids"]):
                column = batch.column("input_ids")
                top, row = check_chunk(shard, column, first)
                if top > summary["max_token_id"]:
                    summary["max_token_id"], summary["max_at"] = top, [str(shard), row]
                writer.write_batch(pa.record_batch([column.cast(pa.list_(value_type))], schema=schema))
                first += len(column)
            summary["cells"] += first
    os.replace(tmp, target)
    return summary


def check_corpus_fingerprint(train_path: str | Path, vocab_path: str | Path) -> dict:
    """Check that the corpus at `train_path` was tokenized with the vocabulary file `vocab_path`.

    Reads the fingerprint every shard records (corpus.py) and compares the vocabulary's sha256. Returns the
    fingerprint with the corpus' cell and token totals; {} (and a CorpusWarning) for a corpus without one (older
    outputs, Hugging Face datasets folders). Raises DataError, in one line naming both files, on a vocabulary
    mismatch, shards of different corpora mixed in one directory, or a newer format than this code reads."""
    path, vocab_path = Path(train_path), Path(vocab_path)
    if path.is_dir() and (path / "state.json").is_file():
        records = [None]
    else:
        shards = list_shards(path)
        records = [read_shard_metadata(shard) for shard in shards]
    if all(record is None for record in records):
        warnings.warn(
            f"{path}: no preprocessing metadata; cannot check it was tokenized with {vocab_path}",
            CorpusWarning,
            stacklevel=2,
        )
        return {}
    if any(record is None for record in records):
        bare = shards[[r is None for r in records].index(True)]
        raise DataError(f"{path}: shard {bare.name} has no preprocessing metadata but others do; a mixed directory?")
    first = fingerprint(records[0])
    for shard, record in zip(shards, records):
        if fingerprint(record) != first:
            differ = sorted(k for k in first if fingerprint(record)[k] != first[k])
            raise DataError(f"{path}: shards {shards[0].name} and {shard.name} come from different corpora ({differ})")
    if (first["format_version"] or 0) > FORMAT_VERSION:
        raise DataError(f"{path}: format version {first['format_version']} is newer than this code ({FORMAT_VERSION})")
    if not vocab_path.is_file():
        raise DataError(f"{vocab_path}: no such vocabulary file")
    digest = file_sha256(vocab_path)
    if digest != first["vocab_sha256"]:
        written = shards[0].parent.parent / first["vocab_file"]  # out_dir/cells.parquet/part-*.parquet
        raise DataError(
            f"{path} was tokenized with the vocabulary {written} ({first['vocab_size']} tokens, sha256 "
            f"{first['vocab_sha256'][:12]}), not {vocab_path} (sha256 {digest[:12]}); train with the vocabulary "
            "written beside the corpus"
        )
    return {
        **first,
        "cells": sum(r.get("cells", 0) for r in records),
        "tokens": sum(r.get("tokens", 0) for r in records),
    }


@dataclass
class MaskingCollator:
    """Pads a list of cells (to a multiple of `pad_to_multiple_of`, at most `max_length`), or packs rows of cells
    (`pack`), and applies BERT masking: of the `mlm_probability` chosen gene tokens, 80% become `<mask>`, 10% a
    random gene and 10% stay; labels are IGNORE_INDEX elsewhere. Special tokens are never chosen. Draws only from
    its own generator, so a resumed run reproduces the masks exactly."""

    vocab: list[str]
    mlm_probability: float = 0.15
    pad_to_multiple_of: int = 16
    generator: torch.Generator | None = None
    max_length: int | None = None  # the model's position table (max_position_embeddings): never pad past it

    def __post_init__(self):
        special = [i for i, token in enumerate(self.vocab) if token.startswith("<") and token.endswith(">")]
        self.pad_id, self.mask_id = self.vocab.index("<pad>"), self.vocab.index("<mask>")
        self.special_ids = torch.tensor(special)
        self.first_gene_id = max(special) + 1  # random replacements come from the genes, which follow the specials
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(0)

    def _width(self, longest: int) -> int:
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_length is not None:
            if longest > self.max_length:
                raise ValueError(f"a cell of {longest} tokens is longer than max_length={self.max_length}")
            # The multiple only helps kernels; a width past the position table would index beyond it.
            width = min(width, self.max_length)
        return width

    def __call__(self, cells: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """One cell per row, padded: input_ids, attention_mask (1 = real token), labels; each [cells, width]."""
        input_ids = torch.full((len(cells), self._width(max(len(c) for c in cells))), self.pad_id, dtype=torch.long)
        for row, cell in enumerate(cells):
            input_ids[row, : len(cell)] = torch.from_numpy(np.array(cell, dtype=np.int64))
        return self._mask(input_ids)

    def pack(self, rows: list[list[np.ndarray]]) -> dict[str, torch.Tensor]:
        """Several cells per row, back to back: the padded batch's keys plus `position_ids` (restarting at 0 in each
        cell) and `segment_ids` (1, 2, ... per cell of a row, 0 on padding), each [rows, width]. The model attends
        only within a segment, so each cell is computed as if alone. Masking is drawn per real token as in `__call__`."""
        width = self._width(max(sum(len(cell) for cell in row) for row in rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for segment, cell in enumerate(row, start=1):
                end = start + len(cell)
                input_ids[r, start:end] = torch.from_numpy(np.array(cell, dtype=np.int64))
                position_ids[r, start:end] = torch.arange(len(cell))
                segment_ids[r, start:end] = segment
                start = end
        return {**self._mask(input_ids), "position_ids": position_ids, "segment_ids": segment_ids}

    def _mask(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
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


def batch_token_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, token positions computed) of a batch, padded or packed: what `ThroughputMeter.update(tokens=,
    positions=)` takes, so the logged useful_token_fraction is the share of the compute spent on cells."""
    return int(batch["attention_mask"].sum()), batch["input_ids"].numel()


def batch_cells(batch: dict[str, torch.Tensor]) -> int:
    """Cells in a batch: its rows, or for a packed batch the cells its rows hold (for samples_per_s)."""
    if "segment_ids" not in batch:
        return batch["input_ids"].shape[0]
    return int(batch["segment_ids"].amax(dim=1).sum())
