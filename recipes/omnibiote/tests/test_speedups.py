"""--compile and --activation_checkpointing: the same losses as the plain model, the same state-dict keys, and
checkpoints that compiled and eager runs read from each other."""

import json

import pytest
import torch
from mup import MuAdamW
from safetensors.torch import load_file

from model import OmniBioTA, OmniBioTAConfig
from train_encoder import main

TINY = "--n_layer 2 --n_head 2 --n_embd 32 --ctx_len 64 --mini_batch_size 2 --batch_size 4 --force_lr --lr 0.03"
TINY += " --val_batches 1 --log_freq 1 --source_weights genbank=0.5,uniprot=0.5 --ramp_fraction 0 --dropout 0"
BUDGET = 4 * 64 * 10  # 10 steps of 2 mini-batches of 2


def train(base_dir, out_dir, name, *extra):
    main(["--base_dir", str(base_dir), "--out_dir", str(out_dir), "--save_name", name, "--token_budget", str(BUDGET)]
         + TINY.split() + list(extra))  # fmt: skip
    lines = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}, load_file(
        out_dir / name / "final_model" / "model.safetensors"
    )


def tiny_model(dropout: float) -> OmniBioTA:
    torch.manual_seed(0)
    config = OmniBioTAConfig(vocab_size=40, n_layer=2, n_head=2, n_embd=32, ctx_len=32, dropout=dropout)
    return OmniBioTA(config)


def test_switches_keep_the_state_dict_keys():
    plain = tiny_model(0.0)
    fast = tiny_model(0.0).enable_speedups(compile_blocks=True, activation_checkpointing=True)
    assert list(fast.state_dict()) == list(plain.state_dict())  # no _orig_mod. prefixes
    fast.load_state_dict(plain.state_dict(), strict=True)
    assert all(hasattr(p, "infshape") for p in fast.parameters())  # muP shapes survive


def test_activation_checkpointing_gives_identical_losses_and_gradients_with_dropout():
    """Recomputation replays the dropout masks (non-reentrant checkpoint restores the RNG)."""
    ids = torch.randint(4, 40, (3, 32))
    doc_ids = (torch.arange(32) >= 20).long().expand(3, 32)
    labels = torch.where(torch.rand(3, 32, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)
    runs = []
    for recompute in (False, True):
        model = tiny_model(0.1).enable_speedups(activation_checkpointing=recompute)
        optimizer = MuAdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(5)
        losses = []
        for _ in range(3):
            loss = model(ids, doc_ids, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.slow
def test_compile_parity_and_resume_across_compile_on_and_off(tmp_path, sample_base_dir):
    """The one torch.compile test: 10 steps fp32 without dropout against the eager run, as eager 1-4 → compiled
    5-7 (reads an eager checkpoint) → eager with activation checkpointing 8-10 (reads a compiled one): every loss
    within 1e-4 relative, so compiled steps match eager ones and each run reads the other's checkpoints."""
    eager, eager_weights = train(sample_base_dir, tmp_path, "eager")
    assert sorted(eager) == list(range(1, 11))
    train(sample_base_dir, tmp_path, "switched", "--max_steps", "4")
    train(sample_base_dir, tmp_path, "switched", "--compile", "--max_steps", "7")
    losses, weights = train(sample_base_dir, tmp_path, "switched", "--activation_checkpointing")
    assert sorted(losses) == list(range(1, 11))
    assert all(losses[step] == pytest.approx(eager[step], rel=1e-4) for step in eager), (losses, eager)
    assert weights.keys() == eager_weights.keys()
    worst = max(float((weights[k] - eager_weights[k]).abs().max()) for k in weights)
    assert worst < 1e-3, worst  # Adam turns rounding-level gradient differences into lr-sized steps here
