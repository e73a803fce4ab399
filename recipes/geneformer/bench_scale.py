"""Data at scale, on CPU: memory of a short training run against corpus size, start-up time, tokenizer throughput.

    python bench_scale.py                     # ~5-10 minutes on 2 loaded cores; writes ~1 GB under a temp dir
    python bench_scale.py --only preprocess --repeats 3   # the 2-vs-1 process ratio of preprocess.py
    python bench_scale.py --only memory       # one section: memory, startup or preprocess

Rows (synthetic corpora built here, never committed; median of --repeats, A/B interleaved):
  peak RSS          ru_maxrss of a 3-step train.py run (own process, cache cold: includes the parquet -> Arrow
                    conversion) on N and 10 x N cells of 2,048 tokens; headline: the 10x / 1x ratio
  start-up          CellDataset open on 1M cells (cold: convert into the cache; warm: map it)
  preprocess        cells/s and input MB/s of preprocess.py on 4 h5ad files x 20,000 cells at --num_proc 1 and 2
                    (interleaved, after a warm-up round; output checked byte-identical), the 2-vs-1 ratio of wall
                    times and from per-process CPU times (the busiest process bounds the wall time on idle cores),
                    and Genecorpus-30M (27.4M cells) on a 32-core node from the measured per-core rate x efficiency
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
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
        "training.max_steps": 3,
        "training.save_every": 1000,
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


def run_preprocess(folder: Path, out: Path, num_proc: int) -> dict[str, float]:
    """One preprocess.py process (as users run it) on folder/part_*.h5ad with the given dictionaries: wall seconds,
    CPU seconds of it and its workers (wait4 counts the joined workers), and the CPU seconds of each process."""
    command = [sys.executable, str(RECIPE_DIR / "preprocess.py"), str(folder / "part_*.h5ad"), "--out-dir", str(out)]
    command += ["--num_proc", str(num_proc), "--vocab", str(folder / "vocab.txt")]
    command += ["--gene-medians", str(folder / "gene_medians.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"preprocess.py failed: {stderr[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    found = re.search(r"CPU seconds per process: \[([^\]]*)\]", stderr)
    workers = [float(x) for x in found.group(1).split(",")[1:]] if found else []
    # this process = all CPU less its workers'; the busiest process bounds the wall time on idle cores
    return {"wall": wall, "cpu": cpu, "critical": max([cpu - sum(workers), *workers])}


def preprocess_rows(root: Path, files: int, cells: int, repeats: int) -> tuple[dict[str, dict], float]:
    """Medians over `repeats` interleaved rounds of preprocess.py at --num_proc 1 and 2 on `files` synthetic h5ad
    files of `cells` cells (default cells per shard); checks that both wrote byte-identical corpora."""
    root.mkdir(parents=True, exist_ok=True)
    paths = synthetic_h5ad(root, files, cells)
    write_vocab(root)
    outputs = {1: root / "out_1", 2: root / "out_2"}
    samples = {1: [], 2: []}
    for repeat in range(repeats + 1):  # round 0 warms the page cache and is not counted
        for num_proc in (1, 2) if repeat % 2 == 0 else (2, 1):
            result = run_preprocess(root, root / "fresh", num_proc)
            shutil.rmtree(outputs[num_proc], ignore_errors=True)
            os.replace(root / "fresh", outputs[num_proc])
            if repeat:
                samples[num_proc].append(result)
    for folder in ("", "cells.parquet"):  # filecmp compares the bytes of files whose size or time differ
        same = filecmp.dircmp(outputs[1] / folder, outputs[2] / folder)
        if same.diff_files or same.left_only or same.right_only:
            raise RuntimeError(f"--num_proc 1 and 2 wrote different corpora: {same.diff_files or same.left_only}")
    medians = {n: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for n, rows in samples.items()}
    return medians, sum(p.stat().st_size for p in paths) / 1e6


def report_preprocess(rows: dict[int, dict], n_cells: int, megabytes: float) -> tuple[float, float]:
    """Rates, the 2-vs-1 ratios (wall, and from per-process CPU times) and the Genecorpus-30M extrapolation from the
    measured per-core rate and 2-process efficiency. Returns (wall ratio, CPU ratio)."""
    for n, row in rows.items():
        print(
            f"{f'preprocess, {n} process' + 'es' * (n > 1):<34} {n_cells / row['wall']:>8.0f} cells/s "
            f"{megabytes / row['wall']:>6.1f} MB/s (wall {row['wall']:.1f} s, CPU {row['cpu']:.1f} s, busiest process "
            f"{row['critical']:.1f} s)"
        )
    wall_ratio = rows[1]["wall"] / rows[2]["wall"]
    cpu_ratio = rows[1]["cpu"] / rows[2]["critical"]  # the speed-up on two cores that nothing else uses
    print(f"{'2 vs 1 process, wall':<34} {wall_ratio:>8.2f}x (target >= 1.5x; byte-identical output checked)")
    print(f"{'2 vs 1 process, from CPU times':<34} {cpu_ratio:>8.2f}x (1-process CPU / busiest of the 2 processes)")
    per_core = n_cells / rows[1]["cpu"]  # start-up included: a lower bound for a long run
    efficiency = min(cpu_ratio / 2, 1.0)
    hours = GENECORPUS_CELLS / (per_core * NODE_CORES * efficiency) / 3600
    print(
        f"Genecorpus-30M ({GENECORPUS_CELLS / 1e6:.1f}M cells) on {NODE_CORES} cores: ~{hours:.2f} h = "
        f"{per_core:.0f} cells/s per core (1-process CPU time) x {NODE_CORES} x {efficiency:.2f} (2-process "
        "efficiency from CPU times), if that efficiency holds at 32 processes; with given --gene-medians"
    )
    return wall_ratio, cpu_ratio


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=5_000, help="cells of the 1x corpus (10x is 10 times that)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--h5ad-files", type=int, default=4)
    parser.add_argument("--h5ad-cells", type=int, default=20_000, help="cells per synthetic h5ad file")
    parser.add_argument("--only", choices=["memory", "startup", "preprocess"], help="run one section")
    args = parser.parse_args(argv)
    run = {name: args.only in (None, name) for name in ("memory", "startup", "preprocess")}
    print(f"Geneformer data at scale, {os.cpu_count()} CPU cores (shared with other jobs), median of {args.repeats}")
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
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
            rows, megabytes = preprocess_rows(root / "h5ad", args.h5ad_files, args.h5ad_cells, args.repeats)
            wall_ratio, cpu_ratio = report_preprocess(rows, args.h5ad_files * args.h5ad_cells, megabytes)
    if run["memory"]:
        ratio = rss["10x"] / rss["1x"]
        print(f"headline: peak RSS {10 * args.cells:,} / {args.cells:,} cells = {ratio:.2f}x (target <= 1.2x)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if run["preprocess"]:
        print(f"headline: preprocess 2 vs 1 process {wall_ratio:.2f}x wall, {cpu_ratio:.2f}x from CPU times")


if __name__ == "__main__":
    main()
