"""GTDB metadata filtering, the family-level train/validation split and the on-disk genome index.

The index is what makes start-up fast: every selected genome is decoded once into one flat uint8 array
(A=0, T=1, C=2, G=3, N=4) plus a contig table, written to a cache directory and memory-mapped on later runs.
Its cache key covers the accession list and each FASTA file's size and mtime, so a changed input rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from genome_fasta import (  # noqa: F401  (BASE_LOOKUP ... read_genome_contigs, GtdbDataError: re-exported)
    BASE_LOOKUP,
    INVALID_CODE,
    N_CODE,
    GenomeSkipped,
    GtdbDataError,
    check_genomes_root,
    decode_genome,
    default_index_workers,
    ordered_map,
    read_genome_contigs,
)

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 2  # 2: manifest carries a fingerprint; contract-checked reader
METADATA_COLUMNS = ("accession", "gtdb_genome_representative", "gtdb_taxonomy")
_ACCESSION_RE = re.compile(r"^(?:RS_|GB_)?(GC[AF])_(\d{3})(\d{3})(\d{3})\.(\d+)$")


# ----------------------------------------------------------------------------------------------- metadata and split
@dataclass(frozen=True)
class GenomeEntry:
    """One representative genome selected from the metadata."""

    accession: str  # without the RS_/GB_ prefix, e.g. GCA_012345678.1
    family: str
    genus: str
    path: str


def genome_path(genomes_root: str | Path, accession: str) -> Path:
    """`GCA_012345678.1` (optionally `RS_`/`GB_`-prefixed) -> `{root}/GCA/012/345/678/GCA_012345678.1_genomic.fna.gz`."""
    match = _ACCESSION_RE.match(accession)
    if match is None:
        raise GtdbDataError(f"accession {accession!r} does not look like GCA_/GCF_ followed by 9 digits and a version")
    prefix, d1, d2, d3, version = match.groups()
    bare = f"{prefix}_{d1}{d2}{d3}.{version}"
    return Path(genomes_root) / prefix / d1 / d2 / d3 / f"{bare}_genomic.fna.gz"


def strip_accession_prefix(accession: str) -> str:
    """GTDB prefixes accessions with RS_ (RefSeq) or GB_ (GenBank); file names do not carry it."""
    return accession[3:] if accession[:3] in ("RS_", "GB_") else accession


def read_metadata(
    metadata_files: list[str | Path], genomes_root: str | Path, contamination_column: str, max_contamination: float
) -> tuple[list[GenomeEntry], dict[str, int]]:
    """Keep species representatives below the contamination limit; return them (sorted) and filter counts."""
    columns = [*METADATA_COLUMNS, contamination_column]
    frames = []
    for path in metadata_files:
        path = Path(path)
        if not path.is_file():
            raise GtdbDataError(f"{path}: metadata file not found")
        header = pd.read_csv(path, sep="\t", nrows=0).columns
        missing = [c for c in columns if c not in header]
        if missing:
            raise GtdbDataError(f"{path}: metadata is missing column(s) {', '.join(missing)}")
        frame = pd.read_csv(path, sep="\t", usecols=columns, dtype=str, keep_default_na=False)
        frame["_source"] = str(path)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    counts = {"metadata_rows": len(table)}

    table = table[table["accession"] == table["gtdb_genome_representative"]]
    counts["representatives"] = len(table)
    contamination = pd.to_numeric(table[contamination_column], errors="coerce")
    if contamination.isna().any():
        bad = table[contamination.isna()].iloc[0]
        raise GtdbDataError(
            f"{bad['_source']}: record {bad['accession']}: {contamination_column}={bad[contamination_column]!r} "
            "is not a number"
        )
    table = table[contamination < max_contamination]
    counts["below_contamination_limit"] = len(table)

    entries, malformed = [], 0
    for accession, taxonomy, source in zip(table["accession"], table["gtdb_taxonomy"], table["_source"]):
        ranks = dict(part.split("__", 1) for part in taxonomy.split(";") if "__" in part)
        family, genus = ranks.get("f", ""), ranks.get("g", "")
        if not family or not genus or _ACCESSION_RE.match(accession) is None:
            malformed += 1
            log.warning("%s: record %s: skipped (malformed accession or taxonomy %r)", source, accession, taxonomy)
            continue
        entries.append(
            GenomeEntry(strip_accession_prefix(accession), family, genus, str(genome_path(genomes_root, accession)))
        )
    counts["malformed_skipped"] = malformed
    entries.sort(key=lambda e: e.accession)
    return entries, counts


@dataclass
class FamilySplit:
    """Training classes (label = position in `train`) and validation genomes, with the split's statistics."""

    train: list[GenomeEntry]
    val: list[GenomeEntry]
    stats: dict = field(default_factory=dict)


def _cap_per_genus(entries: list[GenomeEntry], cap: int, rng: np.random.Generator) -> list[GenomeEntry]:
    by_genus: dict[str, list[GenomeEntry]] = {}
    for entry in entries:
        by_genus.setdefault(entry.genus, []).append(entry)
    kept = []
    for genus in sorted(by_genus):
        members = by_genus[genus]
        picks = rng.permutation(len(members))[:cap]
        kept.extend(members[i] for i in sorted(picks))
    return sorted(kept, key=lambda e: e.accession)


