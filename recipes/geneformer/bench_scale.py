"""Data at scale, on CPU: memory of a short training run against corpus size, start-up time, tokenizer throughput.

    python bench_scale.py                     # ~5-10 minutes on 2 loaded cores; writes ~1 GB under a temp dir
    python bench_scale.py --repeats 3 --cells 2000
    python bench_scale.py --only memory       # one section: memory, startup or preprocess

Rows (synthetic corpora built here, never committed; median of --repeats, A/B interleaved):
  peak RSS          ru_maxrss of a 3-step train.py run (own process, cache cold: includes the parquet -> Arrow
                    conversion) on N and 10 x N cells of 2,048 tokens; headline: the 10x / 1x ratio
  start-up          CellDataset open on 1M cells (cold: convert into the cache; warm: map it)
  preprocess        cells/s and input MB/s of preprocess.py on h5ad files at --num_proc 1 and 2, with the
                    extrapolated wall time for Genecorpus-30M (27.4M cells) on a 32-core node
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

RECIPE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPE_DIR))

from corpus import shard_table, write_parquet_atomic  # noqa: E402
from dictionaries import SPECIAL_TOKENS  # noqa: E402
from preprocess import corpus_metadata  # noqa: E402

N_GENES = 25_424  # Geneformer's 25,426-token vocabulary less <pad> and <mask>
CELL_TOKENS = 2048
GENECORPUS_CELLS = 27_400_000
NODE_CORES = 32


def write_vocab(root: Path) -> tuple[list[str], str, str]:
    vocab = SPECIAL_TOKENS["v1"] + [f"ENSG{i:011d}" for i in range(N_GENES)]
    medians = {gene: 1.0 + (i % 97) / 10 for i, gene in enumerate(vocab[2:])}
    vocab_text, medians_text = "\n".join(vocab) + "\n", json.dumps(medians, indent=0, sort_keys=True) + "\n"
    (root / "vocab.txt").write_text(vocab_text)
    (root / "gene_medians.json").write_text(medians_text)
    return vocab, vocab_text, medians_text


def synthetic_corpus(root: Path, n_cells: int, tokens: int, seed: int = 0) -> Path:
    """n_cells random rank-value cells of `tokens` gene ids in preprocess.py's layout (with its fingerprint)."""
    root.mkdir(parents=True, exist_ok=True)
    vocab, vocab_text, medians_text = write_vocab(root)
    metadata = corpus_metadata(vocab_text, medians_text, vocab, "v1", max_length=tokens, keep_version=False)
    shards = root / "cells.parquet"
    shards.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, start in enumerate(range(0, n_cells, 10_000)):
        count = min(10_000, n_cells - start)
        cells = list(rng.integers(2, len(vocab), size=(count, tokens), dtype=np.int64))
        table = shard_table(
            cells,
            [str(start + i) for i in range(count)],
            pa.uint16(),
            {**metadata, "cells": count, "tokens": count * tokens},
        )
        write_parquet_atomic(table, shards / f"part-00000-{index:06d}.parquet")
    return shards


def train_peak_rss(corpus: Path, work: Path) -> float:
    """GiB: ru_maxrss of one 3-step train.py process (wait4 gives that child's own rusage)."""
    overrides = {
        "data.train_path": corpus,
        "data.vocab_path": corpus.parent / "vocab.txt",
        "data.max_seq_length": CELL_TOKENS,
        "data.micro_batch_size": 2,
        "model.max_position_embeddings": CELL_TOKENS,
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_attention_heads": 2,
        "model.num_hidden_layers": 1,
        "training.num_train_steps": 3,
        "training.save_every_n_steps": 1000,
        "training.log_every_n_steps": 1,
        "training.output_dir": work / "run",
    }
    env = {**os.environ, "GENEFORMER_CACHE_DIR": str(work / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(RECIPE_DIR / "train.py"), *[f"{k}={v}" for k, v in overrides.items()]]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"train.py failed: {process.stderr.read()[-2000:]}")
    return usage.ru_maxrss / 2**20  # Linux: KiB


