"""data.batching: length grouping and packing fill batches with cells, a packed batch computes exactly what the same
cells unpadded do, and training resumes bitwise in every mode (in process, and after kill -9)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import RECIPE_DIR, SAMPLE_DIR, tiny_bert, tiny_overrides
from safetensors.torch import load_file

import packed_attention
import train
from batching import BATCHING_MODES, MEGABATCH_BATCHES, epoch_order, length_grouped_order, pack_rows
from bench_batching import genecorpus_like_lengths
from biorecipes_shared.testing import kill_around_saves, run_command
from config import ConfigError, check_batching, load_config, validate
from data import MaskingCollator, batch_cells, batch_token_counts
from model import IGNORE_INDEX, BertForMaskedLM

VOCAB = ["<pad>", "<mask>", "<cls>", "<eos>"] + [f"G{i}" for i in range(60)]


def padded_fraction(lengths: np.ndarray, order: np.ndarray, micro_batch_size: int) -> float:
    """Real tokens / positions when consecutive cells of `order` form batches padded to their longest."""
    batches = lengths[order[: len(order) // micro_batch_size * micro_batch_size]].reshape(-1, micro_batch_size)
    return batches.sum() / (batches.max(axis=1).sum() * micro_batch_size)


def test_length_grouping_and_packing_fill_batches_with_cells():
    lengths = genecorpus_like_lengths(20_000)
    random = padded_fraction(lengths, epoch_order(len(lengths), 0, 3, 0, 1), 10)
    grouped_order = length_grouped_order(lengths, 0, 3, 10)
    grouped = padded_fraction(lengths, grouped_order, 10)
    rows = pack_rows(np.arange(1000), lengths, 2048, torch.Generator().manual_seed(0))
    packed = lengths[:1000].sum() / (len(rows) * 2048)
    assert 0.53 <= random <= 0.65 and grouped >= 0.95 and packed >= 0.95, (random, grouped, packed)
    assert sorted(grouped_order) == list(range(len(lengths)))
    assert lengths[grouped_order[0]] == lengths.max(), "the longest cell comes first (out of memory at step 1)"
    second = grouped_order[MEGABATCH_BATCHES * 10 : 2 * MEGABATCH_BATCHES * 10]
    assert (np.diff(lengths[second]) <= 0).all(), "each mega-batch is sorted longest first"
    assert sorted(np.concatenate(rows)) == list(range(1000)) and all(lengths[row].sum() <= 2048 for row in rows)


def tiny_model(hidden_dropout: float = 0.0, max_positions: int = 64) -> BertForMaskedLM:
    return tiny_bert(
        len(VOCAB), positions=max_positions, hidden_dropout_prob=hidden_dropout, attention_probs_dropout_prob=0.0
    )


def cells(lengths, cls: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [np.concatenate([[2] if cls else [], rng.integers(4, len(VOCAB), n)]).astype(np.int64) for n in lengths]


def packed_and_unpacked(rows: list[list[np.ndarray]]) -> tuple[dict, dict]:
    """A packed batch and the same cells one per row with the same masked tokens (cut out of the packed batch)."""
    packed = MaskingCollator(VOCAB, mlm_probability=0.3, generator=torch.Generator().manual_seed(3)).pack(rows)
    segments = [(r, s) for r in range(len(rows)) for s in range(1, len(rows[r]) + 1)]
    width = max(len(cell) for row in rows for cell in row)
    unpacked = {key: torch.zeros(len(segments), width, dtype=torch.long) for key in ("input_ids", "attention_mask")}
    unpacked["labels"] = torch.full((len(segments), width), IGNORE_INDEX)
    for i, (r, s) in enumerate(segments):
        where = packed["segment_ids"][r] == s
        for key in unpacked:
            unpacked[key][i, : int(where.sum())] = packed[key][r, where]
    return packed, unpacked


def loss_and_grads(model, batch, masked_logits_only: bool = True):
    model.zero_grad()
    loss = model(**batch, masked_logits_only=masked_logits_only).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("kernel", "masked_logits_only"), [("runs", True), ("runs", False), ("mask", True)])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_same_cells_unpacked(monkeypatch, kernel, masked_logits_only):
    """Attention run by run (CPU) and through a block-diagonal mask (CUDA without flash-attn) alike."""
    monkeypatch.setattr(packed_attention, "segment_kernel", lambda query: kernel)
    rows = [cells([20, 7, 30]), cells([40, 11]), cells([5])]
    packed, unpacked = packed_and_unpacked(rows)
    assert packed["input_ids"].shape == (3, 64) and packed["position_ids"][0, 20:27].tolist() == list(range(7))
    assert torch.equal((packed["labels"] != IGNORE_INDEX).sum(), (unpacked["labels"] != IGNORE_INDEX).sum())
    model = tiny_model()
    packed_loss, packed_grads = loss_and_grads(model, packed, masked_logits_only)
    loss, grads = loss_and_grads(model, unpacked, masked_logits_only)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_packed_rows_of_one_cell_each_compute_as_unpacked():
    """A corpus at the length cap packs one cell a row: then no segment mask and no position lookup, same numbers."""
    packed, unpacked = packed_and_unpacked([cells([40]), cells([25])])
    spec = packed_attention.attention_spec(packed["attention_mask"], packed["segment_ids"])
    assert not isinstance(spec, packed_attention.Segments)
    model = tiny_model()
    packed_loss, packed_grads = loss_and_grads(model, packed)
    loss, grads = loss_and_grads(model, unpacked)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_packed_cls_embeddings_equal_those_of_each_cell_alone():
    """V2 pools each cell at its <cls>: the block-diagonal attention keeps that embedding the cell's own."""
    rows = [cells([15, 9, 30], cls=True), cells([33, 20], cls=True)]
    packed, unpacked = packed_and_unpacked(rows)
    model = tiny_model().eval()
    with torch.no_grad():
        hidden = model.bert(
            packed["input_ids"], packed["attention_mask"], packed["position_ids"], packed["segment_ids"]
        )
        alone = model.bert(unpacked["input_ids"], unpacked["attention_mask"])
    starts = (packed["position_ids"] == 0) & (packed["segment_ids"] > 0)
    assert (packed["input_ids"][starts] == 2).all()
    torch.testing.assert_close(hidden[starts], alone[:, 0], atol=1e-5, rtol=1e-5)


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0):
    """flash_attn_varlen_func's contract in plain PyTorch: [tokens, heads, dim], each cu_seqlens run on its own."""
    assert cu_q is cu_k and cu_q.dtype == torch.int32 and max_q == int(cu_q.diff().max())
    out = torch.empty_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        run = [t[start:end].transpose(0, 1) for t in (q, k, v)]
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(*run).transpose(0, 1)
    return out


