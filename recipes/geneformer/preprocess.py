"""Rank-value tokenizer: a cell x gene count matrix (.h5ad, .parquet or .csv) -> Geneformer token parquet.

Each cell's counts are divided by the cell's total counts (x 10,000) and by each gene's non-zero median across the
corpus; the expressed genes are then ranked by that value, highest first, and truncated to the context length.

    python preprocess.py counts.h5ad --out-dir data/my_corpus              # builds vocab.txt + gene_medians.json
    python preprocess.py more.h5ad --out-dir data/more --vocab data/my_corpus/vocab.txt \
        --gene-medians data/my_corpus/gene_medians.json                    # reuse a corpus' vocabulary and medians

Writes `cells.parquet` (`input_ids` list<int32>, `length` int32, `cell_id`), `vocab.txt` (special tokens first, one
token per line) and `gene_medians.json`. The output is a pure function of the input: rebuilding gives identical files.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm import tqdm

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = {"v1": [PAD, MASK], "v2": [PAD, MASK, CLS, EOS]}
TARGET_SUM = 10_000  # counts per cell after normalisation, as in the original Geneformer tokenizer
CELL_ID_COLUMN = "cell_id"
# pandas' name for a column without a header, e.g. the index written by DataFrame.to_csv() without index=False.
UNNAMED_COLUMN = re.compile(r"Unnamed: \d+")


class DataError(ValueError):
    """A problem with the user's data files (counts, vocabulary, tokens); the message names the file and record."""


@dataclass
class CountMatrix:
    """Raw counts of one file: cells x genes (CSR, float64), with gene and cell identifiers."""

    counts: sp.csr_matrix
    gene_ids: list[str]
    cell_ids: list[str]
    source: str


def _is_raw_counts(matrix) -> bool:
    """True when every stored value is a non-negative integer (what raw UMI / read counts look like)."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return True
    return bool(np.all(values >= 0) and np.all(np.abs(values - np.round(values)) < 1e-6))


def _unreadable(path: Path, kind: str, error: Exception) -> DataError:
    """The reader's own message can span lines and omit the file name: keep its first line, name the file."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return DataError(f"{path}: not a readable {kind} file ({reason})")


def read_h5ad(path: Path, gene_id_column: str | None = None) -> CountMatrix:
    """Read raw counts from an h5ad: `layers['counts']`, else `raw.X`, else `X` — the first holding integer counts."""
    import anndata

    try:
        adata = anndata.read_h5ad(path)
    except Exception as error:  # h5py and anndata raise OSError, KeyError, TypeError... for damaged files
        raise _unreadable(path, "h5ad", error) from None
    candidates = []
    if "counts" in adata.layers:
        candidates.append(("layers['counts']", adata.layers["counts"], adata.var))
    if adata.raw is not None:
        candidates.append(("raw.X", adata.raw.X, adata.raw.var))
    candidates.append(("X", adata.X, adata.var))
    usable = [(matrix, var) for _, matrix, var in candidates if matrix is not None and _is_raw_counts(matrix)]
    if not usable:
        tried = ", ".join(where for where, _, _ in candidates)
        raise DataError(
            f"{path}: no raw counts found ({tried} hold non-integer or negative values, e.g. log-normalised data); "
            "store integer counts in X or layers['counts']"
        )
    matrix, var = usable[0]
    if gene_id_column is None:
        gene_ids = [str(g) for g in var.index]
    elif gene_id_column in var.columns:
        gene_ids = [str(g) for g in var[gene_id_column]]
    else:
        raise DataError(f"{path}: gene id column {gene_id_column!r} not in var (has {list(var.columns)})")
    counts = sp.csr_matrix(matrix, dtype=np.float64)
    return CountMatrix(counts, gene_ids, [str(c) for c in adata.obs_names], str(path))


