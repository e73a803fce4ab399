"""Parallel index build (identical to one worker, one-line genomes), dense class labels, the data fingerprint."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import TWO_STEPS, copy_two_step_run, metadata_files, tiny_overrides, write_fasta_gz
from omegaconf import OmegaConf

from data import FragmentSampler, assign_classes, check_data_fingerprint, data_fingerprint
from preprocess import (
    FamilySplit,
    GenomeEntry,
    GtdbDataError,
    build_or_load_index,
    cached_family_split,
    split_fingerprint,
)
from train import main

RNG = np.random.default_rng(5)


def _genome(n: int) -> str:
    return "".join(RNG.choice(list("ACGT"), size=n))


def _wrapped(seq: str, width: int = 60) -> str:
    return "\n".join(seq[i : i + width] for i in range(0, len(seq), width))


def _entries(tmp_path, n: int = 7) -> list[GenomeEntry]:
    entries = []
    for i in range(n):
        contigs = [(f"c{i}_{j}", _genome(3_000 + 500 * j)) for j in range(1 + i % 3)]
        if i % 2:  # half the genomes wrapped at 60 bp, the others one line per contig
            contigs = [(name, _wrapped(seq)) for name, seq in contigs]
        path = write_fasta_gz(tmp_path / "g" / f"{i}.fna.gz", contigs)
        entries.append(GenomeEntry(f"GCA_{i:09d}.1", f"F{i}", f"G{i}", str(path)))
    (tmp_path / "g" / "3.fna.gz").write_bytes(b"\x1f\x8b damaged")  # skipped: not a class
    return entries


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_two_workers_write_the_same_index_as_one(tmp_path):
    entries = _entries(tmp_path)
    one = build_or_load_index(entries, list(range(7)), tmp_path / "c1", "t", show_progress=False, workers=1)
    two = build_or_load_index(entries, list(range(7)), tmp_path / "c2", "t", show_progress=False, workers=2)
    assert _files(one.directory) == _files(two.directory)
    assert list(one.skipped) == ["GCA_000000003.1"] and len(one) == 6


def test_one_line_and_wrapped_genomes_index_alike(tmp_path):
    seq = _genome(5_000)
    a = write_fasta_gz(tmp_path / "a.fna.gz", [("c", seq)])
    b = write_fasta_gz(tmp_path / "b.fna.gz", [("c", _wrapped(seq, 7).replace("\n", "\r\n"))])
    entries = [GenomeEntry("GCA_000000001.1", "F", "G", str(a)), GenomeEntry("GCA_000000002.1", "F", "G", str(b))]
    index = build_or_load_index(entries, [0, 1], tmp_path / "c", "t", show_progress=False, workers=1)
    (s0, n0), (s1, n1) = index.contigs
    assert n0 == n1 == 5_000 and np.array_equal(index.sequence[s0 : s0 + n0], index.sequence[s1 : s1 + n1])
    assert index.fingerprint["format_version"] == 2 and len(index.fingerprint["genome_list_sha256"]) == 64
    with pytest.raises(GtdbDataError, match="index_workers must be null or an integer >= 1"):
        build_or_load_index(entries, [0, 1], tmp_path / "c", "t", show_progress=False, workers=0)


def test_skipped_genome_is_not_a_class_and_fingerprint_is_checked(tmp_path, caplog):
    entries = _entries(tmp_path)
    labels = [10 * i for i in range(7)]  # split positions, not dense
    index = build_or_load_index(entries, labels, tmp_path / "c", "t", show_progress=False, workers=1)
    sampler = FragmentSampler(index, fragment_bp=200)
    assert assign_classes(sampler) == 6 == sampler.n_classes
    assert sampler.labels.tolist() == [0, 1, 2, 3, 4, 5]  # genome 3 skipped, the rest renumbered in order
    assert assign_classes(sampler) == 6 and sampler.labels.tolist() == [0, 1, 2, 3, 4, 5]

    cfg = OmegaConf.create(
        dict(kmer=5, fragment_bp=200, train_tokens=64, val_tokens=128, reverse_complement=True, max_n_fraction=0.0)
    )
    split = FamilySplit(train=entries, val=entries[:2])
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        record = check_data_fingerprint(run, cfg, split, sampler, resuming=True)  # a run from before fingerprints
    assert "missing" in caplog.text and json.loads(record.read_text()) == data_fingerprint(cfg, split, 6)
    check_data_fingerprint(run, cfg, split, sampler, resuming=True)
    cfg.kmer = 6
    with pytest.raises(GtdbDataError) as caught:
        check_data_fingerprint(run, cfg, FamilySplit(train=entries[1:], val=entries[:2]), sampler, resuming=True)
    message = str(caught.value)
    assert "\n" not in message and str(record) in message and str(index.directory / "manifest.json") in message
    assert "tokenizer" in message and "split_sha256" in message and "fragment" not in message
    check_data_fingerprint(run, cfg, split, sampler, resuming=False)  # a fresh run records its own
    check_data_fingerprint(run, cfg, split, sampler, resuming=True)


def test_resume_with_other_data_settings_is_refused_in_one_line(gtdb_fixture, two_step_run, tmp_path, capsys):
    overrides = [*tiny_overrides(gtdb_fixture, tmp_path), *TWO_STEPS]
    copy_two_step_run(two_step_run, tmp_path)
    record = tmp_path / "run" / "data_fingerprint.json"
    assert json.loads(record.read_text())["fragment"]["fragment_bp"] == 150
    capsys.readouterr()
    assert main(["--config-name", "sample", *overrides, "train.max_steps=4", "data.max_n_fraction=0.5"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith(f"error: {record}: the checkpoints were trained on other data than ")
    assert "'max_n_fraction': 0.0" in last and "'max_n_fraction': 0.5" in last


def test_split_cache_records_its_fingerprint(gtdb_fixture, tmp_path, caplog):
    options = dict(
        seed=1, contamination_column="checkm_contamination", max_contamination=5.0, val_species_target=6,
        n_val_genomes=8, family_count_cap=100, val_per_genus=10, train_per_genus=20,
    )  # fmt: skip
    args = (metadata_files(gtdb_fixture), gtdb_fixture / "database", tmp_path)
    split = cached_family_split(*args, **options)
    (cache_file,) = tmp_path.glob("split-*.json")
    payload = json.loads(cache_file.read_text())
    assert payload["fingerprint"] == split_fingerprint(split)
    payload["train"] = payload["train"][1:]  # an edited cache no longer matches its fingerprint
    cache_file.write_text(json.dumps(payload))
    with pytest.raises(GtdbDataError, match="does not match its recorded fingerprint"):
        cached_family_split(*args, **options)
    del payload["fingerprint"]  # a cache from before fingerprints: a warning
    cache_file.write_text(json.dumps(payload))
    with caplog.at_level(logging.WARNING):
        assert len(cached_family_split(*args, **options).train) == len(split.train) - 1
    assert "without a fingerprint" in caplog.text
