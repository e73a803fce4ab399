"""Scale benchmark of preprocessing (`python bench_scale.py`, also run by `python bench.py`): ~1-2 minutes on 2 cores.

Builds synthetic UniRef-like protein FASTA at 1x and 10x (lognormal lengths, median ~280; in a temp dir, never
committed) and reports:
- peak RSS of the preprocessing CLI at 1x and 10x (each in a fresh wrapper process, read from
  getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest of the CLI and its workers) -> memory must not grow with input;
- throughput (MB/s of FASTA, proteins/s) at 1 and 2 processes, median of --repeats interleaved runs, in-process
  (imports excluded), and the gzip-decode rate of the same input as the ceiling of one reading process;
- the extrapolated wall time for UniRef50 on a 32-core node: the main process (reading, writing) is serial, the
  windows are parallel, so wall ~ max(main CPU time, all CPU time / 32), scaled from the 10x corpus.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPE_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPE_DIR / "src"))

UNIREF50_PROTEINS = 60e6  # UniRef50 release size (approx.); extrapolated per protein from the synthetic corpus
SETTINGS = dict(chunk_size=10_000, shard_size=50_000, max_aa_length=1022, token_budget=16384)


def write_corpus(path: Path, n_proteins: int, seed: int = 0) -> int:
    """A UniRef-like FASTA of n_proteins (60-residue lines, UniRef-style headers); returns its size in bytes."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"LAGVSERTIDPKQNFYMHWC", np.uint8)
    lengths = np.clip(rng.lognormal(np.log(280), 0.6, n_proteins).astype(int), 20, 5000)
    residues = letters[rng.integers(0, 20, int(lengths.sum()))].tobytes()
    with open(path, "wb") as out:
        pos = 0
        for i, length in enumerate(lengths.tolist()):
            seq = residues[pos : pos + length]
            pos += length
            out.write(b">UniRef50_S%08d Synthetic protein n=1 Tax=Synthetic TaxID=0 RepID=S%08d\n" % (i, i))
            out.write(b"\n".join(seq[j : j + 60] for j in range(0, length, 60)) + b"\n")
    return path.stat().st_size


def peak_rss_mib(fasta: Path, out_dir: Path, num_proc: int) -> float:
    """Peak RSS (MiB) of the CLI run in a fresh wrapper process that reports RUSAGE_CHILDREN."""
    cli = [sys.executable, str(RECIPE_DIR / "src" / "data_processing.py"), "--input_fasta", str(fasta)]
    cli += ["--output_dir", str(out_dir), "--num_proc", str(num_proc), "--chunk_size", str(SETTINGS["chunk_size"])]
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *cli], check=True, capture_output=True, text=True)
    shutil.rmtree(out_dir)
    return int(result.stdout.split()[-1]) / 1024  # Linux reports KiB


def timed_runs(fasta: Path, tmp: Path, repeats: int) -> dict[int, dict]:
    """{num_proc: {wall, main_cpu, child_cpu}} medians over interleaved in-process runs."""
    from data_processing import preprocess_fasta

    runs = {1: [], 2: []}
    for rep in range(repeats + 1):  # the first round warms caches and the page cache
        for num_proc in runs:
            out = tmp / f"t{num_proc}"
            self0, child0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            preprocess_fasta(fasta, out, **SETTINGS, max_position_embeddings=1026, progress=False, num_proc=num_proc)
            wall = time.perf_counter() - start
            self1, child1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            shutil.rmtree(out)
            if rep:
                main_cpu = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
                child_cpu = child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime
                runs[num_proc].append((wall, main_cpu, child_cpu))
    return {n: dict(zip(("wall", "main_cpu", "child_cpu"), map(statistics.median, zip(*r)))) for n, r in runs.items()}


