"""Attention equivalence, causality, and the bucket memory rule of model.py."""

from __future__ import annotations

import math

import pytest
import torch

from model import PlantLM, blocked_local_attention, dense_local_attention


@pytest.mark.parametrize(("seq", "window"), [(64, 32), (100, 32), (5, 32), (37, 7), (32, 1)])
def test_blocked_local_attention_equals_dense_banded_sdpa(seq, window):
    torch.manual_seed(seq + window)
    q, k, v = (torch.randn(2, 3, seq, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    blocked = blocked_local_attention(q, k, v, window)
    dense = dense_local_attention(q, k, v, window)
    torch.testing.assert_close(blocked, dense)
    grads_blocked = torch.autograd.grad((blocked * dense.detach()).sum(), (q, k, v))
    grads_dense = torch.autograd.grad((dense * dense.detach()).sum(), (q, k, v))
    for a, b in zip(grads_blocked, grads_dense):
        torch.testing.assert_close(a, b)


def test_local_attention_window_is_really_limited():
    # A key further back than the window must not matter; one inside must.
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 20, 4) for _ in range(3))
    base = blocked_local_attention(q, k, v, 4)
    v_far = v.clone()
    v_far[..., 10, :] += 5.0
    changed = blocked_local_attention(q, k, v_far, 4)
    assert torch.equal(changed[..., :10, :], base[..., :10, :])
    assert torch.equal(changed[..., 14:, :], base[..., 14:, :])
    assert not torch.allclose(changed[..., 10:14, :], base[..., 10:14, :])


def tiny_model(**kwargs) -> PlantLM:
    torch.manual_seed(0)
    model = PlantLM(
        n_species=2, d_model=32, n_heads=4, n_layers=2, dropout=0.0, local_attn_window=4, max_positions=24, **kwargs
    )
    return model.eval()


def fill_memory(model: PlantLM, buckets: int = 2000) -> None:
    torch.manual_seed(1)
    model.memory.sums[:buckets] = torch.randn(buckets, 32)
    model.memory.counts[:buckets] = torch.rand(buckets) + 0.5


@pytest.mark.smoke
def test_model_is_causal():
    model = tiny_model()
    fill_memory(model)
    ids = torch.randint(0, 4096, (2, 24))
    species = torch.tensor([0, 1])
    with torch.no_grad():
        base = model(ids, species)["logits"]
        later = ids.clone()
        later[:, 15] = (later[:, 15] + 1) % 4096
        changed = model(later, species)["logits"]
    assert torch.equal(changed[:, :15], base[:, :15])
    assert not torch.allclose(changed[:, 15:], base[:, 15:])


def test_global_attention_reads_only_nonempty_buckets_and_species_matters():
    model = tiny_model()
    fill_memory(model, buckets=100)
    ids = torch.randint(0, 4096, (2, 16))
    with torch.no_grad():
        base = model(ids, torch.tensor([0, 0]))["logits"]
        model.memory.sums[500] = 1e3  # bucket 500 is empty (count 0): invisible
        assert torch.equal(model(ids, torch.tensor([0, 0]))["logits"], base)
        model.memory.sums[50] += 3.0  # bucket 50 is written: visible
        assert not torch.allclose(model(ids, torch.tensor([0, 0]))["logits"], base)
        other_species = model(ids, torch.tensor([1, 1]))["logits"]
    assert not torch.allclose(other_species, base)


def test_forward_stages_but_does_not_change_memory_until_commit():
    model = tiny_model()
    fill_memory(model, buckets=10)
    ids = torch.randint(0, 4096, (3, 16))
    species = torch.tensor([0, 1, 0])
    before = {k: v.clone() for k, v in model.memory.state_dict().items()}
    with torch.no_grad():
        first = model(ids, species, memory_write_len=8)["logits"]
        second = model(ids, species, memory_write_len=8)["logits"]
    assert torch.equal(first, second)  # staged writes are not read
    for key, value in model.memory.state_dict().items():
        assert torch.equal(value, before[key]), key
    model.memory.commit(global_context=1000, normalize_every=0)
    with torch.no_grad():
        assert not torch.allclose(model(ids, species)["logits"], first)


def test_commit_follows_the_documented_rule():
    model = tiny_model()
    memory = model.memory
    memory.sums[:] = torch.randn_like(memory.sums)
    memory.counts[:] = torch.rand_like(memory.counts)
    old_sums, old_counts = memory.sums.clone(), memory.counts.clone()
    ids = torch.tensor([[5, 7, 5, 9], [7, 7, 1, 2]])
    hidden = torch.randn(2, 4, 32)
    memory.stage(ids, hidden, write_len=2)  # positions 0 and 1 only
    memory.commit(global_context=100, normalize_every=0)
    decay = math.exp(-4 / 100)
    expected_sums, expected_counts = old_sums * decay, old_counts * decay
    for b, p in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        expected_sums[ids[b, p]] += hidden[b, p]
        expected_counts[ids[b, p]] += 1
    torch.testing.assert_close(memory.sums, expected_sums)
    torch.testing.assert_close(memory.counts, expected_counts)
    assert int(memory.commits) == 1 and float(memory.staged_counts.sum()) == 0.0


def test_normalisation_every_n_commits():
    memory = tiny_model().memory
    memory.sums[3] = torch.full((32,), 6.0)
    memory.counts[3] = 2.0
    for _ in range(2):
        memory.commit(global_context=100, normalize_every=3)
    means, _ = memory.read()
    assert means[3].pow(2).mean().sqrt().item() == pytest.approx(3.0)  # untouched before the 3rd commit
    memory.commit(global_context=100, normalize_every=3)
    means, nonempty = memory.read()
    assert means[3].pow(2).mean().sqrt().item() == pytest.approx(1.0)
    assert nonempty.sum() == 1 and torch.all(memory.sums[~nonempty] == 0)


def test_memory_is_in_the_state_dict_and_staging_is_not():
    keys = set(tiny_model().state_dict())
    assert {"memory.sums", "memory.counts", "memory.commits"} <= keys
    assert not any("staged" in key for key in keys)