def family_split(
    entries: list[GenomeEntry],
    seed: int,
    val_species_target: int,
    n_val_genomes: int,
    family_count_cap: int = 100,
    val_per_genus: int = 10,
    train_per_genus: int = 20,
) -> FamilySplit:
    """Hold out whole families for validation; everything here depends only on the entries and the seed."""
    entries = sorted(entries, key=lambda e: e.accession)
    family_sizes: dict[str, int] = {}
    for entry in entries:
        family_sizes[entry.family] = family_sizes.get(entry.family, 0) + 1
    families = sorted(family_sizes)
    rng = np.random.default_rng(seed)

    val_families, counted = set(), 0
    for i in rng.permutation(len(families)):
        if counted >= val_species_target:
            break
        val_families.add(families[i])
        counted += min(family_sizes[families[i]], family_count_cap)

    pool = _cap_per_genus([e for e in entries if e.family in val_families], val_per_genus, rng)
    if len(pool) < n_val_genomes:
        raise GtdbDataError(
            f"only {len(pool)} validation genomes are available after the family split and the cap of {val_per_genus} "
            f"per genus, but data.n_val_genomes={n_val_genomes}; lower data.n_val_genomes or raise "
            "data.val_species_target"
        )
    chosen = sorted(rng.choice(len(pool), size=n_val_genomes, replace=False))
    val = [pool[i] for i in chosen]
    train = _cap_per_genus([e for e in entries if e.family not in val_families], train_per_genus, rng)
    if not train:
        raise GtdbDataError(
            "no training classes left: every family went to validation; lower data.val_species_target "
            "or provide more genomes"
        )
    stats = {
        "val_families": len(val_families),
        "train_families": len(families) - len(val_families),
        "val_pool": len(pool),
        "val_genomes": len(val),
        "train_genomes": len(train),
    }
    return FamilySplit(train=train, val=val, stats=stats)


def shard_for_rank(n_items: int, rank: int, world_size: int) -> list[int]:
    """Round-robin shard: rank r gets items r, r+W, ...; shard sizes differ by at most one."""
    if n_items < world_size:
        raise GtdbDataError(f"{n_items} training genomes cannot be sharded over {world_size} ranks (need >= 1 each)")
    return list(range(rank, n_items, world_size))


def _file_fingerprint(paths: list[str]) -> list[list]:
    fingerprint = []
    for path in paths:
        try:
            stat = os.stat(path)
            fingerprint.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            fingerprint.append([path, -1, -1])
    return fingerprint


def cached_family_split(
    metadata_files: list[str | Path], genomes_root: str | Path, cache_dir: str | Path, **options
) -> FamilySplit:
    """`read_metadata` + `family_split`, memoised on disk: a full GTDB metadata table takes many seconds to parse.

    Raises GtdbDataError when `genomes_root` is missing or holds none of the first genomes of the split."""
    check_genomes_root(genomes_root, [])
    key_source = {"metadata": _file_fingerprint([str(p) for p in metadata_files]), "root": str(genomes_root), **options}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"split-{key}.json"
    if cache_file.is_file():
        cached = json.loads(cache_file.read_text())
        split = FamilySplit(
            train=[GenomeEntry(**e) for e in cached["train"]],
            val=[GenomeEntry(**e) for e in cached["val"]],
            stats=cached["stats"],
        )
        if "fingerprint" not in cached:
            log.warning("%s: split cache without a fingerprint (older version): not checked", cache_file)
        elif cached["fingerprint"] != split_fingerprint(split):
            raise GtdbDataError(
                f"{cache_file}: the cached split does not match its recorded fingerprint (edited or damaged); "
                "delete it to recompute the split"
            )
        check_genomes_root(genomes_root, [e.path for e in split.val + split.train])
        return split
    split_options = {k: v for k, v in options.items() if k not in ("contamination_column", "max_contamination")}
    entries, counts = read_metadata(
        metadata_files, genomes_root, options["contamination_column"], options["max_contamination"]
    )
    split = family_split(entries, **split_options)
    split.stats = {**counts, **split.stats}
    payload = {
        "fingerprint": split_fingerprint(split),
        "train": [asdict(e) for e in split.train],
        "val": [asdict(e) for e in split.val],
        "stats": split.stats,
    }
    _atomic_write_text(cache_file, json.dumps(payload))
    check_genomes_root(genomes_root, [e.path for e in split.val + split.train])
    return split


