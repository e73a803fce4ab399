"""Metadata filtering, accession -> path, the family split and the memory-mapped genome index."""

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import metadata_files, write_fasta_gz

import preprocess
from preprocess import (
    GenomeEntry,
    GtdbDataError,
    build_or_load_index,
    family_split,
    genome_path,
    read_metadata,
    shard_for_rank,
)


def test_genome_path_from_accession():
    assert genome_path("/gtdb/database", "GCA_012345678.1") == Path(
        "/gtdb/database/GCA/012/345/678/GCA_012345678.1_genomic.fna.gz"
    )
    assert genome_path("root", "RS_GCF_000005845.2") == Path("root/GCF/000/005/845/GCF_000005845.2_genomic.fna.gz")
    with pytest.raises(GtdbDataError, match="GCA_12345"):
        genome_path("root", "GCA_12345.1")


def test_metadata_keeps_clean_representatives(gtdb_fixture):
    entries, counts = read_metadata(metadata_files(gtdb_fixture), gtdb_fixture / "database", "checkm_contamination", 5)
    # the fixture has 48 good genomes plus one non-representative row and one contaminated representative
    assert counts["metadata_rows"] == 50 and counts["representatives"] == 49 and len(entries) == 48
    assert all(not e.accession.startswith(("GB_", "RS_")) for e in entries)
    assert all(Path(e.path).is_file() for e in entries)
    assert {e.family for e in entries} == {f"F{i:03d}" for i in range(12)}


def _entries(n_families=30, genera=3, per_genus=25):
    return [
        GenomeEntry(f"GCA_{f:03d}{g:03d}{s:03d}.1", f"F{f}", f"F{f}_G{g}", "unused")
        for f in range(n_families)
        for g in range(genera)
        for s in range(per_genus)
    ]


def test_family_split_invariants():
    entries = _entries()
    split = family_split(
        entries, seed=3, val_species_target=150, n_val_genomes=40, val_per_genus=10, train_per_genus=20
    )
    val_families, train_families = {e.family for e in split.val}, {e.family for e in split.train}
    assert not val_families & train_families
    assert len(split.val) == 40
    # families count at most 100 each (75 here): two families reach the 150 target
    assert split.stats["val_families"] == 2 and len(train_families) == 28
    for genomes, cap in ((split.val, 10), (split.train, 20)):
        genera = [e.genus for e in genomes]
        assert max(genera.count(g) for g in set(genera)) <= cap
    assert len(split.train) == 28 * 3 * 20


def test_family_split_is_deterministic_and_order_independent():
    entries = _entries()
    kwargs = dict(seed=7, val_species_target=150, n_val_genomes=40)
    first = family_split(entries, **kwargs)
    shuffled = [entries[i] for i in np.random.default_rng(0).permutation(len(entries))]
    again = family_split(shuffled, **kwargs)  # what another rank computes from its own read of the metadata
    assert first.train == again.train and first.val == again.val
    assert family_split(entries, **{**kwargs, "seed": 8}).val != first.val


def test_family_split_errors():
    with pytest.raises(GtdbDataError, match="only 30 validation genomes"):
        family_split(_entries(), seed=0, val_species_target=1, n_val_genomes=500, val_per_genus=10)
    with pytest.raises(GtdbDataError, match="no training classes"):
        family_split(_entries(n_families=2), seed=0, val_species_target=10_000, n_val_genomes=5)


def test_shards_are_even_and_disjoint():
    shards = [shard_for_rank(10, r, 4) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert {len(s) for s in shards} == {2, 3}
    with pytest.raises(GtdbDataError, match="3 training genomes"):
        shard_for_rank(3, 0, 4)


def test_index_roundtrip_memmap_and_reuse(tmp_path, monkeypatch):
    a = write_fasta_gz(tmp_path / "a.fna.gz", [("c1 desc", "ACGTNacgtRYK"), ("c2", "NNNN"), ("c3", "GGAT")])
    b = write_fasta_gz(tmp_path / "b.fna.gz", [("only", "TTTTCCCCAAAAGGGG")])
    entries = [GenomeEntry("GCA_000000001.1", "F", "G", str(a)), GenomeEntry("GCA_000000002.1", "F", "G", str(b))]
    index = build_or_load_index(entries, [5, 9], tmp_path / "cache", "train", show_progress=False)
    assert isinstance(index.sequence, np.memmap)
    assert index.genomes.tolist() == [[5, 0, 2], [9, 2, 1]]  # the all-N contig c2 was dropped
    decoded = "".join("ATCGN"[c] for c in index.sequence)
    assert decoded == "ACGTNACGTNNN" + "GGAT" + "TTTTCCCCAAAAGGGG"
    assert index.genome_contigs(1).tolist() == [[16, 16]]

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cached index was rebuilt")

    monkeypatch.setattr(preprocess, "_write_index", must_not_rebuild)
    again = build_or_load_index(entries, [5, 9], tmp_path / "cache", "train", show_progress=False)
    assert again.directory == index.directory
    monkeypatch.undo()

    write_fasta_gz(b, [("only", "TTTTCCCCAAAAGGGGAA")])  # a changed genome file invalidates the cache
    os.utime(b, ns=(1, 1))
    changed = build_or_load_index(entries, [5, 9], tmp_path / "cache", "train", show_progress=False)
    assert changed.directory != index.directory and changed.total_bases == index.total_bases + 2
