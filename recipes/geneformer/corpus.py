"""The tokenized corpus on disk: parquet shards that each carry the fingerprint of what made them.

    out_dir/cells.parquet/part-<file>-<block>.parquet   input_ids list<uint16|uint32>, length int32, cell_id string
    out_dir/vocab.txt, out_dir/gene_medians.json, out_dir/metadata.json

Every shard's parquet schema metadata (key `geneformer`) holds the fingerprint: format version, style, max length,
sha256 of the vocabulary and gene-median files, special-token ids, id dtype, the largest token id (the range check
done once, at preprocessing) and the shard's cell and token counts. `metadata.json` repeats the fingerprint with the
corpus totals and a report per input file. A directory named `cells.parquet` is a parquet dataset that pyarrow,
pandas, Spark and DuckDB read as one table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dictionaries import DataError

FORMAT = "geneformer-rank-value"
FORMAT_VERSION = 2
METADATA_KEY = b"geneformer"
CELL_ID_COLUMN = "cell_id"
ROW_GROUP_CELLS = 2048
# Fields two shards of one corpus share; a consumer compares these (per-shard counts differ).
FINGERPRINT_FIELDS = (
    "format",
    "format_version",
    "style",
    "max_length",
    "vocab_file",
    "vocab_sha256",
    "vocab_size",
    "gene_medians_sha256",
    "special_token_ids",
    "id_dtype",
    "keep_version",
)


def id_type(vocab_size: int) -> pa.DataType:
    """The smallest unsigned integer type holding every token id (uint16 for Geneformer's 25,426 genes)."""
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def shard_table(cells: list[np.ndarray], cell_ids: list[str], dtype: pa.DataType, metadata: dict) -> pa.Table:
    """Cells as a parquet-ready table; `metadata` (JSON) goes into the schema under METADATA_KEY."""
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int32, count=len(cells))
    offsets = np.zeros(len(cells) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(cells) if cells else np.zeros(0, dtype=np.int64)
    input_ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype.to_pandas_dtype())))
    table = pa.table(
        {"input_ids": input_ids, "length": pa.array(lengths), CELL_ID_COLUMN: pa.array(cell_ids, type=pa.string())}
    )
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write to a temporary name and rename, so a crash never leaves a half-written parquet under the final name.

    Row groups of ROW_GROUP_CELLS: a reader decodes one group at a time, so this bounds its memory (~8 MB of
    uint16 ids at 2,048 tokens per cell) whatever the shard size."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_CELLS)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    """Same as write_parquet_atomic for small text files."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_shards(path: Path) -> list[Path]:
    """One parquet file, or the parquet files of a directory (sorted; names starting with '.' or '_' skipped);
    preprocess.py's --out-dir stands for its cells.parquet/ directory."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such data file")
    if (path / "cells.parquet").is_dir():
        return list_shards(path / "cells.parquet")
    shards = sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith((".", "_")))
    if not shards:
        raise DataError(f"{path}: a directory without parquet shards (*.parquet) or a datasets state.json")
    return shards


def read_shard_metadata(path: Path) -> dict | None:
    """A shard's recorded fingerprint, or None for files written without one (older outputs, other tools)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception as error:  # pyarrow raises several types for a non-parquet file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path}: not a readable parquet file ({reason})") from None
    if METADATA_KEY not in metadata:
        return None
    try:
        return json.loads(metadata[METADATA_KEY])
    except ValueError:
        raise DataError(f"{path}: its '{METADATA_KEY.decode()}' schema metadata is not JSON") from None


def fingerprint(metadata: dict) -> dict:
    """The fields of a metadata record that every shard of one corpus shares."""
    return {key: metadata.get(key) for key in FINGERPRINT_FIELDS}
