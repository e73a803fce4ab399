"""training.compile and training.activation_checkpointing: same losses as eager, interchangeable checkpoints, and
every training line of metrics.jsonl says how much of the compute was real tokens."""

from __future__ import annotations

import shutil

import pytest
from conftest import tiny_overrides

import train
from biorecipes_shared import read_metrics
from config import load_config
from model import BertForMaskedLM, configure_layers, geneformer_config

FP32_NO_DROPOUT = {
    "training.bf16": "false",
    "model.hidden_dropout_prob": 0.0,
    "model.attention_probs_dropout_prob": 0.0,
    "training.lr_schedule": "constant",  # the schedule must not depend on max_steps: runs are cut and extended
    "training.warmup_steps": 0,
    "training.save_every": 3,
    "training.keep_last": 5,
}


def losses(run_dir) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run_dir / "metrics.jsonl")}


def run(run_dir, steps: int, **extra) -> dict[int, float]:
    train.train(load_config("l0_sanity", tiny_overrides(run_dir, steps=steps, **extra)))
    return losses(run_dir)


def test_configure_layers_keeps_the_state_dict_keys():
    model = BertForMaskedLM(geneformer_config(50, hidden_size=32, num_attention_heads=2, intermediate_size=64))
    before = list(model.state_dict())
    configure_layers(model, compile=True, activation_checkpointing=True)
    assert list(model.state_dict()) == before and model.bert.activation_checkpointing


def test_activation_checkpointing_gives_identical_losses_and_logs_useful_tokens(tmp_path):
    """With dropout on: the recomputed forward replays the same masks, so every loss is bitwise the same."""
    dropout = {"model.hidden_dropout_prob": 0.1, "model.attention_probs_dropout_prob": 0.1}
    plain = run(tmp_path / "plain", 4, **dropout)
    checkpointed = run(tmp_path / "ac", 4, **dropout, **{"training.activation_checkpointing": "true"})
    assert checkpointed == plain and len(plain) == 4
    for record in read_metrics(tmp_path / "ac" / "metrics.jsonl"):
        # sample cells are all longer than max_seq_length=64: every position is a real token
        assert record["tokens_per_s"] > 0 and record["useful_token_fraction"] == 1.0


@pytest.mark.slow
def test_compile_matches_eager_and_checkpoints_interchange(tmp_path):
    """6 steps, fp32, dropout off: compiled losses within 1e-4 relative of eager; a compiled run's checkpoint
    resumed eagerly and an eager run's checkpoint resumed compiled continue as the eager run does. The one compile
    test of the recipe (compiling costs most of its time)."""
    eager = run(tmp_path / "eager", 6, **FP32_NO_DROPOUT)
    compiled_first = run(tmp_path / "mixed", 3, **FP32_NO_DROPOUT, **{"training.compile": "true"})
    mixed = run(tmp_path / "mixed", 6, **FP32_NO_DROPOUT)  # resumes the compiled run's step 3, eagerly
    step_3 = "checkpoints/step_00000003"
    shutil.copytree(tmp_path / "eager" / step_3, tmp_path / "swap" / step_3)  # an eager checkpoint, resumed compiled
    swapped = run(tmp_path / "swap", 6, **FP32_NO_DROPOUT, **{"training.compile": "true"})
    assert sorted(eager) == list(range(1, 7)) and sorted(mixed) == sorted(eager) and sorted(swapped) == [4, 5, 6]
    assert all(mixed[step] == compiled_first[step] for step in range(1, 4))
    for step, loss in eager.items():
        assert mixed[step] == pytest.approx(loss, rel=1e-4)
        if step > 3:
            assert swapped[step] == pytest.approx(loss, rel=1e-4)
