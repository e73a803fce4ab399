"""Training runs: exact resume, and a 2-process torchrun run whose validation AUC rises well above chance."""

import pytest
import torch
from conftest import RECIPE_DIR, compose_config, tiny_overrides
from safetensors.torch import load_file

from biorecipes_shared.testing import run_command, torchrun_command
from train import run


def _read_tsv(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [(float(value), int(step)) for value, step in rows]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(gtdb_fixture, tmp_path):
    common = [
        *tiny_overrides(gtdb_fixture, tmp_path),
        "train.max_steps=6",
        "train.steps_per_epoch=3",
        "train.grad_accumulation=2",  # resume must also land on the right micro-batch
    ]
    straight = run(compose_config([*common, f"run_dir={tmp_path / 'straight'}"]))
    first = run(compose_config([*common, f"run_dir={tmp_path / 'resumed'}", "train.stop_at_step=4"]))
    assert first["step"] == 4
    second = run(compose_config([*common, f"run_dir={tmp_path / 'resumed'}"]))
    assert second["start_step"] == 4 and second["step"] == 6

    final = "checkpoints/step_00000006/model.safetensors"
    expected, got = load_file(tmp_path / "straight" / final), load_file(tmp_path / "resumed" / final)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert straight["losses"][-2:] == second["losses"][-2:]
    assert _read_tsv(tmp_path / "resumed" / "AUC_log.tsv") == _read_tsv(tmp_path / "straight" / "AUC_log.tsv")
    assert (tmp_path / "resumed" / "final_model" / "model.safetensors").is_file()
    assert torch.equal(expected["head.t"], got["head.t"]) and float(got["head.t"]) != 0.0  # CurricularFace t


@pytest.mark.slow
def test_torchrun_two_processes_learns_same_genome_embeddings(gtdb_fixture, tmp_path):
    overrides = [
        *tiny_overrides(gtdb_fixture, tmp_path),
        "model.d_model=32",
        "model.d_state=8",
        "data.fragment_bp=520",
        "data.train_tokens=64",
        "data.val_tokens=512",
        "train.batch_size=16",
        "train.max_steps=100",
        "train.steps_per_epoch=50",
        "train.lr=1e-2",
        "train.log_every=10",
        "val.at_start=true",
        "val.fragments_per_genome=6",
    ]
    result = run_command(
        torchrun_command("train.py", ["--config-name", "sample", *overrides], nproc=2), cwd=RECIPE_DIR, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    aucs = _read_tsv(run_dir / "AUC_log.tsv")
    print("validation AUC by step:", aucs)
    assert [step for _, step in aucs] == [0, 50, 100]
    assert aucs[-1][0] > 0.8 and aucs[-1][0] > aucs[0][0] + 0.08, aucs
    losses = _read_tsv(run_dir / "log_file.txt")
    assert losses[-1][0] < losses[0][0]
    assert (run_dir / "pairwise_distances_histogram.png").stat().st_size > 0
    assert "world size 2" in result.stderr
    assert len(list((tmp_path / "cache").glob("train-rank*of2-*"))) == 2  # one index per rank's shard