def test_the_varlen_kernel_path_sees_each_cell_as_one_sequence(monkeypatch):
    """The CUDA flash-attn path, run with a stand-in kernel: cu_seqlens split rows into their cells and padding."""
    rows = [cells([20, 7, 30]), cells([40, 11])]
    packed, _ = packed_and_unpacked(rows)
    model = tiny_model().eval()
    with torch.no_grad():
        monkeypatch.setattr(packed_attention, "segment_kernel", lambda query: "mask")
        expected = model(**packed).logits
        monkeypatch.setattr(packed_attention, "flash_attn_varlen_func", fake_varlen)
        monkeypatch.setattr(packed_attention, "segment_kernel", lambda query: "varlen")
        got = model(**packed).logits
    cu_seqlens, _ = packed_attention.Segments(packed["segment_ids"]).varlen()
    assert cu_seqlens.tolist() == [0, 20, 27, 57, 64, 104, 115, 128]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_batch_token_counts_counts_real_tokens_and_computed_positions():
    collator = MaskingCollator(VOCAB)
    assert batch_token_counts(collator(cells([20, 7]))) == (27, 2 * 32)
    assert batch_token_counts(collator.pack([cells([20, 7]), cells([3])])) == (30, 2 * 32)
    assert batch_cells(collator(cells([20, 7]))) == 2 and batch_cells(collator.pack([cells([20, 7]), cells([3])])) == 3