def gzip_decode_rate(fasta: Path, tmp: Path) -> float:
    """MB/s (of uncompressed FASTA) at which one process decompresses the gzip of the same input."""
    gz = tmp / (fasta.name + ".gz")
    gz.write_bytes(gzip.compress(fasta.read_bytes(), compresslevel=6))
    start = time.perf_counter()
    with gzip.open(gz, "rb") as handle:
        while handle.read(1 << 22):
            pass
    return fasta.stat().st_size / 1e6 / (time.perf_counter() - start)


def run(n_proteins: int, repeats: int) -> dict:
    """All figures of the scale section, as a dict (printed by main, read by bench.py)."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        sizes = {}
        for scale in (1, 10):
            sizes[scale] = write_corpus(tmp / f"x{scale}.fasta", n_proteins * scale, seed=scale)
        rss = {scale: peak_rss_mib(tmp / f"x{scale}.fasta", tmp / f"rss{scale}", 2) for scale in (1, 10)}
        timing = timed_runs(tmp / "x10.fasta", tmp, repeats)
        ceiling = gzip_decode_rate(tmp / "x10.fasta", tmp)
    mb, proteins = sizes[10] / 1e6, n_proteins * 10
    two = timing[2]
    # Serial part: the main process's own CPU time; the rest (windows) spreads over the cores.
    scale_up = UNIREF50_PROTEINS / proteins
    wall_32 = max(two["main_cpu"], (two["main_cpu"] + two["child_cpu"]) / 32) * scale_up
    return {
        "corpus_mb": {s: round(b / 1e6, 1) for s, b in sizes.items()},
        "peak_rss_mib": rss,
        "mb_per_s": {n: mb / t["wall"] for n, t in timing.items()},
        "proteins_per_s": {n: proteins / t["wall"] for n, t in timing.items()},
        "speedup_2_vs_1": timing[1]["wall"] / timing[2]["wall"],
        "gzip_decode_mb_per_s": ceiling,
        "uniref50_gb": sizes[10] * scale_up / 1e9,
        "uniref50_hours_1_core": timing[1]["wall"] * scale_up / 3600,
        "uniref50_hours_32_cores": wall_32 / 3600,
        "main_cpu_share": two["main_cpu"] / (two["main_cpu"] + two["child_cpu"]),
        # what 2 idle cores would give: 1-process CPU time over the busier of (main, half of all 2-process CPU)
        "cpu_bound_speedup_2": timing[1]["main_cpu"] / max(two["main_cpu"], (two["main_cpu"] + two["child_cpu"]) / 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="esm2_fa preprocessing scale benchmark")
    parser.add_argument("--proteins", type=int, default=20_000, help="proteins in the 1x corpus (10x: ten times)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    r = run(args.proteins, args.repeats)
    print(f"\nscale: synthetic UniRef-like FASTA, 1x = {r['corpus_mb'][1]} MB, 10x = {r['corpus_mb'][10]} MB")
    print(
        f"  peak RSS (largest process, 2 procs): 1x {r['peak_rss_mib'][1]:.0f} MiB, 10x {r['peak_rss_mib'][10]:.0f} MiB"
    )
    for n in (1, 2):
        print(f"  {n} process(es): {r['mb_per_s'][n]:.1f} MB/s, {r['proteins_per_s'][n]:,.0f} proteins/s (10x)")
    print(
        f"  2 vs 1 processes: {r['speedup_2_vs_1']:.2f}x wall (machine load), {r['cpu_bound_speedup_2']:.2f}x from CPU"
        f" times (2 idle cores); main process share of CPU {r['main_cpu_share']:.0%}"
    )
    print(f"  ceiling: gzip decode of the same input {r['gzip_decode_mb_per_s']:.0f} MB/s (one process)")
    print(
        f"  UniRef50 (~{UNIREF50_PROTEINS / 1e6:.0f}M proteins, ~{r['uniref50_gb']:.0f} GB of FASTA): "
        f"{r['uniref50_hours_1_core']:.2f} h on 1 core, ~{r['uniref50_hours_32_cores']:.2f} h on 32 cores"
    )
    print("  " + json.dumps({k: v for k, v in r.items()}, default=str))
    return r


if __name__ == "__main__":
    main()
