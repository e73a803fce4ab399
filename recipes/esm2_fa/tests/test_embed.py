"""Embeddings: one float32 row per protein, ids in FASTA order, padding never pooled, long proteins chunked."""

import json

import numpy as np
import pytest
import torch
from conftest import write_fasta

from embed import Piece, embed_pieces, main, read_proteins
from model import build_model, esm2_config, save_tokenizer

SEQS = {"short": "MKTAYIAKQR", "mid": "MSLNKVAELLQEHGLSPEVAQRIAQ" * 2, "long": "MKV" * 40}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "final_model"
    torch.manual_seed(0)
    build_model(esm2_config("esm2_tiny"), "eager").save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    from model import load_pretrained

    return load_pretrained(model_dir, attention="eager").eval()


def proteins(tmp_path, records, max_aa_length=1022):
    """read_proteins over a FASTA of (name, residues) records."""
    return read_proteins(write_fasta(tmp_path / f"in{len(list(tmp_path.iterdir()))}.fasta", records), max_aa_length)


def alone(model, tmp_path, name, seq):
    """The embedding of one protein embedded on its own (no padding at all)."""
    _, lengths, pieces = proteins(tmp_path, [(name, seq)])
    return embed_pieces(model, pieces, lengths, 10**6, torch.device("cpu"), False, per_residue=True)


def test_padding_never_changes_a_protein_embedding(model, tmp_path):
    records = [(f"{name} some description", seq) for name, seq in SEQS.items()]
    ids, lengths, pieces = proteins(tmp_path, records)
    means, residues = embed_pieces(model, pieces, lengths, 10**6, torch.device("cpu"), False, per_residue=True)
    assert ids == list(SEQS) and means.dtype == np.float32 and means.shape == (3, 64)
    assert residues.shape == (sum(len(s) for s in SEQS.values()), 64)
    for row, (name, seq) in enumerate(SEQS.items()):
        own_mean, own_residues = alone(model, tmp_path, name, seq)
        np.testing.assert_allclose(means[row], own_mean[0], rtol=1e-5, atol=1e-5)  # batched with padding vs alone
        start = sum(lengths[:row])
        np.testing.assert_allclose(residues[start : start + len(seq)], own_residues, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(own_mean[0], own_residues.mean(axis=0), rtol=1e-6, atol=1e-6)  # mean of residues


def test_pooling_leaves_out_cls_and_eos(model, tmp_path):
    _, lengths, pieces = proteins(tmp_path, [("p", SEQS["mid"])])
    assert pieces[0].tokens[0] == 0 and pieces[0].tokens[-1] == 2  # <cls> ... <eos>
    input_ids = torch.from_numpy(pieces[0].tokens.astype(np.int64))[None]
    with torch.no_grad():
        hidden = model.esm(input_ids, attention_mask=torch.ones_like(input_ids))[0][0]
    mean, _ = embed_pieces(model, pieces, lengths, 10**6, torch.device("cpu"), False, per_residue=False)
    np.testing.assert_allclose(mean[0], hidden[1:-1].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(mean[0], hidden.mean(0).numpy(), atol=1e-4)


def test_a_long_protein_is_chunked_into_pieces_and_keeps_every_residue(model, tmp_path):
    _, lengths, pieces = proteins(tmp_path, [("long", SEQS["long"])], max_aa_length=50)
    assert [p.n_residues for p in pieces] == [40, 40, 40] and [p.first_residue for p in pieces] == [1, 0, 0]
    assert [int(p.tokens[-1]) for p in pieces][-1] == 2 and len(pieces[1].tokens) == 40  # no <cls>/<eos> inside
    mean, residues = embed_pieces(model, pieces, lengths, 10**6, torch.device("cpu"), False, per_residue=True)
    assert residues.shape == (120, 64)
    np.testing.assert_allclose(mean[0], residues.mean(0), rtol=1e-6, atol=1e-6)
    whole, _ = alone(model, tmp_path, "long", SEQS["long"])  # unchunked: a different (longer) context, so not equal
    assert not np.allclose(mean[0], whole[0], atol=1e-4)


@pytest.mark.smoke
def test_cli_writes_ids_matrix_and_provenance_atomically(model_dir, tmp_path, capsys):
    fasta = write_fasta(tmp_path / "p.fasta", list(SEQS.items()))
    out = tmp_path / "emb"
    args = ["--model", str(model_dir), "--fasta", str(fasta), "--output_dir", str(out), "--attention", "eager"]
    assert main([*args, "--per_residue", "--max_aa_length", "50", "--token_budget", "120"]) == 0
    assert (out / "ids.txt").read_text().split() == list(SEQS)
    matrix, offsets = np.load(out / "embeddings.npy"), np.load(out / "offsets.npy")
    assert matrix.shape == (3, 64) and matrix.dtype == np.float32 and np.isfinite(matrix).all()
    assert offsets.tolist() == [0, 10, 60, 180] and np.load(out / "residues.npy").shape == (180, 64)
    info = json.loads((out / "embed_info.json").read_text())
    assert info["n_proteins"] == 3 and info["weights"] == "model.safetensors" and info["compute_dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "p.fasta"]  # no temporary folder left
    capsys.readouterr()
    assert main(args) == 1  # exists: refused, untouched
    assert "already exists" in capsys.readouterr().err and np.array_equal(np.load(out / "embeddings.npy"), matrix)


@pytest.mark.parametrize(
    "records, fragment",
    [
        ([("a", "MKT"), ("a", "MKV")], "id 'a' repeats record 1"),
        ([("a", "MK1T")], "invalid residue '1' at position 3"),
    ],
)
def test_bad_fasta_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, records, fragment):
    fasta = write_fasta(tmp_path / "bad.fasta", records)
    out = tmp_path / "emb"
    assert main(["--model", str(model_dir), "--fasta", str(fasta), "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and str(fasta) in err[0], err
    assert not out.exists()


def test_piece_bookkeeping_type():
    piece = Piece(0, np.array([0, 4, 5, 2], np.int8), 1, 2)
    assert piece.first_residue + piece.n_residues == len(piece.tokens) - 1


def test_evaluate_scores_use_the_same_masks_and_count_them(model, tmp_path):
    from evaluate import masked_lm_scores

    _, _, pieces = proteins(tmp_path, list(SEQS.items()), max_aa_length=50)
    first = masked_lm_scores(model, pieces, 0.15, seed=0, token_budget=120)
    assert first == masked_lm_scores(model, pieces, 0.15, seed=0, token_budget=120)  # masks fixed by the seed
    assert 0 < first["masked"] < 180 and 0.0 <= first["accuracy"] <= 1.0
    assert first["perplexity"] == pytest.approx(np.exp(first["loss"]))
