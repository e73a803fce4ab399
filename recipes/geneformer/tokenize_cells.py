"""Rank-value encoding of count blocks, as in the original Geneformer tokenizer.

value = count / n_counts x 10,000 / gene's non-zero median; genes outside the vocabulary and zeros are dropped; genes
are ranked by value, highest first, and cut to the context length. Exactly tied values keep vocabulary order (this
recipe's rule; the original's unstable argsort leaves their order unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from dictionaries import CLS, EOS, DataError, canonical_gene_id, lookup_table, without_version

TARGET_SUM = 10_000  # counts per cell after normalisation, as in the original Geneformer tokenizer


@dataclass
class GeneColumns:
    """A file's gene columns under their canonical ids; repeated ids are summed, as the original tokenizer does."""

    genes: list[str]  # unique canonical ids (for lookups), in first-seen order
    names: list[str]  # each one's first spelling in the file, without a version: what a built vocabulary lists
    merge: sp.csr_matrix | None  # file columns x unique genes (0/1); None when every id is unique
    n_repeated: int  # file columns folded into another column with the same id

    @classmethod
    def of(cls, gene_ids: list[str], keep_version: bool) -> GeneColumns:
        canonical = [canonical_gene_id(g, keep_version) for g in gene_ids]
        position: dict[str, int] = {}
        target = np.array([position.setdefault(g, len(position)) for g in canonical], dtype=np.int64)
        genes = list(position)
        first = {}
        for gene, key in zip(gene_ids, canonical):
            first.setdefault(key, without_version(gene, keep_version))
        names = [first[g] for g in genes]
        if len(genes) == len(canonical):
            return cls(genes, names, None, 0)
        merge = sp.csr_matrix(
            (np.ones(len(canonical)), (np.arange(len(canonical)), target)), shape=(len(canonical), len(genes))
        )
        return cls(genes, names, merge, len(canonical) - len(genes))

    def apply(self, counts: sp.csr_matrix) -> sp.csr_matrix:
        """Cells x file columns -> cells x unique genes."""
        return counts if self.merge is None else sp.csr_matrix(counts @ self.merge)


def normalise(counts: sp.csr_matrix, totals: np.ndarray | None, cell_ids: list[str], source: str) -> sp.csr_matrix:
    """Scale each cell by TARGET_SUM / its total (n_counts when given, else its row sum). A cell without counts
    stays all-zero (it is dropped later); a given n_counts that is missing or not positive for a cell with counts
    is a DataError naming the cell."""
    sums = np.asarray(counts.sum(axis=1)).ravel()
    if totals is None:
        totals = sums
    else:
        totals = np.asarray(totals, dtype=np.float64)
        bad = (sums > 0) & ~(totals > 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"{source}: cell {cell_ids[row]!r} has n_counts {float(totals[row])!r}; it must be positive"
            )
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(sums), where=totals > 0)
    # Each stored count times its row's scale: the same products as diag(scale) @ counts, without a sparse matmul.
    data = counts.data * np.repeat(scale, np.diff(counts.indptr))
    return sp.csr_matrix((data, counts.indices, counts.indptr), shape=counts.shape)


