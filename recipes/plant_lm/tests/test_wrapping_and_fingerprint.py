"""Chunks and windows independent of the FASTA line length; the data fingerprint recorded and checked on resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import random_dna, write_fasta

import fasta
from data import (
    PlantDataError,
    SpeciesStream,
    build_mixture,
    check_data_fingerprint,
    data_fingerprint,
    tokenize,
    window_count,
)
from fasta import stream_chunks


def variants(tmp_path, records):
    """The same records one-line, wrapped at 60 and at 7 with CRLF, and gzip one-line."""
    one_line = write_fasta(tmp_path / "one.fa", records, width=10**9)
    wrapped = write_fasta(tmp_path / "w60.fa", records, width=60)
    crlf = write_fasta(tmp_path / "w7.fa", records, width=7)
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    gz = write_fasta(tmp_path / "one.fa.gz", records, gz=True, width=10**9)
    return [one_line, wrapped, crlf, gz]


@pytest.mark.parametrize("block_bytes", [1 << 20, 61, 4096])
def test_chunks_bounded_and_identical_whatever_the_wrapping(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(fasta, "BLOCK_BYTES", block_bytes)  # small blocks split headers and CRLF pairs
    records = {"chr1": random_dna(20_000, 21) + "N" * 7 + random_dna(3_001, 22), "chr2": random_dna(555, 23)}
    chunk_size = 6 * 500
    reference = None
    for path in variants(tmp_path, records):
        chunks = [(rid, chunk.decode()) for rid, chunk in stream_chunks(path, chunk_size)]
        assert all(len(chunk) <= chunk_size for _, chunk in chunks), path
        assert "".join(c for rid, c in chunks if rid == "chr1") == records["chr1"]
        assert "".join(c for rid, c in chunks if rid == "chr2") == records["chr2"]
        reference = reference or chunks
        assert chunks == reference, path


def test_windows_identical_for_one_line_and_wrapped_genome(tmp_path):
    records = {"chr1": random_dna(60_000, 24), "chr2": random_dna(9_000, 25)}
    streams = [SpeciesStream("sp", [path], 32, 0.25, 6 * 1000) for path in variants(tmp_path, records)]
    windows = [np.stack(list(_one_pass(stream))) for stream in streams]
    assert len(windows[0]) > 200
    for other in windows[1:]:
        np.testing.assert_array_equal(other, windows[0])


def _one_pass(stream: SpeciesStream):
    """The windows of one pass over the files (the stream itself is endless)."""
    for _, chunk in stream_chunks(stream.files[0], stream.chunk_size):
        for tokens in tokenize(chunk):
            for k in range(window_count(len(tokens), stream.window_len, stream.stride)):
                yield tokens[k * stream.stride : k * stream.stride + stream.window_len]


def test_stream_matches_one_pass_reference(tmp_path):
    path = write_fasta(tmp_path / "x.fa", {"x": random_dna(30_000, 26)}, width=10**9)
    stream = SpeciesStream("sp", [path], 32, 0.25, 6 * 1000)
    expected = [w.tolist() for w in _one_pass(stream)]
    got = stream.windows()
    assert [next(got).tolist() for _ in expected] == expected


def test_fingerprint_recorded_checked_and_old_runs_warned(tmp_path, data_dir, caplog):
    args = dict(overlap_ratio=0.5, chunk_size=10_000, seed=0)
    mixture = build_mixture(data_dir, {}, 1.0, context_size=8, **args)
    fingerprint = mixture.fingerprint
    assert fingerprint["species_ids"] == {"arabidopsis": 0, "oryza_sativa": 1}
    assert fingerprint["tokenizer"]["kmer"] == 6 and len(fingerprint["tokenizer"]["sha256"]) == 64
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="plant_lm.data"):
        record = check_data_fingerprint(run, mixture, resuming=True)  # checkpoints from before fingerprints
    assert "missing" in caplog.text and not run.exists()  # start-up writes nothing ...
    next(mixture.batches(2, 1, epoch=0))
    assert json.loads(record.read_text()) == fingerprint  # ... the first batch does
    check_data_fingerprint(run, build_mixture(data_dir, {}, 1.0, context_size=8, **args), resuming=True)
    changed = build_mixture(data_dir, {}, 1.0, context_size=12, **args)
    with pytest.raises(PlantDataError) as caught:
        check_data_fingerprint(run, changed, resuming=True)
    message = str(caught.value)
    assert str(record) in message and str(data_dir) in message and "\n" not in message
    assert "window_tokens" in message and "stride_tokens" in message and "species_ids" not in message
    check_data_fingerprint(run, changed, resuming=False)  # a fresh run records its own settings
    next(changed.batches(2, 1, epoch=0))
    check_data_fingerprint(run, changed, resuming=True)
    assert data_fingerprint(["b", "a"], 8, 0.5, 10_000)["species_ids"] == {"a": 0, "b": 1}


def test_training_resume_refuses_other_data_settings(straight_run, capsys):
    from train import main

    cfg, _ = straight_run
    out = Path(cfg.output_dir)
    recorded = json.loads((out / "data_fingerprint.json").read_text())
    assert recorded["window_tokens"] == 17 and recorded["species_ids"] == {"arabidopsis": 0, "oryza_sativa": 1}
    args = ["--data_dir", cfg.data_dir, "--output_dir", str(out), "--d_model", "32", "--n_heads", "4"]
    args += ["--n_layers", "1", "--batch_size", "4", "--context_size", "16", "--steps_per_epoch", "3"]
    args += ["--n_epochs", "3", "--species_distribution", "", "--overlap_ratio", "0.25"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {out / 'data_fingerprint.json'}: the checkpoints were trained on other data")
    assert "stride_tokens: checkpoint 8 vs now 12" in err
