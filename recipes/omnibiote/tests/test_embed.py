"""embed.py: padding never changes an embedding, shapes and ids follow the input, bad input is one line."""

import gzip
import shutil

import numpy as np
import pytest
import torch

from biorecipes_shared import run_cli
from embed import embed_ids, main, token_batches
from errors import OmniBioteError
from model import OmniBioTA, OmniBioTAConfig
from preprocessing.fasta import read_fasta


@pytest.fixture(scope="module")
def final_model(tmp_path_factory, sample_tokenizer):
    out = tmp_path_factory.mktemp("model") / "final_model"
    torch.manual_seed(0)
    config = OmniBioTAConfig(vocab_size=sample_tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32, ctx_len=64)
    OmniBioTA(config).save_pretrained(out)
    shutil.copyfile(sample_tokenizer.model_file, out / "tokenizer.model")
    return out


def cli(argv) -> int:
    return run_cli(lambda: main(argv), user_errors=(OmniBioteError,))


@pytest.mark.parametrize("pooling", [pytest.param("mean", marks=pytest.mark.smoke), "first", "last", "max", "all"])
def test_an_embedding_does_not_depend_on_its_batch_mates(final_model, pooling):
    model = OmniBioTA.from_pretrained(final_model).eval()
    rng = np.random.default_rng(0)
    ids = [[6, *rng.integers(7, 512, n).tolist(), 2] for n in (3, 40, 11, 60, 1)]
    together = embed_ids(model, ids, pooling, tokens_per_batch=10_000, device=torch.device("cpu"))
    alone = embed_ids(model, ids, pooling, tokens_per_batch=1, device=torch.device("cpu"))
    assert together.dtype == np.float32
    assert together.shape == ((5, 62, 32) if pooling == "all" else (5, 32))
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)
    if pooling == "all":  # padding positions are zero, real ones are not
        assert not together[0, 5:].any() and np.abs(together[0, :5]).min(axis=-1).max() > 0


def test_token_batches_respect_the_budget_and_cover_every_record():
    lengths = [5, 50, 7, 64, 1, 30, 30]
    batches = token_batches(lengths, tokens_per_batch=64)
    assert sorted(i for batch in batches for i in batch) == list(range(7))
    assert all(max(lengths[i] for i in b) * len(b) <= 64 or len(b) == 1 for b in batches)


def test_fasta_rows_follow_the_input(final_model, sample_fasta, tmp_path_factory, tmp_path):
    # the first 80 of the sample's 600 proteins: several batches of 2048 tokens, a fifth of the time
    subset = tmp_path_factory.mktemp("input") / "first_80.faa"
    with gzip.open(sample_fasta, "rt") as handle:
        subset.write_text(">" + ">".join(handle.read().split(">")[1:81]))
    argv = ["--model", str(final_model), "--input", str(subset), "--modality", "protein"]
    assert cli([*argv, "--output", str(tmp_path / "emb"), "--tokens_per_batch", "2048"]) == 0
    matrix = np.load(tmp_path / "emb.npy")
    lines = (tmp_path / "emb.ids.tsv").read_text().splitlines()
    expected_ids = [rid for rid, _title, _seq in read_fasta(subset)]
    assert len(expected_ids) == 80
    assert lines[0] == "id\tmodality\tn_tokens\ttruncated"
    assert [line.split("\t")[0] for line in lines[1:]] == expected_ids
    assert matrix.shape == (len(expected_ids), 32) and matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert {line.split("\t")[1] for line in lines[1:]} == {"protein"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.ids.tsv", "emb.npy"]  # no temporary files


def test_genbank_records_embed_with_their_own_modality(final_model, sample_genbank, tmp_path):
    assert cli(["--model", str(final_model), "--input", str(sample_genbank), "--output", str(tmp_path / "g")]) == 0
    rows = [line.split("\t") for line in (tmp_path / "g.ids.tsv").read_text().splitlines()[1:]]
    assert [row[1] for row in rows] == ["dna"] and rows[0][2:] == ["64", "1"]  # 44 kb cut to ctx_len, and marked
    assert np.load(tmp_path / "g.npy").shape == (1, 32)


def test_bad_input_is_one_line(final_model, sample_fasta, tmp_path, capsys):
    assert cli(["--model", str(final_model), "--input", str(sample_fasta), "--output", str(tmp_path / "x")]) == 1
    bad = tmp_path / "bad.fa"
    bad.write_text(">ok\nMKV\n>broken\nMK9V\n")
    argv = ["--model", str(final_model), "--input", str(bad), "--modality", "protein", "--output", str(tmp_path / "y")]
    assert cli(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].endswith("a FASTA input needs --modality dna, rna or protein")
    assert err[1] == f"error: {bad}: record broken: invalid amino-acid character(s) '9'"
    assert not list(tmp_path.glob("x*")) and not list(tmp_path.glob("y*"))