def split_fingerprint(split: FamilySplit) -> dict:
    """sha256 of the family holdout (train and val accessions, in label order) and of the genome list (sorted)."""
    train, val = [e.accession for e in split.train], [e.accession for e in split.val]
    return {
        "split_sha256": _sha256_json({"train": train, "val": val}),
        "genome_list_sha256": _sha256_json(sorted(train + val)),
    }


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ genome index
class GenomeIndex:
    """Memory-mapped view of an index directory: `sequence` (uint8), `contigs` [start, length], `genomes` table."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest = json.loads((self.directory / "manifest.json").read_text())
        if manifest.get("version") not in (1, INDEX_FORMAT_VERSION):
            raise GtdbDataError(
                f"{self.directory / 'manifest.json'}: index format {manifest.get('version')!r}, this code reads "
                f"1-{INDEX_FORMAT_VERSION}; delete the index directory to rebuild it"
            )
        if "fingerprint" not in manifest:  # version 1: same files, nothing recorded to check against
            log.warning("%s: index without a fingerprint (older version): not checked", self.directory)
        self.fingerprint: dict = manifest.get("fingerprint", {})
        self.accessions: list[str] = manifest["accessions"]
        self.skipped: dict[str, str] = manifest["skipped"]
        self.total_bases: int = manifest["total_bases"]
        # genomes[i] = (label, first contig row, number of contigs)
        self.genomes = np.load(self.directory / "genomes.npy")
        self.contigs = np.load(self.directory / "contigs.npy")
        self.sequence = (
            np.memmap(self.directory / "sequence.u8", dtype=np.uint8, mode="r")
            if self.total_bases
            else np.zeros(0, dtype=np.uint8)
        )

    def __len__(self) -> int:
        return len(self.genomes)

    def genome_contigs(self, i: int) -> np.ndarray:
        """Rows [start, length] of genome i's contigs."""
        _, first, count = self.genomes[i]
        return self.contigs[first : first + count]

    def __getstate__(self):  # a pickled memmap would copy the whole array: reopen it instead
        return {"directory": self.directory}

    def __setstate__(self, state):
        self.__init__(state["directory"])


def index_cache_key(entries: list[GenomeEntry], labels: list[int]) -> str:
    """Hash of the index's contents: accessions, labels and each FASTA file's size and mtime."""
    key_source = {
        "version": INDEX_FORMAT_VERSION,
        "genomes": [
            [e.accession, label, *fp]
            for e, label, fp in zip(entries, labels, _file_fingerprint([e.path for e in entries]))
        ],
    }
    return hashlib.sha256(json.dumps(key_source).encode()).hexdigest()[:16]


def build_or_load_index(
    entries: list[GenomeEntry],
    labels: list[int],
    cache_dir: str | Path,
    name: str,
    show_progress: bool = True,
    workers: int | None = None,
) -> GenomeIndex:
    """Return the cached index for these genomes, building it first (into a temp dir, then renamed) if needed.

    `workers` processes decode genomes in parallel (None: `default_index_workers()`); the files written are
    byte-identical for any number of workers. Raises GtdbDataError for a bad `workers`.
    """
    if workers is None:
        workers = default_index_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise GtdbDataError(f"data.index_workers must be null or an integer >= 1, got {workers!r}")
    target = Path(cache_dir) / f"{name}-{index_cache_key(entries, labels)}"
    if (target / "manifest.json").is_file():
        return GenomeIndex(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        _write_index(tmp, entries, labels, show_progress, f"indexing {name}", workers)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same index first; theirs is identical
            if not (target / "manifest.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return GenomeIndex(target)


def index_fingerprint(entries: list[GenomeEntry], labels: list[int], accessions: list[str]) -> dict:
    """What a consumer of an index depends on: format, base codes, the genomes asked for and those indexed."""
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "base_codes": "A=0 T=1 C=2 G=3 N=4 (IUPAC ambiguity -> N)",
        "genome_list_sha256": _sha256_json([[e.accession, label] for e, label in zip(entries, labels)]),
        "indexed_sha256": _sha256_json(accessions),
    }


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _write_index(directory: Path, entries: list[GenomeEntry], labels: list[int], show_progress, desc, workers):
    genomes, contigs, accessions, skipped = [], [], [], {}
    offset = 0
    decoded = ordered_map(decode_genome, [entry.path for entry in entries], workers)
    with open(directory / "sequence.u8", "wb") as out:
        rows = zip(entries, labels, decoded)
        for entry, label, result in tqdm(rows, total=len(entries), desc=desc, unit="genome", disable=not show_progress):
            if isinstance(result, str):
                skipped[entry.accession] = result
                log.warning("genome %s skipped: %s", entry.accession, result)
                continue
            lengths, codes = result
            genomes.append((label, len(contigs), len(lengths)))
            accessions.append(entry.accession)
            out.write(codes)
            for length in lengths:
                contigs.append((offset, length))
                offset += length
        out.flush()
        os.fsync(out.fileno())
    np.save(directory / "genomes.npy", np.asarray(genomes, dtype=np.int64).reshape(-1, 3))
    np.save(directory / "contigs.npy", np.asarray(contigs, dtype=np.int64).reshape(-1, 2))
    manifest = {
        "version": INDEX_FORMAT_VERSION,
        "fingerprint": index_fingerprint(entries, labels, accessions),
        "accessions": accessions,
        "skipped": skipped,
        "total_bases": offset,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))  # written last: marks a finished index