def read_table(path: Path) -> CountMatrix:
    """Read a dense table of counts (parquet or CSV): one row per cell, one column per gene, optional `cell_id`."""
    import pandas as pd

    kind = path.suffix.lstrip(".")
    try:
        frame = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path)
    except Exception as error:  # EmptyDataError, ParserError, ArrowInvalid, UnicodeDecodeError, ...
        raise _unreadable(path, kind, error) from None
    if kind != "parquet":
        # pandas renames a repeated header (A, A.1), which would hide a duplicated gene: read the raw header row.
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), [])
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise DataError(f"{path}: duplicate gene ids {repeated[:3]}; make them unique (e.g. use Ensembl ids)")
    unnamed = [str(c) for c in frame.columns if UNNAMED_COLUMN.fullmatch(str(c))]
    if unnamed:
        # Refused, not dropped: it is usually a saved index, which may hold the cell ids the user wants to keep.
        raise DataError(
            f"{path}: column {unnamed[0]!r} has no header (a saved DataFrame index?); write the table with "
            f"to_csv(index=False), or name the column {CELL_ID_COLUMN!r} if it holds cell ids"
        )
    if CELL_ID_COLUMN in frame.columns:
        ids = frame.pop(CELL_ID_COLUMN)
        if ids.isna().any():
            raise DataError(f"{path}: row {int(np.argmax(ids.isna()))} has no {CELL_ID_COLUMN}")
        cell_ids = ids.astype(str).tolist()
    else:
        cell_ids = [str(i) for i in range(len(frame))]
    if frame.empty:  # checked before the dtypes: the columns of a header-only CSV read as text
        raise DataError(f"{path}: no cells or no genes ({frame.shape[0]} x {frame.shape[1]})")
    non_numeric = [c for c in frame.columns if not np.issubdtype(frame[c].dtype, np.number)]
    if non_numeric:
        raise DataError(f"{path}: column {non_numeric[0]!r} is not numeric; every column but cell_id is a gene")
    values = frame.to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        # A short CSV row or an empty field reads as NaN; guessing 0 could hide a truncated or misaligned file.
        row, column = (int(i) for i in np.argwhere(np.isnan(values))[0])
        raise DataError(
            f"{path}: cell {cell_ids[row]!r}, gene {str(frame.columns[column])!r} has no value (empty field or "
            "short row); write 0 for genes without counts"
        )
    if not _is_raw_counts(values):
        row = int(np.argwhere((values < 0) | (np.abs(values - np.round(values)) > 1e-6))[0][0])
        raise DataError(f"{path}: cell {cell_ids[row]!r} has non-integer or negative counts; raw counts needed")
    return CountMatrix(sp.csr_matrix(values), [str(c) for c in frame.columns], cell_ids, str(path))


def read_counts(path: str | Path, gene_id_column: str | None = None) -> CountMatrix:
    """Read a count matrix from .h5ad, .parquet or .csv; raises DataError on anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".h5ad":
        matrix = read_h5ad(path, gene_id_column)
    elif path.suffix in (".parquet", ".csv"):
        matrix = read_table(path)
    else:
        raise DataError(f"{path}: unknown format {path.suffix!r} (expected .h5ad, .parquet or .csv)")
    if matrix.counts.shape[0] == 0 or matrix.counts.shape[1] == 0:
        raise DataError(f"{path}: no cells or no genes ({matrix.counts.shape[0]} x {matrix.counts.shape[1]})")
    if len(set(matrix.gene_ids)) != len(matrix.gene_ids):
        raise DataError(f"{path}: duplicate gene ids; make them unique (e.g. use Ensembl ids)")
    return matrix


def normalise(counts: sp.csr_matrix, source: str, cell_ids: list[str]) -> sp.csr_matrix:
    """Scale each cell to TARGET_SUM total counts; an all-zero cell is an error naming it."""
    totals = np.asarray(counts.sum(axis=1)).ravel()
    empty = np.flatnonzero(totals == 0)
    if empty.size:
        raise DataError(f"{source}: cell {cell_ids[empty[0]]!r} has no counts (empty cell); filter it out first")
    return sp.csr_matrix(sp.diags(TARGET_SUM / totals) @ counts)


def compute_gene_medians(normalised: sp.csr_matrix, gene_ids: list[str]) -> dict[str, float]:
    """Median of each gene's normalised expression over the cells that express it (genes never seen are left out)."""
    by_gene = normalised.tocsc()
    medians = {}
    for column, gene in enumerate(gene_ids):
        values = by_gene.data[by_gene.indptr[column] : by_gene.indptr[column + 1]]
        values = values[values > 0]
        if values.size:
            medians[gene] = float(np.median(values))
    return medians


def build_vocab(gene_medians: dict[str, float], style: str) -> list[str]:
    """Special tokens first, then the genes in sorted order (so the ids do not depend on the input's column order)."""
    return SPECIAL_TOKENS[style] + sorted(gene_medians)


