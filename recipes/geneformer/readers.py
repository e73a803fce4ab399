"""Count matrices from disk, a block of cells at a time: .h5ad and .loom read lazily, .csv/.parquet tables whole.

h5ad: through anndata's backed machinery (`anndata.io.sparse_dataset` over h5py), so only the rows of one block are
in memory and a file larger than RAM works. The raw counts are `layers['counts']`, else `raw.X`, else `X` (the first
holding integer counts). As in the original Geneformer tokenizer: gene ids come from `var['ensembl_id']` when that
column exists, each cell's total from `obs['n_counts']` when present, and only cells with `obs['filter_pass'] == 1`
are kept when that column exists (1/0 in the encodings users write: bool, int, float, "1"/"true"/"yes", see
filter_mask). Loom files (genes x cells, HDF5) are read the same way from `row_attrs` / `col_attrs` with h5py (loompy
is not a dependency: the layout is three HDF5 groups); tables take `n_counts` and `filter_pass` from columns.
"""

from __future__ import annotations

import abc
import csv
import glob
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from dictionaries import DataError

SUFFIXES = (".h5ad", ".loom", ".parquet", ".csv")
CELL_ID_COLUMN = "cell_id"
FILTER_COLUMN, TOTALS_COLUMN = "filter_pass", "n_counts"  # per-cell columns of the original tokenizer, not genes
# The spellings of a yes/no flag that users' tools write (pandas, R, loompy, hand-made CSVs), compared lower-cased.
PASS_WORDS = {"1": True, "1.0": True, "true": True, "t": True, "yes": True, "y": True}
PASS_WORDS |= {"0": False, "0.0": False, "false": False, "f": False, "no": False, "n": False}
# pandas' name for a column without a header, e.g. the index written by DataFrame.to_csv() without index=False.
UNNAMED_COLUMN = re.compile(r"Unnamed: \d+")
PROBE_ROWS = 2_000  # rows checked to decide which h5ad matrix holds raw counts


@dataclass
class CountBlock:
    """Rows [start, stop) of one file after the `filter_pass` filter: counts (cells x file genes, CSR float64)."""

    counts: sp.csr_matrix
    cell_ids: list[str]
    totals: np.ndarray | None  # per-cell n_counts from the file; None: use the row sums
    n_filtered: int  # cells removed by filter_pass


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named directly, every count file in a named directory, or the matches of a glob; sorted, no repeats."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
            if not matches:
                raise DataError(f"{path}: no {'/'.join(SUFFIXES)} files in this directory")
        elif any(ch in str(item) for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(item)))
            if not matches:
                raise DataError(f"{item}: no file matches this pattern")
        else:
            if not path.is_file():
                raise DataError(f"{path}: no such file")
            matches = [path]
        found.extend(m for m in matches if m not in found)
    if not found:
        raise DataError("no input files given")
    for path in found:
        if path.suffix not in SUFFIXES:
            raise DataError(f"{path}: unknown format {path.suffix!r} (expected {', '.join(SUFFIXES)})")
    return found


def open_source(path: Path, gene_id_column: str | None = None):
    """The reader for one count file, chosen by suffix; raises DataError for unreadable or unusable files."""
    if path.suffix == ".h5ad":
        return H5adSource(path, gene_id_column)
    if path.suffix == ".loom":
        return LoomSource(path, gene_id_column)
    return TableSource(path)


