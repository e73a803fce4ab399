"""embed.py: the recipe's tokens, ids that locate each window, shapes, padding invariance, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_dna, write_fasta

import embed
from config import Config
from data import tokenize
from export import load_export, write_export
from model import PlantLM


@pytest.fixture
def export(tmp_path) -> Path:
    cfg = Config(d_model=16, n_heads=2, n_layers=1, context_size=12, overlap_ratio=0.5, local_attn_window=4)
    torch.manual_seed(0)
    model = PlantLM(2, 16, 2, 1, 0.1, 4, max_positions=12)
    with torch.no_grad():  # a memory with content, so the global attention is exercised
        model.memory.sums.normal_()
        model.memory.counts[::3] = 2.0
    return write_export(model, cfg, ["arabidopsis", "oryza_sativa"], tmp_path / "final_model")


@pytest.fixture
def fasta(tmp_path) -> Path:
    records = {"chr1": random_dna(500, 1) + "NNNN" + random_dna(40, 2) + "N" + random_dna(5, 3), "chr2": "ACGTAC"}
    return write_fasta(tmp_path / "plants" / "arabidopsis" / "chr.fa.gz", records, gz=True)


def read_records(path: Path) -> dict[str, str]:
    import gzip

    records, name = {}, None
    with gzip.open(path, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                name = line[1:].split()[0]
                records[name] = ""
            else:
                records[name] += line.strip()
    return records


def test_token_runs_are_the_recipes_tokens():
    chunk = (random_dna(100, 4) + "NRY" + random_dna(7, 5) + "n" + random_dna(3, 6) + "N" + random_dna(30, 7)).encode()
    runs = list(embed.token_runs(chunk))
    expected = tokenize(chunk)
    assert len(runs) == len(expected) == 3
    for (start, tokens), want in zip(runs, expected):
        assert np.array_equal(tokens, want)
        assert np.array_equal(tokenize(chunk[start : start + len(tokens) * 6])[0], want)


def test_window_starts_cover_every_token():
    assert embed.window_starts(5, 12, 6) == [0]
    assert embed.window_starts(12, 12, 6) == [0]
    assert embed.window_starts(13, 12, 6) == [0, 6]
    assert embed.window_starts(30, 12, 6) == [0, 6, 12, 18]


@pytest.mark.smoke
def test_embed_ids_locate_each_window_and_padding_is_never_pooled(fasta, export, tmp_path, capsys):
    out = tmp_path / "emb" / "x"
    assert embed.main([str(fasta), "--model", str(export), "--out", str(out), "--batch_size", "4"]) == 0
    matrix, ids = np.load(tmp_path / "emb/x.npy"), (tmp_path / "emb/x.ids.txt").read_text().splitlines()
    assert matrix.dtype == np.float32 and matrix.shape == (len(ids), 16) and np.isfinite(matrix).all()
    # chr1: 500 bp = 83 tokens -> windows at 0, 6, ..., 72; 40 bp = 6 tokens -> 1 window; 5 bp and chr2: 1 token run
    assert len(ids) == 13 + 1 + 1
    assert ids[0] == "chr.fa.gz:chr1:0-72" and ids[13] == "chr.fa.gz:chr1:504-540" and ids[-1] == "chr.fa.gz:chr2:0-6"
    assert not list((tmp_path / "emb").glob(".tmp-*"))
    model, _ = load_export(export)
    records = read_records(fasta)
    for row, window_id in enumerate(ids):
        _, record, span = window_id.split(":")
        start, end = map(int, span.split("-"))
        (tokens,) = tokenize(records[record][start:end])
        alone = torch.from_numpy(tokens.astype(np.int64))[None]
        with torch.no_grad():  # each window alone, unpadded, must give the row computed in a padded batch
            want = model.pooled_embedding(alone, torch.tensor([0]), torch.tensor([len(tokens)]))[0]
        np.testing.assert_allclose(matrix[row], want.numpy(), rtol=1e-5, atol=1e-5)
    assert f"{len(ids)} window embeddings of dimension 16" in capsys.readouterr().out


def test_padding_content_does_not_change_the_embedding(export):
    model, _ = load_export(export)
    tokens = torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(0))
    other = tokens.clone()
    other[0, 7:] = torch.randint(0, 4096, (5,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model.pooled_embedding(tokens, torch.tensor([1]), torch.tensor([7]))
        b = model.pooled_embedding(other, torch.tensor([1]), torch.tensor([7]))
        c = model.pooled_embedding(tokens[:, :7], torch.tensor([1]), torch.tensor([7]))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_unknown_species_is_one_line(fasta, export, tmp_path, capsys):
    args = [str(fasta), "--model", str(export), "--out", str(tmp_path / "x"), "--species", "zea_mays"]
    assert embed.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {fasta}: species 'zea_mays' is not one the model was trained on "
        "(['arabidopsis', 'oryza_sativa']); use --species"
    )
    assert not list(tmp_path.glob("x*"))