def tokenize_cells(
    normalised: sp.csr_matrix,
    gene_ids: list[str],
    vocab: list[str],
    gene_medians: dict[str, float],
    max_length: int,
    style: str,
    cell_ids: list[str],
    source: str,
) -> list[np.ndarray]:
    """Rank-value encode every cell; ties keep vocabulary order so the result is deterministic."""
    token_of = {token: i for i, token in enumerate(vocab)}
    usable = [g in token_of and g in gene_medians for g in gene_ids]
    column_token = np.array([token_of[g] if ok else -1 for g, ok in zip(gene_ids, usable)], dtype=np.int64)
    column_median = np.array([gene_medians[g] if ok else 1.0 for g, ok in zip(gene_ids, usable)])
    if not any(usable):
        raise DataError(f"{source}: none of the genes is in the vocabulary / median dictionary")
    n_genes = max_length - (2 if style == "v2" else 0)
    cells = []
    for row in tqdm(range(normalised.shape[0]), desc="tokenizing", unit="cell", mininterval=1.0):
        start, end = normalised.indptr[row], normalised.indptr[row + 1]
        columns, values = normalised.indices[start:end], normalised.data[start:end]
        keep = (column_token[columns] >= 0) & (values > 0)
        tokens, scores = column_token[columns[keep]], values[keep] / column_median[columns[keep]]
        if tokens.size == 0:
            raise DataError(f"{source}: cell {cell_ids[row]!r} expresses no gene of the vocabulary (empty cell)")
        # Sort by token id first, then stably by score: equal scores stay in vocabulary order.
        by_token = np.argsort(tokens, kind="stable")
        tokens, scores = tokens[by_token], scores[by_token]
        ranked = tokens[np.argsort(-scores, kind="stable")][:n_genes]
        if style == "v2":
            ranked = np.concatenate([[token_of[CLS]], ranked, [token_of[EOS]]])
        cells.append(ranked.astype(np.int32))
    return cells


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write to a temporary name and rename, so a crash never leaves a half-written parquet under the final name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    """Same as write_parquet_atomic for small text files."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_vocab(path: str | Path) -> list[str]:
    """One token per line, special tokens first."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such vocabulary file")
    tokens = path.read_text().splitlines()
    if not tokens or tokens[0] != PAD or MASK not in tokens:
        raise DataError(f"{path}: a vocabulary starts with {PAD} and contains {MASK}")
    return tokens


def read_gene_medians(path: str | Path) -> dict[str, float]:
    """A JSON object {gene id: non-zero median}, as written by `preprocess`."""
    path = Path(path)
    try:
        medians = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read gene medians ({error})") from None
    if not isinstance(medians, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in medians.values()):
        raise DataError(f"{path}: expected a JSON object of gene id -> positive median")
    return medians


def preprocess(
    counts_path: str | Path,
    out_dir: str | Path,
    vocab_path: str | Path | None = None,
    gene_medians_path: str | Path | None = None,
    max_length: int = 2048,
    style: str = "v1",
    gene_id_column: str | None = None,
) -> Path:
    """Tokenize one count file into `out_dir`; returns the path of the written `cells.parquet`."""
    if style not in SPECIAL_TOKENS:
        raise DataError(f"unknown token style {style!r} (expected one of {sorted(SPECIAL_TOKENS)})")
    shortest = {"v1": 1, "v2": 3}[style]  # v2 needs room for <cls>, one gene and <eos>
    if max_length < shortest:
        raise DataError(f"--max-length {max_length} is too small: style {style} needs at least {shortest} tokens")
    matrix = read_counts(counts_path, gene_id_column)
    normalised = normalise(matrix.counts, matrix.source, matrix.cell_ids)
    if gene_medians_path is not None:
        gene_medians = read_gene_medians(gene_medians_path)
    else:
        gene_medians = compute_gene_medians(normalised, matrix.gene_ids)
    vocab = read_vocab(vocab_path) if vocab_path is not None else build_vocab(gene_medians, style)
    if style == "v2" and (CLS not in vocab or EOS not in vocab):
        raise DataError(f"{vocab_path}: style v2 needs {CLS} and {EOS} in the vocabulary")
    cells = tokenize_cells(
        normalised, matrix.gene_ids, vocab, gene_medians, max_length, style, matrix.cell_ids, matrix.source
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "input_ids": pa.array(cells, type=pa.list_(pa.int32())),
            "length": pa.array([len(c) for c in cells], type=pa.int32()),
            CELL_ID_COLUMN: pa.array(matrix.cell_ids, type=pa.string()),
        }
    )
    write_text_atomic("\n".join(vocab) + "\n", out_dir / "vocab.txt")
    write_text_atomic(json.dumps(gene_medians, indent=0, sort_keys=True) + "\n", out_dir / "gene_medians.json")
    write_parquet_atomic(table, out_dir / "cells.parquet")
    return out_dir / "cells.parquet"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("counts", help="cell x gene raw counts: .h5ad, .parquet or .csv")
    parser.add_argument("--out-dir", required=True, help="writes cells.parquet, vocab.txt, gene_medians.json here")
    parser.add_argument("--vocab", help="reuse this vocab.txt instead of building one from the corpus")
    parser.add_argument("--gene-medians", help="reuse this gene_medians.json instead of computing it")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per cell, special tokens included")
    parser.add_argument("--style", choices=sorted(SPECIAL_TOKENS), default="v1", help="v2 adds <cls> ... <eos>")
    parser.add_argument("--gene-id-column", help="h5ad var column holding gene ids (default: var_names)")
    args = parser.parse_args(argv)
    try:
        out = preprocess(
            args.counts, args.out_dir, args.vocab, args.gene_medians, args.max_length, args.style, args.gene_id_column
        )
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
