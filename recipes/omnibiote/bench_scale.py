"""Scale benchmark of the preprocessing steps (`python bench_scale.py`, also run by `python bench.py`).

For preprocess_genbank, preprocess_uniprot and encode_shards, on synthetic inputs at 1x and 10x (temp dir, never
committed): peak RSS of the CLI at 1x and 10x (fresh wrapper process, getrusage(RUSAGE_CHILDREN).ru_maxrss = the
largest of the CLI and its workers), throughput (MB/s and records/s) at 1 and 2 processes (median of --repeats
interleaved in-process runs), the gzip-decode rate of the same input as the ceiling of one reading process, and the
wall time extrapolated to GenBank divisions (GENBANK_GB of flat files) and UniRef100 on a 32-core node:
the main process (reading, appending) is serial, blocks are parallel, so wall ~ max(main CPU, all CPU / 32).
"""

import argparse
import gzip
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
sys.path.insert(0, str(RECIPE_DIR))

GENBANK_GB = 300.0  # flat files of the sequence divisions without con/wgs: "tens to hundreds of GB" (approx.)
UNIREF100_PROTEINS = 400e6  # UniRef100 release size (approx.)
TOKENIZER = RECIPE_DIR / "sample_data" / "encoded" / "tokenizer.model"


def write_genbank(path: Path, n_records: int, seed: int) -> int:
    """GenBank flat file of n_records DNA records (lengths 2-20 kb); returns its size in bytes."""
    rng = np.random.default_rng(seed)
    bases = np.frombuffer(b"acgt", np.uint8)
    with open(path, "w") as out:
        for i in range(n_records):
            length = int(rng.integers(2_000, 20_000))
            seq = bases[rng.integers(0, 4, length)].tobytes().decode()
            out.write(
                f"LOCUS       SYN{i:07d}            {length:>6} bp    DNA     linear   SYN 01-JAN-2020\n"
                f"DEFINITION  synthetic record {i}.\nACCESSION   SYN{i:07d}\nVERSION     SYN{i:07d}.1\n"
                f"FEATURES             Location/Qualifiers\n     source          1..{length}\n"
                '                     /mol_type="genomic DNA"\nORIGIN\n'
            )
            for start in range(0, length, 60):
                groups = " ".join(seq[j : j + 10] for j in range(start, min(start + 60, length), 10))
                out.write(f"{start + 1:>9} {groups}\n")
            out.write("//\n")
    return path.stat().st_size


