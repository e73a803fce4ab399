"""embed.py: the training fragment rules, ids that locate each embedded fragment, shapes, batch invariance, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_fasta_gz
from safetensors.torch import load_file

import embed
from biorecipes_shared import export_safetensors
from data import FragmentSampler, KmerTokenizer, reverse_complement_codes
from export import export_config
from model import EmbedderConfig, GenomeFragmentEmbedder
from preprocess import BASE_LOOKUP

FRAGMENTS = {
    "fragment_bp": 120,
    "tokens": 40,
    "max_n_fraction": 0.0,
    "reverse_complement": True,
    "fragments_per_genome": 4,
    "seed": 3,
}


def random_dna(n: int, rng: np.random.Generator) -> str:
    return "".join(rng.choice(list("ACGT"), size=n))


@pytest.fixture
def genomes(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for g in range(3):
        contigs = [(f"contig{c}", random_dna(300 + 100 * c, rng)) for c in range(2)]
        contigs.append(("short", random_dna(50, rng)))  # shorter than a fragment: never drawn
        paths.append(write_fasta_gz(tmp_path / f"GCA_00000000{g}.1_genomic.fna.gz", contigs))
    return paths


@pytest.fixture
def export(tmp_path) -> Path:
    tokenizer = KmerTokenizer(3)
    config = EmbedderConfig(tokenizer.vocab_size, tokenizer.pad_token, d_model=8, n_layers=1, d_state=4, backend="pure")
    torch.manual_seed(0)
    model = GenomeFragmentEmbedder(config)
    return export_safetensors(model, {**export_config(config, 3), "fragments": FRAGMENTS}, tmp_path / "final_model")


def read_contigs(path: Path) -> dict[str, str]:
    contigs, name = {}, None
    with gzip.open(path, "rt") as handle:
        for line in handle:
            if line.startswith(">"):
                name = line[1:].split()[0]
                contigs[name] = ""
            else:
                contigs[name] += line.strip()
    return contigs


def test_fragments_are_the_samplers_own(genomes):
    index = embed.read_genomes(genomes)
    sampler = FragmentSampler(index, 120, max_n_fraction=0.0)
    picks = np.repeat(np.arange(len(sampler)), 5)
    expected = sampler.sample(np.random.default_rng(7), picks)
    got, _ = embed.sample_with_starts(sampler, np.random.default_rng(7), picks)
    assert np.array_equal(expected, got)


@pytest.mark.smoke
def test_embed_writes_ids_that_locate_each_fragment_and_a_float32_matrix(genomes, export, tmp_path, capsys):
    out = tmp_path / "emb" / "val"
    assert embed.main([*map(str, genomes), "--model", str(export), "--out", str(out), "--batch_size", "5"]) == 0
    matrix = np.load(out.with_name("val.npy"))
    ids = out.with_name("val.ids.txt").read_text().splitlines()
    assert matrix.shape == (12, 8) and matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert len(ids) == 12 and len(set(ids)) == 12
    assert not list(out.parent.glob(".tmp-*"))
    tokenizer = KmerTokenizer(3)
    model = GenomeFragmentEmbedder(EmbedderConfig(tokenizer.vocab_size, tokenizer.pad_token, 8, 1, 4, backend="pure"))
    model.load_state_dict(load_file(export / "model.safetensors"))
    model.eval()
    for row, fragment_id in enumerate(ids):
        genome, contig, start, strand = fragment_id.split(":")
        assert genome.startswith("GCA_") and contig != "short" and strand in "+-"
        bases = read_contigs(next(p for p in genomes if p.name.startswith(genome)))[contig]
        window = bases[int(start) : int(start) + 40 + 3 - 1]
        codes = BASE_LOOKUP[np.frombuffer(window.encode(), dtype=np.uint8)]
        if strand == "-":
            codes = reverse_complement_codes(codes[None])[0]
        tokens = tokenizer.tokens_from_codes(torch.from_numpy(codes.copy())[None])
        with torch.no_grad():
            torch.testing.assert_close(model(tokens)[0].numpy(), matrix[row], rtol=1e-5, atol=1e-5)
    assert "12 fragment embeddings of dimension 8" in capsys.readouterr().out


def test_embeddings_do_not_depend_on_the_batch(genomes, export, tmp_path):
    for batch in ("1", "64"):
        embed.main([*map(str, genomes), "--model", str(export), "--out", str(tmp_path / batch), "--batch_size", batch])
    np.testing.assert_allclose(np.load(tmp_path / "1.npy"), np.load(tmp_path / "64.npy"), rtol=1e-5, atol=1e-6)


def test_same_seed_same_fragments_other_seed_others(genomes, export, tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        embed.main([*map(str, genomes), "--model", str(export), "--out", str(tmp_path / name), "--seed", seed])
    ids = {name: (tmp_path / f"{name}.ids.txt").read_text() for name in "abc"}
    assert ids["a"] == ids["b"] != ids["c"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "200"], "error: --tokens=200 tokens needs fragments of >= 202 bp, data.fragment_bp is 120"),
        (["--max_n_fraction", "2"], "error: --max_n_fraction=2.0 must be in [0, 1]"),
    ],
)
def test_bad_settings_are_one_line(genomes, export, tmp_path, capsys, extra, message):
    assert embed.main([*map(str, genomes), "--model", str(export), "--out", str(tmp_path / "x"), *extra]) == 1
    assert capsys.readouterr().err.strip() == message
    assert not list(tmp_path.glob("x*"))


def test_not_an_export_is_one_line(genomes, tmp_path, capsys):
    assert embed.main([str(genomes[0]), "--model", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path}: not an exported model (needs config.json and model.safetensors)"
    )
