"""Two processes under torchrun on gloo: FSDP2 with a sharded checkpoint resumed exactly (activation checkpointing on;
DDP and world-size changes: test_run_contract.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import transformers
from conftest import RECIPE_DIR, tiny_overrides

from biorecipes_shared.testing import run_command, torchrun_command


def torchrun(overrides: list[str]):
    return run_command(torchrun_command(RECIPE_DIR / "train.py", overrides, nproc=2), cwd=RECIPE_DIR)


def losses_by_step(output_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records}


@pytest.mark.slow
def test_fsdp2_two_processes_resume_exactly(tmp_path):
    overrides = tiny_overrides(
        tmp_path,
        steps=6,
        **{
            "training.use_fsdp": "true",
            "training.save_every": 3,
            "model.hidden_dropout_prob": 0.1,
            "training.activation_checkpointing": "true",  # per layer, inside FSDP2's per-layer units
        },
    )
    torchrun(overrides)
    first = losses_by_step(tmp_path)
    assert (tmp_path / "checkpoints" / "step_00000003" / "sharded" / ".metadata").is_file()
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000006")  # as if killed between step 3 and step 6
    shutil.rmtree(tmp_path / "final_model")
    (tmp_path / "run_finished.json").unlink()
    result = torchrun(overrides)
    assert "resumed from" in result.stderr and "continuing with step 4" in result.stderr
    again = losses_by_step(tmp_path)
    assert [again[s] for s in (4, 5, 6)] == [first[s] for s in (4, 5, 6)]
    _, info = transformers.BertForMaskedLM.from_pretrained(tmp_path / "final_model", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