def _unreadable(path: Path, kind: str, error: Exception) -> DataError:
    """The reader's own message can span lines and omit the file name: keep its first line, name the file."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return DataError(f"{path}: not a readable {kind} file ({reason})")


def _bad_counts(values: np.ndarray) -> np.ndarray:
    """Mask of values that are not non-negative integers (raw UMI / read counts are), within 1e-6."""
    return (values < 0) | (np.abs(values - np.round(values)) > 1e-6) | ~np.isfinite(values)


def _all_counts(values: np.ndarray) -> bool:
    """Whether every value is a raw count (no _bad_counts), checked in the stored dtype: the common exact case in
    three passes, integer types by their sign alone; the full mask only for inexact floats."""
    if values.dtype.kind in "ub" or values.size == 0:
        return True
    if values.dtype.kind == "i":
        return bool(values.min() >= 0)
    if bool((values >= 0).all()) and bool((np.rint(values) == values).all()) and bool(np.isfinite(values.max())):
        return True
    return not _bad_counts(values).any()


def filter_mask(values, path: Path) -> np.ndarray:
    """Cells to keep from a `filter_pass` column in any encoding users write: bool, 0/1 (integer or float), or the
    strings 1/0, true/false, t/f, yes/no in any case (plain, bytes or categorical). DataError naming the column, the
    file and the values found for anything else (NaN, empty, 2, 'maybe'): guessing would keep or drop cells silently."""
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(values, copy=False))  # NaN / None / pd.NA -> code -1
    meaning = [_pass_value(value) for value in uniques]
    if (codes < 0).any() or None in meaning:
        found = [repr(_as_text(v)) for v in uniques] + (["nan"] if (codes < 0).any() else [])
        raise DataError(
            f"{path}: {FILTER_COLUMN} holds values other than 1/0, true/false or yes/no (found {', '.join(found[:8])}"
            f"{', ...' if len(found) > 8 else ''}); write 1 for the cells to keep and 0 for the others"
        )
    return np.asarray(meaning, dtype=bool)[codes] if len(codes) else np.zeros(0, dtype=bool)


def _as_text(value):
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _pass_value(value) -> bool | None:
    """True / False for a recognised flag value, None otherwise."""
    value = _as_text(value)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return bool(value) if value in (0, 1) else None
    return PASS_WORDS.get(value.strip().lower()) if isinstance(value, str) else None


def keep_passing(counts, ids: list[str], totals, keep: np.ndarray | None) -> CountBlock:
    """The block of the rows with `keep` (all rows when None)."""
    if keep is None:
        return CountBlock(counts, ids, totals, 0)
    kept_ids = [c for c, k in zip(ids, keep) if k]
    return CountBlock(counts[keep], kept_ids, None if totals is None else totals[keep], int((~keep).sum()))


def check_raw_counts(counts: sp.csr_matrix, cell_ids: list[str], path: Path) -> None:
    """DataError naming the first cell with a negative, fractional or non-finite count."""
    if not _all_counts(counts.data):
        bad = _bad_counts(counts.data)
        row = int(np.searchsorted(counts.indptr, int(np.argmax(bad)), side="right") - 1)
        raise DataError(f"{path}: cell {cell_ids[row]!r} has non-integer or negative counts; raw counts needed")


class _HDF5Source(abc.ABC):
    """Shared by h5ad and loom: per-cell obs columns, the filter, and one h5py handle per process."""

    path: Path
    kind: str
    cell_ids: list[str]
    gene_ids: list[str]
    n_counts: np.ndarray | None
    filter_pass: np.ndarray | None
    _handle = None

    @property
    def n_rows(self) -> int:
        return len(self.cell_ids)

    def __getstate__(self):  # an open h5py handle cannot cross a process boundary: reopen there
        state = dict(self.__dict__)
        state["_handle"] = None
        return state

    def _file(self):
        import h5py

        if self._handle is None:
            try:
                self._handle = h5py.File(self.path, "r")
            except Exception as error:  # OSError for damaged files, ... for other HDF5 failures
                raise _unreadable(self.path, self.kind, error) from None
        return self._handle

    def _set_cells(self, cell_ids, n_counts, filter_pass) -> None:
        self.cell_ids = [str(c) for c in cell_ids]
        self.n_counts = None if n_counts is None else np.asarray(n_counts, dtype=np.float64)
        self.filter_pass = None if filter_pass is None else filter_mask(filter_pass, self.path)

    def read_block(self, start: int, stop: int) -> CountBlock:
        """Rows [start, stop): only the cells passing `filter_pass`, with their n_counts when the file has them."""
        counts = sp.csr_matrix(self._rows(start, stop))
        ids = self.cell_ids[start:stop]
        check_raw_counts(counts, ids, self.path)  # in the stored dtype (often float32 or int32): half the bytes
        counts = counts.astype(np.float64)
        totals = None if self.n_counts is None else self.n_counts[start:stop]
        return keep_passing(counts, ids, totals, None if self.filter_pass is None else self.filter_pass[start:stop])

    @abc.abstractmethod
    def _rows(self, start: int, stop: int):
        """Rows [start, stop) of the count matrix (h5ad and loom store it differently)."""


class H5adSource(_HDF5Source):
    kind = "h5ad"

    def __init__(self, path: Path, gene_id_column: str | None = None):
        from anndata.io import read_elem

        self.path = path
        handle = self._file()
        try:
            obs = read_elem(handle["obs"])
            candidates = [name for name in ("layers/counts", "raw/X", "X") if name in handle]
        except Exception as error:  # a valid HDF5 file that is not an AnnData
            raise _unreadable(path, self.kind, error) from None
        self._set_cells(obs.index, obs.get(TOTALS_COLUMN), obs.get(FILTER_COLUMN))
        self.matrix = None
        for name in candidates:
            self.matrix = name
            probe = sp.csr_matrix(self._rows(0, min(PROBE_ROWS, self.n_rows)))
            if _all_counts(probe.data):
                break
        else:
            tried = ", ".join({"layers/counts": "layers['counts']", "raw/X": "raw.X"}.get(c, c) for c in candidates)
            raise DataError(
                f"{path}: no raw counts found ({tried} hold non-integer or negative values, e.g. log-normalised data); "
                "store integer counts in X or layers['counts']"
            )
        var = read_elem(handle["raw/var" if self.matrix == "raw/X" else "var"])
        self.gene_ids = _gene_ids(path, var, gene_id_column, [str(g) for g in var.index])

    def _rows(self, start: int, stop: int):
        from anndata.io import sparse_dataset

        element = self._file()[self.matrix]
        if hasattr(element, "attrs") and element.attrs.get("encoding-type", "") in ("csr_matrix", "csc_matrix"):
            return sparse_dataset(element)[start:stop]
        return element[start:stop]


class LoomSource(_HDF5Source):
    kind = "loom"

    def __init__(self, path: Path, gene_id_column: str | None = None):
        self.path = path
        handle = self._file()
        if "matrix" not in handle or "row_attrs" not in handle or "col_attrs" not in handle:
            raise DataError(f"{path}: not a loom file (needs /matrix, /row_attrs and /col_attrs)")
        columns = handle["col_attrs"]
        n_cells = handle["matrix"].shape[1]
        ids = _decode(columns["CellID"][:]) if "CellID" in columns else [str(i) for i in range(n_cells)]
        self._set_cells(
            ids,
            columns[TOTALS_COLUMN][:] if TOTALS_COLUMN in columns else None,
            columns[FILTER_COLUMN][:] if FILTER_COLUMN in columns else None,
        )
        rows = handle["row_attrs"]
        names = [gene_id_column] if gene_id_column else ["ensembl_id", "Accession", "Gene"]
        found = next((name for name in names if name in rows), None)
        if found is None:
            raise DataError(f"{path}: no gene id row attribute {names} (has {sorted(rows)})")
        self.gene_ids = _decode(rows[found][:])

    def _rows(self, start: int, stop: int):
        return np.asarray(self._file()["matrix"][:, start:stop]).T


def _decode(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _gene_ids(path: Path, var, gene_id_column: str | None, index: list[str]) -> list[str]:
    """`var[gene_id_column]`, else `var['ensembl_id']` (the original tokenizer's column), else the var names."""
    if gene_id_column is None:
        return [str(g) for g in var["ensembl_id"]] if "ensembl_id" in var.columns else index
    if gene_id_column not in var.columns:
        raise DataError(f"{path}: gene id column {gene_id_column!r} not in var (has {list(var.columns)})")
    return [str(g) for g in var[gene_id_column]]


class TableSource:
    """A dense table (parquet or CSV), one row per cell, one column per gene, read whole. The optional columns
    `cell_id`, `n_counts` and `filter_pass` are per-cell values (as in an h5ad's obs), not genes."""

    def __init__(self, path: Path):
        self.path = path
        self.counts, self.gene_ids, self.cell_ids, per_cell = _read_table(path)
        totals = per_cell.get(TOTALS_COLUMN)
        self.n_counts = None if totals is None else _numeric(totals, TOTALS_COLUMN, path)
        flags = per_cell.get(FILTER_COLUMN)
        self.filter_pass = None if flags is None else filter_mask(flags, path)

    @property
    def n_rows(self) -> int:
        return len(self.cell_ids)

    def read_block(self, start: int, stop: int) -> CountBlock:
        totals = None if self.n_counts is None else self.n_counts[start:stop]
        keep = None if self.filter_pass is None else self.filter_pass[start:stop]
        return keep_passing(self.counts[start:stop], self.cell_ids[start:stop], totals, keep)


def _numeric(column, name: str, path: Path) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        row = int(np.argmax(np.isnan(values)))
        raise DataError(f"{path}: row {row} has {name} {column.iloc[row]!r}, not a number")
    return values


def _read_table(path: Path) -> tuple[sp.csr_matrix, list[str], list[str], dict]:
    """(counts, gene ids, cell ids, {per-cell column name: its values}) of a parquet or CSV table."""
    import pandas as pd

    kind = path.suffix.lstrip(".")
    try:
        frame = pd.read_parquet(path) if kind == "parquet" else pd.read_csv(path)
    except Exception as error:  # EmptyDataError, ParserError, ArrowInvalid, UnicodeDecodeError, ...
        raise _unreadable(path, kind, error) from None
    genes = [str(c) for c in frame.columns]
    if kind == "csv":
        # pandas renames a repeated header (A, A.1): take the names from the raw header row, so repeats are summed.
        with open(path, newline="") as handle:
            genes = next(csv.reader(handle), genes)
    unnamed = [g for g in genes if UNNAMED_COLUMN.fullmatch(g) or g == ""]
    if unnamed:
        # Refused, not dropped: it is usually a saved index, which may hold the cell ids the user wants to keep.
        raise DataError(
            f"{path}: column {'Unnamed: 0' if unnamed[0] == '' else unnamed[0]!r} has no header (a saved DataFrame "
            f"index?); write the table with to_csv(index=False), or name the column {CELL_ID_COLUMN!r} if it holds "
            "cell ids"
        )
    per_cell = {}
    for name in (CELL_ID_COLUMN, TOTALS_COLUMN, FILTER_COLUMN):
        if name in genes:
            position = genes.index(name)
            per_cell[name] = frame.iloc[:, position]
            frame = frame.drop(columns=frame.columns[position])
            del genes[position]
    ids = per_cell.pop(CELL_ID_COLUMN, None)
    if ids is not None and ids.isna().any():
        raise DataError(f"{path}: row {int(np.argmax(ids.isna()))} has no {CELL_ID_COLUMN}")
    cell_ids = [str(i) for i in range(len(frame))] if ids is None else ids.astype(str).tolist()
    if frame.empty:  # checked before the dtypes: the columns of a header-only CSV read as text
        raise DataError(f"{path}: no cells or no genes ({frame.shape[0]} x {frame.shape[1]})")
    non_numeric = [g for g, c in zip(genes, frame.columns) if not np.issubdtype(frame[c].dtype, np.number)]
    if non_numeric:
        raise DataError(f"{path}: column {non_numeric[0]!r} is not numeric; every column but cell_id is a gene")
    values = frame.to_numpy(dtype=np.float64)
    if np.isnan(values).any():
        # A short CSV row or an empty field reads as NaN; guessing 0 could hide a truncated or misaligned file.
        row, column = (int(i) for i in np.argwhere(np.isnan(values))[0])
        raise DataError(
            f"{path}: cell {cell_ids[row]!r}, gene {genes[column]!r} has no value (empty field or "
            "short row); write 0 for genes without counts"
        )
    counts = sp.csr_matrix(values)
    check_raw_counts(counts, cell_ids, path)
    return counts, genes, cell_ids, per_cell