def test_batching_settings_are_checked():
    with pytest.raises(ConfigError, match="data.batching='sorted': use one of random, length_grouped, packed"):
        validate(load_config("l0_sanity", ["data.batching=sorted"]))
    te_packed = load_config("l0_sanity", ["data.batching=packed"])
    te_packed.model.use_te_layers = True
    with pytest.raises(ConfigError, match="data.batching=packed needs the plain layers"):
        check_batching(te_packed.model, te_packed.data)
    assert load_config("l0_sanity").data.batching == "length_grouped"


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final_model" / "model.safetensors")


def logged_losses(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records}


def varied_corpus(tmp_path) -> str:
    """The sample cells cut to 6-95 tokens (the sample's are 183-409, too even to pack): rows of 96 hold 1-10."""
    table = pq.read_table(SAMPLE_DIR / "cells.parquet")
    cut = [cell[: 6 + (i * 37) % 90] for i, cell in enumerate(table.column("input_ids").to_pylist())]
    column = pa.array(cut, type=table.schema.field("input_ids").type)
    path = tmp_path / "varied.parquet"
    pq.write_table(pa.table({"input_ids": column}).replace_schema_metadata(table.schema.metadata), path)
    return str(path)


def overrides(run_dir, corpus: str, mode: str, steps: int, **extra) -> list[str]:
    settings = {"data.batching": mode, "data.train_path": corpus, "data.max_seq_length": 96, **DROPOUT, **extra}
    return tiny_overrides(run_dir, steps=steps, **{"data.micro_batch_size": 3, **settings})


DROPOUT = {"model.hidden_dropout_prob": 0.1, "model.attention_probs_dropout_prob": 0.1}


@pytest.mark.parametrize("mode", BATCHING_MODES)
def test_resume_is_bitwise_in_every_batching_mode(tmp_path, mode):
    """Stop after step 3 (only step_3 kept, as after a kill), resume in a fresh run: the same losses and weights."""
    corpus, extra = varied_corpus(tmp_path), {"training.save_every": 3, "training.keep_last": 5}
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train.train(load_config("l0_sanity", overrides(full, corpus, mode, 6, **extra)))
    shutil.copytree(full / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    train.train(load_config("l0_sanity", overrides(resumed, corpus, mode, 6, **extra)))
    assert sorted(logged_losses(resumed)) == [4, 5, 6]
    assert all(logged_losses(resumed)[s] == logged_losses(full)[s] for s in (4, 5, 6))
    first, second = final_weights(full), final_weights(resumed)
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.slow
def test_kill_9_during_a_save_then_a_packed_rerun_equals_an_uninterrupted_run(tmp_path):
    """Packed rows after kill -9 (length_grouped, the default: test_run_contract; random shares its cell stream)."""
    mode = "packed"
    corpus = varied_corpus(tmp_path)

    def command(run_dir):
        extra = {"training.save_every": 2}
        return [sys.executable, str(RECIPE_DIR / "train.py"), *overrides(run_dir, corpus, mode, 6, **extra)]

    run_command(command(tmp_path / "straight"), cwd=tmp_path)
    report = kill_around_saves(command(tmp_path / "killed"), tmp_path / "killed" / "checkpoints", kills=1, seed=4)
    assert report.kills == 1 and report.failures == [], report
    assert logged_losses(tmp_path / "killed") == logged_losses(tmp_path / "straight")
    first, second = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert all(torch.equal(first[key], second[key]) for key in first)
