"""Scale section of the plant_lm bench (`python bench_scale.py`, or the end of `python bench.py`; ~1 min on 2 cores).

Synthetic random ACGT chromosomes in a temp dir (nothing committed):
1. One-line vs wrapped-at-60 30 Mbp chromosome (`data/species_a/chr1.fa`): chunks, largest chunk, windows, a hash of
   every window, peak RSS. They must be identical (peak RSS within 10%).
2. Peak RSS of one streaming pass at 1x (30 Mbp) and 10x (300 Mbp): it must not grow with the corpus.
3. Throughput (MB/s, windows/s) of one pass with 1 process and with 2 processes (2 ranks of a world of 2: each reads
   the whole genome and keeps every other window), and the gzip-decode throughput of the same file as a ceiling.
4. Extrapolation to real plant genomes (0.1-2.5 Gbp; maize ~2.3 Gbp) on a 32-core node.
Each measurement runs in a fresh process; its peak RSS is the child's ru_maxrss (`os.wait4`, the per-child form of
RUSAGE_CHILDREN), its time the child's own wall clock. Default training settings: context 64, overlap 0.5, 1.2 Mbp chunks.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CONTEXT, OVERLAP, CHUNK = 64, 0.5, 1_200_000
BASE_MBP = 30
REPEATS = 3


def write_chromosome(path: Path, n_bp: int, width: int | None, seed: int = 0) -> Path:
    """A random ACGT chromosome as one record, on one line (`width` None) or `width` bases a line; written in pieces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    piece = 6_000_000  # a multiple of 60: wrapping restarts cleanly at each piece
    with open(path, "wb") as out:
        out.write(b">chr1 synthetic\n")
        for start in range(0, n_bp, piece):
            seq = letters[rng.integers(0, 4, size=min(piece, n_bp - start))]
            if width:
                rows = [seq[i : i + width].tobytes() for i in range(0, len(seq), width)]
                out.write(b"\n".join(rows) + b"\n")
            else:
                out.write(seq.tobytes())
        if not width:
            out.write(b"\n")
    return path


def one_pass(path: str, rank: int, world_size: int) -> dict:
    """Child: stream every window of one pass (rank's share), hashing them; report counts, bytes and seconds."""
    from data import tokenize, window_count, window_stride
    from fasta import stream_chunks

    start = time.perf_counter()
    window_len, stride = CONTEXT + 1, window_stride(CONTEXT, OVERLAP)
    digest, windows, chunks, largest, index = hashlib.sha256(), 0, 0, 0, 0
    for _, chunk in stream_chunks(Path(path), CHUNK):
        chunks, largest = chunks + 1, max(largest, len(chunk))
        for tokens in tokenize(chunk):
            n = window_count(len(tokens), window_len, stride)
            view = np.lib.stride_tricks.sliding_window_view(tokens, window_len)[::stride][:n]
            mine = view[(index + np.arange(n)) % world_size == rank]
            digest.update(np.ascontiguousarray(mine).tobytes())
            windows, index = windows + len(mine), index + n
    seconds = time.perf_counter() - start
    return {
        "windows": windows,
        "chunks": chunks,
        "largest_chunk": largest,
        "sha": digest.hexdigest()[:16],
        "s": seconds,
    }


def gunzip_pass(path: str) -> dict:
    """Child: decompress the file in 1 MiB blocks (the ceiling of any reader of it)."""
    start = time.perf_counter()
    with gzip.open(path, "rb") as handle:
        while handle.read(1 << 20):
            pass
    return {"s": time.perf_counter() - start}


def spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=HERE)


def collect(proc: subprocess.Popen) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    if proc.returncode:
        raise RuntimeError(f"bench child {proc.args} failed with {proc.returncode}")
    return {**result, "rss_mib": usage.ru_maxrss / 1024}


def measure(args: list[str]) -> dict:
    return collect(spawn(args))


def measure_parallel(path: Path) -> dict:
    """Two ranks streaming at once; wall time is the slower rank."""
    procs = [spawn(["--pass", str(path), str(rank), "2"]) for rank in range(2)]
    results = [collect(p) for p in procs]
    return {"s": max(r["s"] for r in results), "windows": sum(r["windows"] for r in results)}