def interleaved(repeats: int, runs: dict) -> dict[str, float]:
    """Median of each callable over `repeats` rounds, alternating the order every round."""
    times = {name: [] for name in runs}
    for repeat in range(repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(runs[name]())
    return {name: statistics.median(values) for name, values in times.items()}


def memory_rows(root: Path, cells: int, repeats: int) -> dict[str, float]:
    corpora = {
        "1x": synthetic_corpus(root / "1x", cells, CELL_TOKENS),
        "10x": synthetic_corpus(root / "10x", 10 * cells, CELL_TOKENS),
    }
    counter = iter(range(10**6))

    def run(name):
        return lambda: train_peak_rss(corpora[name], root / f"work{next(counter)}")

    return interleaved(repeats, {name: run(name) for name in corpora})


def startup_rows(root: Path, repeats: int) -> dict[str, float]:
    """Seconds to open 1M cells (64 tokens each): cold converts into a fresh cache, warm maps the existing one."""
    from data import CellDataset

    corpus = synthetic_corpus(root / "1m", 1_000_000, 64)
    counter = iter(range(10**6))

    def open_with(cache: Path) -> float:
        start = time.perf_counter()
        dataset = CellDataset(corpus, N_GENES + 2, 2048, cache_dir=cache)
        dataset[len(dataset) - 1]
        return time.perf_counter() - start

    warm_cache = root / "warm_cache"
    open_with(warm_cache)
    return interleaved(
        repeats, {"cold": lambda: open_with(root / f"cold{next(counter)}"), "warm": lambda: open_with(warm_cache)}
    )


def synthetic_h5ad(root: Path, files: int, cells: int, expressed: int = 2_000) -> list[Path]:
    """h5ad files of raw counts over N_GENES genes, `expressed` non-zero genes per cell (Genecorpus-like)."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(1)
    genes = [f"ENSG{i:011d}" for i in range(N_GENES)]
    paths = []
    for index in range(files):
        columns = np.concatenate([np.sort(rng.choice(N_GENES, expressed, replace=False)) for _ in range(cells)])
        counts = rng.geometric(0.4, size=cells * expressed).astype(np.float32)
        indptr = np.arange(0, cells * expressed + 1, expressed)
        matrix = sp.csr_matrix((counts, columns, indptr), shape=(cells, N_GENES))
        obs = pd.DataFrame(index=[f"f{index}c{i}" for i in range(cells)])
        path = root / f"part_{index}.h5ad"
        anndata.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(path)
        paths.append(path)
    return paths


def preprocess_rows(root: Path, files: int, cells: int, repeats: int) -> tuple[dict[str, float], float]:
    """Median seconds of preprocess.py (a fresh process, as users run it) at --num_proc 1 and 2 on the corpus, and on
    a 20-cell input (start-up: imports, worker spawn); returns them and the corpus' input MB."""
    (root / "tiny").mkdir(parents=True, exist_ok=True)
    paths = synthetic_h5ad(root, files, cells)
    synthetic_h5ad(root / "tiny", 2, 10)
    write_vocab(root)
    counter = iter(range(10**6))

    def run(folder: Path, num_proc: int, per_shard: int):
        def once() -> float:
            command = [sys.executable, str(RECIPE_DIR / "preprocess.py"), str(folder / "part_*.h5ad")]
            command += ["--out-dir", str(root / f"out{next(counter)}"), "--num_proc", str(num_proc)]
            command += ["--vocab", str(root / "vocab.txt"), "--gene-medians", str(root / "gene_medians.json")]
            command += ["--cells-per-shard", str(per_shard)]
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            return time.perf_counter() - start

        return once

    per_shard = max(cells // 2, 1)
    runs = {"1 process": run(root, 1, per_shard), "2 processes": run(root, 2, per_shard)}
    runs.update({"start-up, 1 process": run(root / "tiny", 1, 5), "start-up, 2 processes": run(root / "tiny", 2, 5)})
    return interleaved(repeats, runs), sum(p.stat().st_size for p in paths) / 1e6


def report_preprocess(seconds: dict[str, float], n_cells: int, megabytes: float) -> None:
    """Wall-time rates, steady-state rates (start-up subtracted) and the Genecorpus-30M extrapolation."""
    steady = {}
    for name in ("1 process", "2 processes"):
        rate = n_cells / seconds[name]
        work = seconds[name] - seconds[f"start-up, {name}"]
        print(f"{f'preprocess, {name}':<34} {rate:>8.0f} cells/s {megabytes / seconds[name]:>6.1f} MB/s (wall)")
        if work <= 0:
            print(f"{'  without start-up':<34} n/a: the input is too small to tell its work from the start-up")
            continue
        steady[name] = n_cells / work
        print(
            f"{'  without start-up':<34} {steady[name]:>8.0f} cells/s (start-up {seconds[f'start-up, {name}']:.1f} s)"
        )
    if len(steady) < 2:
        return
    efficiency = min(steady["2 processes"] / (2 * steady["1 process"]), 1.0)
    ideal = GENECORPUS_CELLS / (steady["1 process"] * NODE_CORES) / 3600
    print(
        f"Genecorpus-30M ({GENECORPUS_CELLS / 1e6:.1f}M cells) on {NODE_CORES} cores: ~{ideal / efficiency:.1f} h at the "
        f"2-process efficiency measured here ({efficiency:.2f}), ~{ideal:.1f} h if it scales linearly"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=5_000, help="cells of the 1x corpus (10x is 10 times that)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--h5ad-files", type=int, default=4)
    parser.add_argument("--h5ad-cells", type=int, default=5_000, help="cells per synthetic h5ad file")
    parser.add_argument("--only", choices=["memory", "startup", "preprocess"], help="run one section")
    args = parser.parse_args(argv)
    run = {name: args.only in (None, name) for name in ("memory", "startup", "preprocess")}
    print(f"Geneformer data at scale, {os.cpu_count()} CPU cores (shared with other jobs), median of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="geneformer_scale_") as tmp:
        root = Path(tmp)
        if run["memory"]:
            rss = memory_rows(root, args.cells, args.repeats)
            print(f"{f'peak RSS, 3 steps, {args.cells:,} cells':<34} {rss['1x']:>9.2f} GiB")
            print(f"{f'peak RSS, 3 steps, {10 * args.cells:,} cells':<34} {rss['10x']:>9.2f} GiB")
        if run["startup"]:
            startup = startup_rows(root, args.repeats)
            print(f"{'open 1M cells, cold (convert)':<34} {startup['cold']:>10.2f} s")
            print(f"{'open 1M cells, warm (map)':<34} {startup['warm']:>10.2f} s")
        if run["preprocess"]:
            seconds, megabytes = preprocess_rows(root / "h5ad", args.h5ad_files, args.h5ad_cells, args.repeats)
            report_preprocess(seconds, args.h5ad_files * args.h5ad_cells, megabytes)
    if run["memory"]:
        ratio = rss["10x"] / rss["1x"]
        print(f"headline: peak RSS {10 * args.cells:,} / {args.cells:,} cells = {ratio:.2f}x (target <= 1.2x)")


if __name__ == "__main__":
    main()
