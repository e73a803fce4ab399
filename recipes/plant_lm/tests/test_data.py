"""Tokenisation, chunking, windows, species sampling and bad inputs of data.py."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest
from conftest import random_dna, write_fasta

from data import (
    VOCAB_SIZE,
    PlantDataError,
    SpeciesStream,
    build_mixture,
    discover_species,
    parse_distribution,
    species_weights,
    stream_chunks,
    tokenize,
    window_count,
)

BASE = {"A": 0, "C": 1, "G": 2, "T": 3}


def reference_tokens(seq: str) -> list[list[int]]:
    """Pure-Python reference: split at non-ACGT, then non-overlapping 6-mers, id = sum(b_i * 4**(5-i))."""
    runs, current = [], ""
    for base in seq.upper() + "N":
        if base in BASE:
            current += base
        else:
            runs.append(current)
            current = ""
    out = []
    for run in runs:
        ids = [sum(BASE[b] * 4 ** (5 - i) for i, b in enumerate(run[k : k + 6])) for k in range(0, len(run) - 5, 6)]
        if ids:
            out.append(ids)
    return out


def as_lists(segments):
    return [s.tolist() for s in segments]


def test_kmer_ids_boundaries():
    assert as_lists(tokenize("AAAAAA")) == [[0]]
    assert as_lists(tokenize("TTTTTT")) == [[VOCAB_SIZE - 1]]
    assert as_lists(tokenize("ACGTAC")) == [[0 * 1024 + 1 * 256 + 2 * 64 + 3 * 16 + 0 * 4 + 1]]
    assert as_lists(tokenize("CAAAAAG")) == [[1024]]  # tail shorter than 6 dropped
    assert as_lists(tokenize("ACGTA")) == []


def test_tokenize_matches_formula_on_random_sequence_with_n_and_lowercase():
    rng = np.random.default_rng(0)
    seq = list(random_dna(5_000, 3))
    for pos in rng.choice(len(seq), size=40, replace=False):
        seq[pos] = rng.choice(list("NRYnK"))
    seq = "".join(b.lower() if i % 7 == 0 else b for i, b in enumerate(seq))
    assert as_lists(tokenize(seq)) == reference_tokens(seq)


def test_n_splits_and_never_splices():
    # Without the split, the 6-mer AAATTT would straddle the N.
    assert as_lists(tokenize("AAAAAANTTTTTT")) == [[0], [4095]]
    assert as_lists(tokenize("AAANTTT")) == []
    assert as_lists(tokenize("NNNNNNNNNNNN")) == []
    assert as_lists(tokenize("acgtac")) == as_lists(tokenize("ACGTAC"))


def test_stream_chunks_gzip_crlf_and_records(tmp_path):
    seq_a, seq_b = random_dna(250, 5), random_dna(70, 6)
    plain = write_fasta(tmp_path / "a.fa", {"a": seq_a, "b": seq_b})
    gz = write_fasta(tmp_path / "a.fa.gz", {"a": seq_a, "b": seq_b}, gz=True)
    crlf = tmp_path / "crlf.fa"
    crlf.write_bytes(plain.read_bytes().replace(b"\n", b"\r\n"))
    expected = [("a", seq_a[:100]), ("a", seq_a[100:200]), ("a", seq_a[200:]), ("b", seq_b)]
    for path in (plain, gz, crlf):
        assert [(rid, chunk.decode()) for rid, chunk in stream_chunks(path, 100)] == expected


def stream_windows(stream: SpeciesStream, n: int, start: int = 0):
    it = stream.windows(start)
    return [next(it).tolist() for _ in range(n)]


@pytest.mark.smoke
def test_overlapping_windows_and_targets(tmp_path):
    seq = random_dna(6 * 100, 7) + "N" + random_dna(6 * 40, 8)
    path = write_fasta(tmp_path / "sp" / "x.fa", {"x": seq})
    tokens = [t.tolist() for t in tokenize(seq)]
    stream = SpeciesStream("sp", [path], context_size=16, overlap_ratio=0.5, chunk_size=10_000)
    expected = [tokens[0][k : k + 17] for k in range(0, 100 - 17 + 1, 8)]
    expected += [tokens[1][k : k + 17] for k in range(0, 40 - 17 + 1, 8)]
    assert len(expected) == window_count(100, 17, 8) + window_count(40, 17, 8) == 11 + 3
    assert stream_windows(stream, len(expected)) == expected
    assert stream_windows(stream, len(expected) + 2)[-2:] == expected[:2]  # endless: next pass starts over


def test_rank_shards_are_disjoint_and_resume_skips(tmp_path):
    path = write_fasta(tmp_path / "sp" / "x.fa", {"x": random_dna(6 * 300, 9)})
    args = dict(context_size=16, overlap_ratio=0.5, chunk_size=6 * 120)
    full = stream_windows(SpeciesStream("sp", [path], **args), 20)
    rank0 = stream_windows(SpeciesStream("sp", [path], **args, rank=0, world_size=2), 10)
    rank1 = stream_windows(SpeciesStream("sp", [path], **args, rank=1, world_size=2), 10)
    assert rank0 == full[0::2] and rank1 == full[1::2]
    assert stream_windows(SpeciesStream("sp", [path], **args), 5, start=13) == full[13:18]


def test_species_sampling_frequencies(data_dir):
    weights = {"oryza_sativa": 3.0, "arabidopsis": 1.0}
    mixture = build_mixture(data_dir, weights, 1.0, context_size=8, overlap_ratio=0.5, chunk_size=10_000, seed=0)
    picks = np.concatenate([b.species_ids.numpy() for b in mixture.batches(64, 40, epoch=0)])
    freq = np.bincount(picks, minlength=2) / len(picks)
    assert mixture.species == ["arabidopsis", "oryza_sativa"]
    assert abs(freq[1] - 0.75) < 0.03
    assert mixture.positions == {"arabidopsis": int((picks == 0).sum()), "oryza_sativa": int((picks == 1).sum())}


def test_species_weights_rules(caplog):
    assert species_weights(["a", "b"], {}, 1.0) == {"a": 0.5, "b": 0.5}
    with caplog.at_level(logging.WARNING, logger="plant_lm.data"):
        weights = species_weights(["a", "b"], {"a": 3.0}, 1.0)
    assert weights == {"a": 0.75, "b": 0.25} and "b has no weight" in caplog.text
    with pytest.raises(PlantDataError, match=r"\['zea_mays'\] are weighted .* no folder"):
        species_weights(["a"], {"a": 1.0, "zea_mays": 0.6}, 1.0)
    with pytest.raises(PlantDataError, match="must be > 0"):
        species_weights(["a"], {"a": 0.0}, 1.0)
    with pytest.raises(PlantDataError, match="must be > 0"):
        species_weights(["a"], {"a": -1.0}, 1.0)
    assert parse_distribution("glycine_max=1.0, zea_mays=0.6") == {"glycine_max": 1.0, "zea_mays": 0.6}
    with pytest.raises(PlantDataError, match="name=weight"):
        parse_distribution("glycine_max")


def test_bad_directories(tmp_path):
    with pytest.raises(PlantDataError, match="does not exist"):
        discover_species(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlantDataError, match="no species folders"):
        discover_species(tmp_path / "empty")
    (tmp_path / "d" / "zea_mays").mkdir(parents=True)
    (tmp_path / "d" / "zea_mays" / "notes.txt").write_text("hi")
    with pytest.raises(PlantDataError, match="zea_mays: species folder has no FASTA"):
        discover_species(tmp_path / "d")


def test_all_n_species_and_context_longer_than_chunk(tmp_path, data_dir):
    write_fasta(tmp_path / "d" / "zea_mays" / "x.fa", {"x": "N" * 5000, "y": "n" * 300})
    stream = SpeciesStream("zea_mays", [tmp_path / "d" / "zea_mays" / "x.fa"], 8, 0.5, 10_000)
    with pytest.raises(PlantDataError, match="species zea_mays: no window"):
        next(stream.windows())
    with pytest.raises(PlantDataError, match="no chunk can hold a window"):
        build_mixture(data_dir, {}, 1.0, context_size=300_000, overlap_ratio=0.5, chunk_size=1_200_000, seed=0)
    short = SpeciesStream("sp", sorted((data_dir / "arabidopsis").iterdir()), 4000, 0.5, 1_200_000)
    with pytest.raises(PlantDataError, match="no window of 4001 tokens"):
        next(short.windows())


def test_build_mixture_finds_a_species_without_windows_at_startup(data_dir):
    args = dict(context_size=16, overlap_ratio=0.5, chunk_size=10_000, seed=0)
    write_fasta(data_dir / "zea_mays" / "x.fa", {"x": "N" * 5000, "y": "n" * 300})
    with pytest.raises(PlantDataError, match="species zea_mays: no window of 17 tokens"):
        build_mixture(data_dir, {}, 1.0, **args)
    short = random_dna(90, 14)  # 15 tokens per ACGT run: none holds a window of 17
    write_fasta(data_dir / "zea_mays" / "x.fa", {"a": short + "N" + short, "b": short})
    with pytest.raises(PlantDataError, match="species zea_mays: no window of 17 tokens"):
        build_mixture(data_dir, {}, 1.0, **args)


def test_startup_check_skips_bad_files_without_changing_the_windows(tmp_path, caplog):
    header_less = tmp_path / "d" / "sp" / "a_noheader.fa"
    header_less.parent.mkdir(parents=True)
    header_less.write_text("ACGTACGTACGT\n")
    good = write_fasta(tmp_path / "d" / "sp" / "b_good.fa", {"g": random_dna(600, 15)})
    with caplog.at_level(logging.WARNING, logger="plant_lm.data"):
        mixture = build_mixture(tmp_path / "d", {}, 1.0, context_size=8, overlap_ratio=0.5, chunk_size=10_000, seed=0)
    stream = mixture.streams["sp"]
    assert list(stream.bad_files) == [str(header_less)] and caplog.text.count("skipping bad file") == 1
    unchecked = SpeciesStream("sp", [header_less, good], 8, 0.5, 10_000)
    assert stream_windows(stream, 30) == stream_windows(unchecked, 30)
    assert caplog.text.count("skipping bad file") == 2  # once at startup, once by the unchecked stream


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "sp"
    good = write_fasta(folder / "b_good.fa", {"g": random_dna(600, 11)})
    truncated = write_fasta(folder / "a_trunc.fa.gz", {"t": random_dna(50_000, 12)}, gz=True)
    truncated.write_bytes(truncated.read_bytes()[:300])
    header_less = folder / "c_noheader.fa"
    header_less.write_text("ACGTACGTACGT\n")
    protein = write_fasta(folder / "d_protein.fa", {"p": "MKVLQEFWP*"})
    gapped = write_fasta(folder / "e_alignment.fa", {"a": "ACGT--ACGT" * 60})  # gaps: as in gtdb_mamba, refused
    nameless = folder / "f_nameless.fa"
    nameless.write_text(">\n" + random_dna(600, 16) + "\n")
    stream = SpeciesStream("sp", [truncated, good, header_less, protein, gapped, nameless], 8, 0.5, 10_000)
    with caplog.at_level(logging.WARNING, logger="plant_lm.data"):
        windows = stream_windows(stream, 200)
    assert set(stream.bad_files) == {str(p) for p in (truncated, header_less, protein, gapped, nameless)}
    assert "unreadable" in stream.bad_files[str(truncated)]
    assert "before the first '>' header" in stream.bad_files[str(header_less)]
    assert "'L', 'Q', 'E', 'F', 'P', '*' not DNA" in stream.bad_files[str(protein)]
    assert stream.bad_files[str(gapped)].startswith(f"{gapped}: record a: '-' not DNA")
    assert stream.bad_files[str(nameless)] == f"{nameless}: record 1: empty FASTA header"
    # The truncated file yields its readable prefix in the first pass; then only the good file remains.
    good_windows = stream_windows(SpeciesStream("sp", [good], 8, 0.5, 10_000), 23)
    assert set(map(tuple, windows[-23:])) == set(map(tuple, good_windows))
    assert "skipping bad file" in caplog.text


def test_lowercase_soft_masked_gzip_accepted(tmp_path):
    seq = random_dna(600, 13)
    upper = write_fasta(tmp_path / "u" / "x.fa", {"x": seq})
    lower = tmp_path / "l" / "x.fa.gz"
    lower.parent.mkdir()
    with gzip.open(lower, "wt") as handle:
        handle.write(">x\n" + seq.lower() + "\n")
    a = stream_windows(SpeciesStream("u", [upper], 8, 0.5, 10_000), 5)
    b = stream_windows(SpeciesStream("l", [lower], 8, 0.5, 10_000), 5)
    assert a == b