def nonzero_values(normalised: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(gene column, value) of every non-zero entry of a block."""
    coo = normalised.tocoo()
    keep = coo.data > 0
    return coo.col[keep].astype(np.int32), coo.data[keep].astype(np.float64)


@dataclass
class MedianAccumulator:
    """Collects every gene's non-zero normalised values over the blocks seen, for exact medians.

    Memory: 12 bytes per non-zero count of the whole corpus; for corpora beyond that, pass precomputed medians
    (e.g. the published gene_median_dictionary.pkl)."""

    index: dict[str, int] = field(default_factory=dict)  # canonical id -> row of `names`
    names: list[str] = field(default_factory=list)  # first spelling seen of each gene
    genes: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    def add(self, normalised: sp.csr_matrix, columns: GeneColumns) -> None:
        self.add_values(columns, *nonzero_values(normalised))

    def add_values(self, columns: GeneColumns, column: np.ndarray, values: np.ndarray) -> None:
        """Values of one block: `column` indexes `columns.genes`."""
        for gene, name in zip(columns.genes, columns.names):
            if gene not in self.index:
                self.index[gene] = len(self.names)
                self.names.append(name)
        column_index = np.array([self.index[g] for g in columns.genes], dtype=np.int32)
        self.genes.append(column_index[column])
        self.values.append(values)

    def medians(self) -> dict[str, float]:
        """{gene: median of its non-zero normalised values}; genes never expressed are left out."""
        if not self.values:
            return {}
        genes, values = np.concatenate(self.genes), np.concatenate(self.values)
        order = np.lexsort((values, genes))
        genes, values = genes[order], values[order]
        starts = np.flatnonzero(np.r_[True, genes[1:] != genes[:-1]])
        ends = np.r_[starts[1:], len(genes)]
        names = self.names
        # sorted within each gene: the median is the middle value, or the mean of the two middle ones
        middle = (values[starts + (ends - starts - 1) // 2] + values[starts + (ends - starts) // 2]) / 2
        return {names[g]: float(m) for g, m in zip(genes[starts], middle)}


def lookup_tables(vocab: list[str], medians: dict, keep_version: bool) -> tuple[dict, dict]:
    """(canonical gene id -> token id, canonical gene id -> median)."""
    return lookup_table(vocab, keep_version, "vocabulary"), lookup_table(medians, keep_version, "gene medians")


@dataclass
class Encoder:
    """Per unique gene column of one file: its token id (-1: not in the vocabulary or without a median) and median."""

    column_token: np.ndarray
    column_median: np.ndarray
    n_genes: int  # genes kept per cell
    wrap: tuple[int, int] | None  # (<cls>, <eos>) ids for style v2

    @classmethod
    def of(
        cls,
        genes: list[str],
        vocab: list[str],
        medians: dict,
        style: str,
        max_length: int,
        keep_version: bool,
        tables: tuple[dict, dict] | None = None,
    ):
        """`tables`: lookup_tables(vocab, medians, keep_version), when several files share them (built once)."""
        token_of, median_of = tables or lookup_tables(vocab, medians, keep_version)
        usable = [g in token_of and g in median_of for g in genes]
        tokens = np.array([token_of[g] if ok else -1 for g, ok in zip(genes, usable)], dtype=np.int64)
        medians_ = np.array([median_of[g] if ok else 1.0 for g, ok in zip(genes, usable)], dtype=np.float64)
        wrap = (vocab.index(CLS), vocab.index(EOS)) if style == "v2" else None
        return cls(tokens, medians_, max_length - (2 if wrap else 0), wrap)

    @property
    def n_unmapped(self) -> int:
        return int((self.column_token < 0).sum())

    def unmapped_counts(self, counts: sp.csr_matrix) -> tuple[float, float]:
        """(counts in genes outside the vocabulary, all counts) of a block."""
        per_gene = np.asarray(counts.sum(axis=0)).ravel()
        return float(per_gene[self.column_token < 0].sum()), float(per_gene.sum())

    def encode(self, normalised: sp.csr_matrix) -> tuple[list[np.ndarray], np.ndarray]:
        """Token ids per cell (int64) and a mask of the cells kept (a cell with no vocabulary gene is dropped)."""
        cells, kept = [], np.zeros(normalised.shape[0], dtype=bool)
        for row in range(normalised.shape[0]):
            start, end = normalised.indptr[row], normalised.indptr[row + 1]
            columns, values = normalised.indices[start:end], normalised.data[start:end]
            keep = (self.column_token[columns] >= 0) & (values > 0)
            if not keep.any():
                continue
            tokens, scores = self.column_token[columns[keep]], values[keep] / self.column_median[columns[keep]]
            # Highest score first; equal scores in vocabulary (token id) order. lexsort sorts by its last key first.
            ranked = tokens[np.lexsort((tokens, -scores))][: self.n_genes]
            if self.wrap is not None:
                ranked = np.concatenate([[self.wrap[0]], ranked, [self.wrap[1]]])
            cells.append(ranked)
            kept[row] = True
        return cells, kept
