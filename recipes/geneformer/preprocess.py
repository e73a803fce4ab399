"""Rank-value tokenizer: cell x gene count files (.h5ad, .loom, .parquet, .csv) -> a sharded Geneformer corpus.

Each cell's counts are divided by the cell's total counts (x 10,000) and by each gene's non-zero median across the
corpus; the expressed genes are then ranked by that value, highest first, and truncated to the context length.

    python preprocess.py counts.h5ad --out-dir data/my_corpus              # builds vocab.txt + gene_medians.json
    python preprocess.py 'raw/*.h5ad' --out-dir data/big --num_proc 16 \
        --token-dictionary token_dictionary.pkl --gene-median-dictionary gene_median_dictionary.pkl

Writes `cells.parquet/` (a directory of shards, see corpus.py), `vocab.txt`, `gene_medians.json` and `metadata.json`
into --out-dir, all at once at the end (nothing is left there when it fails). The output is a pure function of the
inputs and settings: rebuilding, with any --num_proc, gives identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from biorecipes_shared import run_cli
from corpus import FORMAT, FORMAT_VERSION, id_type, shard_table, write_parquet_atomic
from dictionaries import (  # noqa: F401  (DataError and read_vocab are imported from here by train.py and data.py)
    CLS,
    EOS,
    SPECIAL_TOKENS,
    DataError,
    file_sha256,
    read_gene_medians,
    read_vocab,
)
from readers import expand_inputs, open_source
from tokenize_cells import Encoder, GeneColumns, MedianAccumulator, lookup_tables, nonzero_values, normalise

log = logging.getLogger("geneformer.preprocess")
CELLS_PER_SHARD = 10_000  # one read block = one output shard: ~40 MB of uint16 tokens at 2,048 tokens per cell


@dataclass
class Job:
    """Everything a worker needs to tokenize any block of any input file."""

    sources: list
    columns: list[GeneColumns]
    cells_per_shard: int
    encoders: list[Encoder] | None = None  # None during the medians pass
    dtype_name: str = "uint16"
    shard_dir: Path | None = None
    shard_metadata: dict | None = None


def build_vocab(gene_medians: dict[str, float], style: str) -> list[str]:
    """Special tokens first, then the genes in sorted order (so the ids do not depend on the input's column order)."""
    return SPECIAL_TOKENS[style] + sorted(gene_medians)


def plan_blocks(sources: list, cells_per_shard: int) -> list[tuple[int, int, int]]:
    """(file index, first row, end row) of every block; fixed by the inputs alone, never by the number of workers."""
    return [
        (index, start, min(start + cells_per_shard, source.n_rows))
        for index, source in enumerate(sources)
        for start in range(0, source.n_rows, cells_per_shard)
    ]


def compute_medians(job: Job, num_proc: int) -> dict[str, float]:
    """Non-zero median of each gene's normalised expression over every input (a first pass over the corpus; the
    blocks are read on num_proc processes, the values gathered here)."""
    accumulator = MedianAccumulator()
    units = plan_blocks(job.sources, job.cells_per_shard)
    for (index, _, _), (column, values) in zip(units, run_blocks(job, median_block, units, num_proc)):
        accumulator.add_values(job.columns[index], column, values)
    return accumulator.medians()


def median_block(unit: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(gene column, normalised value) of every non-zero count of one block."""
    index, start, stop = unit
    block = _JOB.sources[index].read_block(start, stop)
    merged = _JOB.columns[index].apply(block.counts)
    return nonzero_values(normalise(merged, block.totals, block.cell_ids, str(_JOB.sources[index].path)))


_JOB: Job | None = None
_NEXT = None  # multiprocessing.Value shared by the processes of run_blocks: index of the next unclaimed block


def _set_job(job: Job, next_block=None) -> None:
    global _JOB, _NEXT
    _JOB, _NEXT = job, next_block


def tokenize_block(unit: tuple[int, int, int]) -> dict:
    """Tokenize one block into its own shard (skipped when no cell survives); returns the block's counters."""
    index, start, stop = unit
    job, source = _JOB, _JOB.sources[unit[0]]
    block = source.read_block(start, stop)
    merged = job.columns[index].apply(block.counts)
    unmapped, total = job.encoders[index].unmapped_counts(merged)
    cells, kept = job.encoders[index].encode(normalise(merged, block.totals, block.cell_ids, str(source.path)))
    stats = {
        "cells_read": stop - start,
        "cells_filtered": block.n_filtered,
        "cells_dropped": int((~kept).sum()),
        "cells": len(cells),
        "tokens": int(sum(len(c) for c in cells)),
        "unmapped_counts": unmapped,
        "total_counts": total,
    }
    if cells:
        ids = [cell_id for cell_id, keep in zip(block.cell_ids, kept) if keep]
        metadata = {**job.shard_metadata, "cells": stats["cells"], "tokens": stats["tokens"]}
        table = shard_table(cells, ids, pa.type_for_alias(job.dtype_name), metadata)
        write_parquet_atomic(table, job.shard_dir / f"part-{index:05d}-{start // job.cells_per_shard:06d}.parquet")
    return stats


def run_blocks(job: Job, work, units: list[tuple[int, int, int]], num_proc: int) -> list:
    """`work(unit)` for every block, results in unit order, on num_proc processes: this one and num_proc - 1 workers,
    each claiming the next block from a shared counter (so a slow or late-starting process takes fewer blocks) and
    reading and writing it itself; only counters come back. Workers are spawned (h5py handles and pyarrow threads do
    not survive a fork), and are this process' children, so its rusage counts their CPU time."""
    if num_proc <= 1 or len(units) <= 1:
        _set_job(job)
        return [work(unit) for unit in units]
    context = multiprocessing.get_context("spawn")
    next_block = context.Value("q", 0)
    helpers = min(num_proc, len(units)) - 1
    with ProcessPoolExecutor(helpers, mp_context=context, initializer=_set_job, initargs=(job, next_block)) as pool:
        futures = [pool.submit(_drain, work, units) for _ in range(helpers)]
        _set_job(job, next_block)
        try:
            outcomes, cpu = _drain(work, units)
        finally:
            with next_block.get_lock():  # an interrupt here: the workers claim nothing more
                next_block.value = len(units)
        shares = [(len(outcomes), cpu)]
        for future in futures:
            theirs, cpu = future.result()
            outcomes += theirs
            shares.append((len(theirs), cpu))
    # bench_scale.py reads this line: per-process CPU shows the balance whatever else the machine runs
    log.info(
        f"blocks per process: {[n for n, _ in shares]}; CPU seconds per process: {[round(c, 2) for _, c in shares]}"
    )
    failed = sorted((index, error) for index, _, error in outcomes if error is not None)
    if failed:
        raise failed[0][1]  # the first failing block in unit order: the error one process would have stopped at
    return [result for _, result, _ in sorted(outcomes, key=lambda outcome: outcome[0])]


def _drain(work, units: list) -> tuple[list[tuple[int, object, Exception | None]], float]:
    """(index, result, None) for each block this process claims until none is left, or (index, None, error) for a
    failed one, after which no process claims another (blocks already claimed finish, so every block before the
    first failure is done); and this process' CPU seconds so far."""
    done = []
    while True:
        with _NEXT.get_lock():
            index = _NEXT.value
            _NEXT.value = index + 1
        if index >= len(units):
            return done, time.process_time()
        try:
            done.append((index, work(units[index]), None))
        except Exception as error:  # DataError, OSError, ...: reported by the parent in unit order
            with _NEXT.get_lock():
                _NEXT.value = len(units)
            return done + [(index, None, error)], time.process_time()


def summarise(sources: list, encoders: list[Encoder], stats: list[dict], units: list, max_unmapped: float) -> list:
    """Per input file: its counters, logged; DataError when too much of it falls outside the vocabulary."""
    reports = []
    for index, source in enumerate(sources):
        mine = [s for s, unit in zip(stats, units) if unit[0] == index]
        report = {"path": str(source.path), **{k: sum(s[k] for s in mine) for k in mine[0]}}
        report["genes"], report["unmapped_genes"] = len(encoders[index].column_token), encoders[index].n_unmapped
        fraction = report["unmapped_counts"] / report["total_counts"] if report["total_counts"] else 0.0
        report["unmapped_count_fraction"] = round(fraction, 6)
        if report["unmapped_genes"]:
            log.info(
                f"{source.path}: {report['unmapped_genes']} of {report['genes']} genes ({fraction:.1%} of counts) "
                "are not in the vocabulary / median dictionary and are left out"
            )
        if fraction > max_unmapped:
            raise DataError(
                f"{source.path}: {fraction:.1%} of counts are in genes outside the vocabulary ({report['unmapped_genes']}"
                f" of {report['genes']} genes), above --max-unmapped-fraction {max_unmapped}; check the gene ids "
                "(Ensembl ids, species, --gene-id-column) or raise the limit"
            )
        if report["cells_filtered"]:
            log.info(f"{source.path}: kept the cells with filter_pass == 1, dropped {report['cells_filtered']}")
        if report["cells_dropped"]:
            log.warning(
                f"{source.path}: dropped {report['cells_dropped']} of {report['cells_read']} cells that express no "
                "gene of the vocabulary"
            )
        reports.append(report)
    return reports


def check_settings(style: str, max_length: int, max_unmapped: float, num_proc: int, cells_per_shard: int) -> None:
    """DataError for settings no input can satisfy, before any file is read."""
    if style not in SPECIAL_TOKENS:
        raise DataError(f"unknown token style {style!r} (expected one of {sorted(SPECIAL_TOKENS)})")
    shortest = {"v1": 1, "v2": 3}[style]  # v2 needs room for <cls>, one gene and <eos>
    if max_length < shortest:
        raise DataError(f"--max-length {max_length} is too small: style {style} needs at least {shortest} tokens")
    if not 0 <= max_unmapped <= 1:
        raise DataError(f"--max-unmapped-fraction {max_unmapped} must be between 0 and 1")
    if num_proc < 1 or cells_per_shard < 1:
        raise DataError("--num_proc and --cells-per-shard must be at least 1")


def load_dictionaries(vocab_path, medians_path, job: Job, style: str, num_proc: int):
    """(vocabulary, gene medians): the given files, else computed from the corpus."""
    medians = read_gene_medians(medians_path) if medians_path is not None else compute_medians(job, num_proc)
    vocab = read_vocab(vocab_path) if vocab_path is not None else build_vocab(medians, style)
    if style == "v2" and (CLS not in vocab or EOS not in vocab):
        raise DataError(f"{vocab_path}: style v2 needs {CLS} and {EOS} in the vocabulary")
    return vocab, medians


def corpus_metadata(vocab_text: str, medians_text: str, vocab: list[str], style: str, **extra) -> dict:
    """The fingerprint every shard and metadata.json carry (see corpus.py)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "style": style,
        "vocab_file": "vocab.txt",  # relative to out_dir, so a corpus can be moved
        "vocab_sha256": hashlib.sha256(vocab_text.encode()).hexdigest(),
        "vocab_size": len(vocab),
        "gene_medians_sha256": hashlib.sha256(medians_text.encode()).hexdigest(),
        "special_token_ids": {t: i for i, t in enumerate(vocab) if t.startswith("<") and t.endswith(">")},
        "id_dtype": str(id_type(len(vocab))),
        "max_token_id": len(vocab) - 1,
        **extra,
    }


def preprocess(
    counts_path,
    out_dir: str | Path,
    vocab_path: str | Path | None = None,
    gene_medians_path: str | Path | None = None,
    max_length: int = 2048,
    style: str = "v1",
    gene_id_column: str | None = None,
    *,
    num_proc: int = 1,
    keep_version: bool = False,
    max_unmapped_fraction: float = 0.5,
    cells_per_shard: int = CELLS_PER_SHARD,
) -> Path:
    """Tokenize count files (paths, directories or globs; one or a list) into `out_dir`; returns `out_dir/cells.parquet`.

    Raises DataError (bad input or settings; nothing is written) or OSError."""
    check_settings(style, max_length, max_unmapped_fraction, num_proc, cells_per_shard)
    job = open_inputs(counts_path, gene_id_column, keep_version, cells_per_shard)
    vocab, medians = load_dictionaries(vocab_path, gene_medians_path, job, style, num_proc)
    tables = lookup_tables(vocab, medians, keep_version)
    job.encoders = [Encoder.of(c.genes, vocab, medians, style, max_length, keep_version, tables) for c in job.columns]
    for source, encoder in zip(job.sources, job.encoders):
        if encoder.n_unmapped == len(encoder.column_token):
            raise DataError(f"{source.path}: none of the genes is in the vocabulary / median dictionary")
    vocab_text = "\n".join(vocab) + "\n"
    medians_text = json.dumps(medians, indent=0, sort_keys=True) + "\n"
    out_dir = Path(out_dir)
    metadata = corpus_metadata(vocab_text, medians_text, vocab, style, max_length=max_length, keep_version=keep_version)
    tmp = out_dir.absolute().with_name(f".{out_dir.absolute().name}.tmp-{os.getpid()}")
    try:
        (tmp / "cells.parquet").mkdir(parents=True)
        job.dtype_name, job.shard_dir, job.shard_metadata = str(id_type(len(vocab))), tmp / "cells.parquet", metadata
        units = plan_blocks(job.sources, cells_per_shard)
        stats = run_blocks(job, tokenize_block, units, num_proc)
        reports = summarise(job.sources, job.encoders, stats, units, max_unmapped_fraction)
        totals = {key: sum(r[key] for r in reports) for key in ("cells", "tokens")}
        if totals["cells"] == 0:
            raise DataError(f"{job.sources[0].path}: no cell expresses a gene of the vocabulary; nothing to write")
        sources_info = {"inputs": reports, "gene_medians_source": str(gene_medians_path or "computed from the inputs")}
        summary = {**metadata, **totals, "vocab_source": str(vocab_path or "built from the inputs"), **sources_info}
        (tmp / "vocab.txt").write_text(vocab_text)
        (tmp / "gene_medians.json").write_text(medians_text)
        (tmp / "metadata.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / "cells.parquet"


def tokenize_file(
    path: str | Path,
    vocab: list[str],
    gene_medians: dict[str, float],
    max_length: int,
    style: str,
    gene_id_column: str | None = None,
    keep_version: bool = False,
) -> tuple[list[np.ndarray], list[str]]:
    """Rank-value encode one count file in memory, exactly as preprocess() would (for embedding a few cells).

    Returns (token ids per kept cell, int64; their cell ids): cells failing filter_pass or without a vocabulary gene
    are left out. Raises DataError like preprocess()."""
    check_settings(style, max_length, 0.5, 1, CELLS_PER_SHARD)
    source = open_source(Path(path), gene_id_column)
    columns = GeneColumns.of(source.gene_ids, keep_version)
    encoder = Encoder.of(columns.genes, vocab, gene_medians, style, max_length, keep_version)
    cells, ids = [], []
    for start in range(0, source.n_rows, CELLS_PER_SHARD):
        block = source.read_block(start, min(start + CELLS_PER_SHARD, source.n_rows))
        merged = columns.apply(block.counts)
        tokens, kept = encoder.encode(normalise(merged, block.totals, block.cell_ids, str(source.path)))
        cells += tokens
        ids += [cell_id for cell_id, keep in zip(block.cell_ids, kept) if keep]
    return cells, ids


def open_inputs(counts_path, gene_id_column: str | None, keep_version: bool, cells_per_shard: int) -> Job:
    """Readers and gene columns of every input file (paths, directories or globs); DataError for unusable ones."""
    inputs = counts_path if isinstance(counts_path, (list, tuple)) else [counts_path]
    sources = [open_source(path, gene_id_column) for path in expand_inputs(inputs)]
    for source in sources:
        if source.n_rows == 0 or not source.gene_ids:
            raise DataError(f"{source.path}: no cells or no genes ({source.n_rows} x {len(source.gene_ids)})")
    columns = [GeneColumns.of(source.gene_ids, keep_version) for source in sources]
    for source, column in zip(sources, columns):
        if column.n_repeated:
            log.info(f"{source.path}: summed the counts of {column.n_repeated} repeated gene ids into one column each")
    return Job(sources, columns, cells_per_shard)


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished files into out_dir (a previous corpus there is replaced as a whole)."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    for item in sorted(tmp.iterdir()):
        target = out_dir / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()  # e.g. a single-file cells.parquet written by an older version
        os.replace(item, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("counts", nargs="+", help="count files (.h5ad, .loom, .parquet, .csv), directories or globs")
    parser.add_argument("--out-dir", required=True, help="writes cells.parquet/, vocab.txt, gene_medians.json here")
    parser.add_argument("--vocab", "--token-dictionary", dest="vocab", help="vocab.txt or token_dictionary.pkl")
    parser.add_argument(
        "--gene-medians", "--gene-median-dictionary", dest="gene_medians", help="gene_medians.json or a .pkl dict"
    )
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per cell, special tokens included")
    parser.add_argument("--style", choices=sorted(SPECIAL_TOKENS), default="v1", help="v2 adds <cls> ... <eos>")
    parser.add_argument("--gene-id-column", help="h5ad var column / loom row attribute holding gene ids")
    parser.add_argument("--num_proc", "--num-proc", type=int, default=1, help="worker processes (same output)")
    parser.add_argument("--keep-version", action="store_true", help="keep Ensembl version suffixes (ENSG....7)")
    parser.add_argument(
        "--max-unmapped-fraction", type=float, default=0.5, help="refuse a file with more of its counts outside"
    )
    parser.add_argument("--cells-per-shard", type=int, default=CELLS_PER_SHARD, help="cells read and written at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def run() -> None:
        out = preprocess(
            args.counts,
            args.out_dir,
            args.vocab,
            args.gene_medians,
            args.max_length,
            args.style,
            args.gene_id_column,
            num_proc=args.num_proc,
            keep_version=args.keep_version,
            max_unmapped_fraction=args.max_unmapped_fraction,
            cells_per_shard=args.cells_per_shard,
        )
        print(f"wrote {out}")

    return run_cli(run, user_errors=(DataError,))  # DataError and file-system errors: one line, exit 1


if __name__ == "__main__":
    sys.exit(main())