def write_fasta(path: Path, n_records: int, seed: int) -> int:
    """UniRef-like protein FASTA (lognormal lengths, median ~280); returns its size in bytes."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"LAGVSERTIDPKQNFYMHWC", np.uint8)
    lengths = np.clip(rng.lognormal(np.log(280), 0.6, n_records).astype(int), 20, 5000)
    residues = letters[rng.integers(0, 20, int(lengths.sum()))].tobytes()
    with open(path, "wb") as out:
        pos = 0
        for i, length in enumerate(lengths.tolist()):
            out.write(b">UniRef100_S%08d Synthetic n=1 Tax=Synthetic\n" % i)
            seq = residues[pos : pos + length]
            pos += length
            out.write(b"\n".join(seq[j : j + 60] for j in range(0, length, 60)) + b"\n")
    return path.stat().st_size


def step_commands(step: str, inp: Path, out: Path, num_proc: int) -> tuple[list[str], callable]:
    """(CLI argv, in-process call) of one preprocessing step on one input."""
    from preprocessing.encode_shards import encode_shards
    from preprocessing.preprocess_genbank import preprocess_genbank
    from preprocessing.preprocess_uniprot import preprocess_uniprot

    if step == "preprocess_genbank":
        args, call = ["--out_dir", str(out)], lambda: preprocess_genbank([inp], out, num_proc=num_proc)
    elif step == "preprocess_uniprot":
        args, call = ["--out_dir", str(out)], lambda: preprocess_uniprot([inp], out, num_proc=num_proc)
    else:
        args = ["--tokenizer", str(TOKENIZER), "--base_dir", str(out), "--source", "s", "--val_fraction", "0.05"]
        call = lambda: encode_shards([inp], TOKENIZER, out, "s", 0.05, num_proc=num_proc)  # noqa: E731
    cli = [sys.executable, "-m", f"preprocessing.{step}", str(inp), *args, "--num_proc", str(num_proc)]
    return cli, call


def peak_rss_mib(step: str, inp: Path, out: Path) -> float:
    """Peak RSS (MiB) of the step's CLI at 2 processes, from a fresh wrapper's RUSAGE_CHILDREN."""
    cli, _ = step_commands(step, inp, out, 2)
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *cli], cwd=RECIPE_DIR, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    shutil.rmtree(out)
    return int(result.stdout.split()[-1]) / 1024


def timed(step: str, inp: Path, tmp: Path, repeats: int) -> dict[int, tuple[float, float, float]]:
    """{num_proc: (wall s, main CPU s, worker CPU s)}, medians of interleaved runs after one warm-up round."""
    runs = {1: [], 2: []}
    for rep in range(repeats + 1):
        for num_proc in runs:
            out = tmp / f"{step}-{num_proc}"
            _, call = step_commands(step, inp, out, num_proc)
            self0, child0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            call()
            wall = time.perf_counter() - start
            self1, child1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            shutil.rmtree(out)
            if rep:
                main = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
                child = child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime
                runs[num_proc].append((wall, main, child))
    return {n: tuple(map(statistics.median, zip(*r))) for n, r in runs.items()}


def gzip_decode_mb_s(path: Path, tmp: Path) -> float:
    """MB/s (uncompressed) at which one process decompresses a gzip of `path` (plain input) or `path` (gzip)."""
    data = path.read_bytes()
    gz = tmp / "ceiling.gz"
    gz.write_bytes(data if data[:2] == b"\x1f\x8b" else gzip.compress(data, compresslevel=6))
    start, size = time.perf_counter(), 0
    with gzip.open(gz, "rb") as handle:
        while chunk := handle.read(1 << 22):
            size += len(chunk)
    gz.unlink()
    return size / 1e6 / (time.perf_counter() - start)


def build_inputs(tmp: Path, genbank_records: int, proteins: int) -> dict:
    """{step: {scale: (input path, MB, records)}}; encode_shards reads record shards made from the FASTA."""
    from preprocessing.preprocess_uniprot import preprocess_uniprot

    inputs = {"preprocess_genbank": {}, "preprocess_uniprot": {}, "encode_shards": {}}
    for scale in (1, 10):
        gb = tmp / f"gb{scale}.seq"
        inputs["preprocess_genbank"][scale] = (
            gb,
            write_genbank(gb, genbank_records * scale, scale) / 1e6,
            genbank_records * scale,
        )
        fa = tmp / f"fa{scale}.fasta"
        inputs["preprocess_uniprot"][scale] = (fa, write_fasta(fa, proteins * scale, scale) / 1e6, proteins * scale)
        writer, _ = preprocess_uniprot([fa], tmp / f"records{scale}")
        shard = writer.shard_paths[0]
        inputs["encode_shards"][scale] = (shard, shard.stat().st_size / 1e6, proteins * scale)
    return inputs


def run(genbank_records: int, proteins: int, repeats: int) -> dict:
    """Every figure of the scale section, per step."""
    results = {}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        inputs = build_inputs(tmp, genbank_records, proteins)
        for step, by_scale in inputs.items():
            rss = {scale: peak_rss_mib(step, path, tmp / f"rss-{step}") for scale, (path, _, _) in by_scale.items()}
            path, mb, records = by_scale[10]
            t = timed(step, path, tmp, repeats)
            results[step] = {
                "mb": {s: v[1] for s, v in by_scale.items()},
                "rss_mib": rss,
                "records": records,
                "timing": t,
                "ceiling_mb_s": gzip_decode_mb_s(path, tmp),
            }
    return results


def extrapolate(step: str, r: dict, uniref_mb: float) -> float:
    """Hours on a 32-core node for the real corpus of a step: max(main CPU, all CPU / 32) scaled up."""
    wall, main, child = r["timing"][2]
    if step == "preprocess_genbank":
        scale_up = GENBANK_GB * 1e3 / r["mb"][10]
    elif step == "preprocess_uniprot":
        scale_up = UNIREF100_PROTEINS / r["records"]
    else:
        scale_up = uniref_mb / r["mb"][10]  # record shards of UniRef100 (same bytes per protein as the synthetic)
    return max(main, (main + child) / 32) * scale_up / 3600


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="omnibiote preprocessing scale benchmark")
    parser.add_argument("--genbank_records", type=int, default=100, help="1x GenBank records (~11 kb each)")
    parser.add_argument("--proteins", type=int, default=8_000, help="1x proteins")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = run(args.genbank_records, args.proteins, args.repeats)
    shard_mb_per_protein = results["encode_shards"]["mb"][10] / results["encode_shards"]["records"]
    print("\nscale (synthetic inputs; machine shared with other jobs):")
    for step, r in results.items():
        (w1, cpu1, _), (w2, main2, child2) = r["timing"][1], r["timing"][2]
        ideal = cpu1 / max(main2, (main2 + child2) / 2)  # what 2 idle cores would give, from CPU times
        mb, n = r["mb"][10], r["records"]
        print(
            f"  {step}: 1x {r['mb'][1]:.1f} MB, 10x {mb:.1f} MB; peak RSS 1x {r['rss_mib'][1]:.0f} MiB,"
            f" 10x {r['rss_mib'][10]:.0f} MiB"
        )
        print(
            f"    1 proc {mb / w1:.1f} MB/s ({n / w1:,.0f} rec/s); 2 procs {mb / w2:.1f} MB/s ({n / w2:,.0f} rec/s);"
            f" 2 vs 1 {w1 / w2:.2f}x wall, {ideal:.2f}x from CPU times; main-process CPU share {main2 / (main2 + child2):.0%};"
            f" gzip-decode ceiling {r['ceiling_mb_s']:.0f} MB/s"
        )
        hours = extrapolate(step, r, shard_mb_per_protein * UNIREF100_PROTEINS)
        corpus = {
            "preprocess_genbank": f"{GENBANK_GB:.0f} GB of GenBank flat files",
            "preprocess_uniprot": f"UniRef100 (~{UNIREF100_PROTEINS / 1e6:.0f}M proteins)",
            "encode_shards": "UniRef100's record shards",
        }[step]
        print(f"    extrapolated: {corpus} ~{hours:.1f} h on 32 cores")
    return results


if __name__ == "__main__":
    main()
