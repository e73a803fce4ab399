"""Streaming loader: shard partition over (rank, worker) slots, resume position, masking."""

from types import SimpleNamespace

import pytest
import torch
from datasets import load_from_disk

import data
from data import (
    DataDirError,
    ShardStream,
    batch_bounds,
    check_data_fingerprints,
    make_train_loader,
    mask_tokens,
    read_batch,
)
from model import CLS_ID, EOS_ID, ESM_VOCAB, MASK_ID, PAD_ID


def all_batches(train_dir):
    return {(p.name, s, e) for p in sorted(train_dir.glob("shard-*")) for s, e in batch_bounds(load_from_disk(str(p)))}


def test_two_ranks_two_workers_read_each_shard_once_per_cycle(tiny_shards, monkeypatch):
    train_dir, _ = tiny_shards
    everything = all_batches(train_dir)
    read = []
    for rank in range(2):
        stream = ShardStream(train_dir, rank, world_size=2, num_workers=2, mlm_probability=0.2)
        for worker in range(2):
            slot = rank * 2 + worker
            owned = stream.slot_shards(slot)
            n_owned = sum(len(batch_bounds(load_from_disk(str(p)))) for p in owned)
            cycle = [(p.name, s, e) for p, s, e in _take(stream._slot_batches(slot), n_owned)]
            assert {name for name, _, _ in cycle} == {p.name for p in owned}
            read += cycle
            # What the worker actually yields is this slot's batches, in this order.
            monkeypatch.setattr(data, "get_worker_info", lambda w=worker: SimpleNamespace(id=w))
            yielded = _take(iter(stream), 3)
            for (name, s, e), batch in zip(cycle, yielded):
                expected = read_batch(load_from_disk(str(train_dir / name)), s, e)
                assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert sorted(read) == sorted(everything)  # every batch exactly once across the 4 slots


def test_each_cycle_reshuffles_the_shard_order(tiny_shards):
    train_dir, _ = tiny_shards
    stream = ShardStream(train_dir, 0, world_size=1, num_workers=1, mlm_probability=0.2)
    n = len(all_batches(train_dir))
    shard_orders = []
    for cycle in range(6):
        names = [p.name for p, _, _ in _take(stream._slot_batches(0), n * (cycle + 1))][n * cycle :]
        shard_orders.append(tuple(dict.fromkeys(names)))
    assert len(set(shard_orders)) > 1 and all(sorted(o) == sorted(shard_orders[0]) for o in shard_orders)


@pytest.mark.smoke
def test_resume_skips_to_the_same_batches_and_masks(tiny_shards):
    train_dir, _ = tiny_shards
    full = ShardStream(train_dir, 1, world_size=2, num_workers=2, mlm_probability=0.2, seed=3)
    resumed = ShardStream(train_dir, 1, world_size=2, num_workers=2, mlm_probability=0.2, seed=3, start_batch=5)
    expected = _take(iter(make_train_loader(full, 2)), 12)[5:]
    got = _take(iter(make_train_loader(resumed, 2)), 7)
    for a, b in zip(expected, got, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(tiny_shards, tmp_path):
    train_dir, _ = tiny_shards
    n = len(list(train_dir.glob("shard-*")))
    with pytest.raises(DataDirError, match=f"has {n} shards but world_size 2 x num_workers {n}"):
        ShardStream(train_dir, 0, world_size=2, num_workers=n, mlm_probability=0.2)
    with pytest.raises(DataDirError, match="does not exist"):
        ShardStream(tmp_path / "missing", 0, 1, 0, 0.2)
    with pytest.raises(DataDirError, match="holds no shard"):
        ShardStream(tmp_path, 0, 1, 0, 0.2)


def test_masking_spares_special_tokens_and_labels_only_masked_positions():
    ids = torch.randint(4, 24, (64, 200), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1], ids[::2, 150:] = CLS_ID, EOS_ID, PAD_ID
    batch = {"input_ids": ids, "attention_mask": (ids != PAD_ID).long(), "labels": ids.clone()}
    out = mask_tokens(batch, 0.2, torch.Generator().manual_seed(1))
    chosen = out["labels"] != -100
    assert not chosen[ids == CLS_ID].any() and not chosen[ids == EOS_ID].any() and not chosen[ids == PAD_ID].any()
    assert torch.equal(out["labels"][chosen], ids[chosen])
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])
    maskable = (ids >= 4).sum().item()
    assert abs(chosen.sum().item() / maskable - 0.2) < 0.01
    assert abs((out["input_ids"][chosen] == MASK_ID).float().mean().item() - 0.8) < 0.03
    again = mask_tokens(batch, 0.2, torch.Generator().manual_seed(1))
    assert torch.equal(again["input_ids"], out["input_ids"])


def _take(iterator, n):
    return [item for _, item in zip(range(n), iterator)]


def _model_cfg(**overrides):
    return SimpleNamespace(
        **{"model_name": "esm2_tiny", "max_batch_size": 4096, "max_position_embeddings": 1026, **overrides}
    )


def _copy_packing(tiny_shards, tmp_path, **changes):
    """A dir holding only packing.json: the train shards' own, with `changes` applied (None deletes a key)."""
    import json

    packing = json.loads((tiny_shards[0] / "packing.json").read_text())
    for key, value in changes.items():
        packing.pop(key) if value is None else packing.__setitem__(key, value)
    (tmp_path / "packing.json").write_text(json.dumps(packing))
    return tmp_path


def test_fingerprint_matches_the_model_it_was_written_for(tiny_shards):
    check_data_fingerprints({"train": tiny_shards[0], "val": tiny_shards[1]}, _model_cfg())


@pytest.mark.parametrize(
    "changes, cfg, message",
    [
        ({"vocab_sha256": "0" * 64}, {}, "vocabulary sha256 000000000000"),
        ({"special_ids": {"cls": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 31}}, {}, "special ids"),
        ({"format_version": 99}, {}, "format_version 99 is newer"),
        ({}, {"max_batch_size": 512}, "token budget of 1024 but the config's model.max_batch_size is 512"),
        ({}, {"max_position_embeddings": 100}, "rows of up to 128 tokens"),
    ],
)
def test_fingerprint_mismatch_is_one_line_naming_both_sides(tiny_shards, tmp_path, changes, cfg, message):
    data_dir = _copy_packing(tiny_shards, tmp_path, **changes)
    with pytest.raises(DataDirError, match=message) as err:
        check_data_fingerprints({"train": data_dir}, _model_cfg(**cfg))
    assert str(data_dir / "packing.json") in str(err.value) and "\n" not in str(err.value)


def test_fingerprint_against_a_local_model_vocab_txt(tiny_shards, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "vocab.txt").write_text("\n".join(ESM_VOCAB[::-1]) + "\n")
    with pytest.raises(DataDirError, match="vocab.txt has"):
        check_data_fingerprints({"train": tiny_shards[0]}, _model_cfg(model_name=str(model_dir)))


def test_older_shards_without_fingerprint_only_warn(tiny_shards, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(data.log, "propagate", True)  # train.py's handler set-up turns it off; caplog needs it
    data_dir = _copy_packing(tiny_shards, tmp_path, format_version=None, vocab_sha256=None, special_ids=None)
    with caplog.at_level("WARNING", logger="esm2_fa"):
        check_data_fingerprints({"train": data_dir}, _model_cfg())
    assert "before vocabularies were recorded" in caplog.text
    (data_dir / "packing.json").unlink()
    with caplog.at_level("WARNING", logger="esm2_fa"):
        check_data_fingerprints({"train": data_dir}, _model_cfg())
    assert "no packing.json" in caplog.text