def main() -> dict:
    with tempfile.TemporaryDirectory(prefix="plant_scale_") as tmp:
        root = Path(tmp) / "data"
        n_bp = BASE_MBP * 1_000_000
        one_line = write_chromosome(root / "species_a" / "chr1.fa", n_bp, None)
        wrapped = write_chromosome(root / "species_b" / "chr1.fa", n_bp, 60)
        ten_x = write_chromosome(root / "species_c" / "chr1.fa", 10 * n_bp, 60, seed=1)
        gz = root / "species_d" / "chr1.fa.gz"
        gz.parent.mkdir()
        gz.write_bytes(gzip.compress(wrapped.read_bytes(), compresslevel=6))

        print(f"\n## Scale: streaming reader (random ACGT; context {CONTEXT}, overlap {OVERLAP}, chunk {CHUNK:,} bp)")
        runs = {name: [] for name in ("one_line", "wrapped", "gz", "2 ranks", "gunzip")}
        for _ in range(REPEATS):  # interleaved repeats; medians below
            runs["one_line"].append(measure(["--pass", str(one_line), "0", "1"]))
            runs["wrapped"].append(measure(["--pass", str(wrapped), "0", "1"]))
            runs["gz"].append(measure(["--pass", str(gz), "0", "1"]))
            runs["2 ranks"].append(measure_parallel(wrapped))
            runs["gunzip"].append(measure(["--gunzip", str(gz)]))
        big = measure(["--pass", str(ten_x), "0", "1"])
        return report(runs, big, n_bp / 1e6)


def report(runs: dict, big: dict, mb: float) -> dict:
    """Print the tables and the extrapolation; return the headline figures."""
    med = {name: statistics.median(r["s"] for r in rs) for name, rs in runs.items()}
    rss = {name: statistics.median(r["rss_mib"] for r in rs) for name, rs in runs.items() if name != "2 ranks"}
    a, b = runs["one_line"][0], runs["wrapped"][0]
    print("| input | chunks | largest chunk (bp) | windows | window hash | peak RSS (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r, mib in (("30 Mbp one line", a, rss["one_line"]), ("30 Mbp wrapped at 60", b, rss["wrapped"])):
        print(f"| {name} | {r['chunks']} | {r['largest_chunk']:,} | {r['windows']:,} | {r['sha']} | {mib:.0f} |")
    print(
        f"| 300 Mbp wrapped (10x) | {big['chunks']} | {big['largest_chunk']:,} | {big['windows']:,} | "
        f"{big['sha']} | {big['rss_mib']:.0f} |"
    )
    same = (a["chunks"], a["windows"], a["sha"]) == (b["chunks"], b["windows"], b["sha"])
    print("\n| one pass, 30 Mbp | s | MB/s | windows/s |\n| --- | --- | --- | --- |")
    for name in ("one_line", "wrapped", "gz"):
        print(f"| 1 process, {name} | {med[name]:.2f} | {mb / med[name]:.0f} | {a['windows'] / med[name]:,.0f} |")
    print(
        f"| 2 processes (2 ranks, each reads all, keeps half) | {med['2 ranks']:.2f} | "
        f"{mb / med['2 ranks']:.0f} per rank | {a['windows'] / med['2 ranks']:,.0f} together |"
    )
    print(f"| gunzip only (ceiling for .gz input) | {med['gunzip']:.2f} | {mb / med['gunzip']:.0f} | - |")
    rate = mb / med["gz"]  # MB/s of one rank on gzip input, the usual case
    summary = {
        "identical_one_line_vs_wrapped": same,
        "rss_ratio_one_line_over_wrapped": rss["one_line"] / rss["wrapped"],
        "rss_ratio_10x_over_1x": big["rss_mib"] / rss["wrapped"],
        "gz_mb_per_s": rate,
        "maize_pass_min": 2300 / rate / 60,
        "largest_genome_pass_min": 2500 / rate / 60,
    }
    print(
        f"\none-line vs wrapped: identical chunks/windows/hash: {same}; peak RSS ratio "
        f"{summary['rss_ratio_one_line_over_wrapped']:.2f} (goal 0.9-1.1)"
    )
    print(f"peak RSS 300 Mbp / 30 Mbp: {summary['rss_ratio_10x_over_1x']:.2f} (goal ~1: memory flat in corpus size)")
    print(
        f"extrapolated: one pass over maize (2.3 Gbp, gzip) per rank {summary['maize_pass_min']:.1f} min, "
        f"2.5 Gbp {summary['largest_genome_pass_min']:.1f} min. Every rank reads the whole corpus (windows are "
        "dealt round-robin), so on a 32-core node with 8 ranks the pass time per rank is the same and uses "
        "8 of the 32 cores; streaming overlaps training."
    )
    return summary


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    if len(sys.argv) == 5 and sys.argv[1] == "--pass":
        print(json.dumps(one_pass(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--gunzip":
        print(json.dumps(gunzip_pass(sys.argv[2])))
    else:
        main()
