"""Training runs: exact resume (across the speed switches), the schedule, and a 2-process torchrun run whose
validation AUC rises well above chance."""

import json
import math

import pytest
import torch
from conftest import RECIPE_DIR, compose_config, tiny_overrides
from safetensors.torch import load_file

from biorecipes_shared.testing import run_command, torchrun_command
from run_state import warmup_cosine
from train import main, run


def _read_tsv(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [(float(value), int(step)) for value, step in rows]


@pytest.mark.smoke
def test_resume_reproduces_the_uninterrupted_run_across_the_switches(gtdb_fixture, tmp_path):
    """Stopped at step 4 with activation checkpointing, resumed without it: the uninterrupted run's weights (incl.
    CurricularFace t), losses, AUC log and export; every training line of metrics.jsonl has real token throughput."""
    common = [
        *tiny_overrides(gtdb_fixture, tmp_path),
        "train.max_steps=6",
        "train.steps_per_epoch=3",
        "train.grad_accumulation=2",  # resume must also land on the right micro-batch
    ]
    straight = run(compose_config([*common, f"output_dir={tmp_path / 'straight'}"]))
    stopped = [*common, f"output_dir={tmp_path / 'resumed'}", "train.stop_at_step=4"]
    first = run(compose_config([*stopped, "train.activation_checkpointing=true"]))
    assert first["step"] == 4
    second = run(compose_config([*common, f"output_dir={tmp_path / 'resumed'}"]))
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
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    training = [line for line in lines if "loss" in line]
    assert [line["step"] for line in training] == [1, 2, 3, 4, 5, 6]
    assert all(line["tokens_per_s"] > 0 and line["useful_token_fraction"] == 1.0 for line in training)


@pytest.mark.smoke
def test_schedule_is_the_seeds_warmup_cosine():
    """torch's LinearLR + CosineAnnealingLR give the seed's closed formula (components.lr_lambda) at every step."""

    def seed_formula(step, warmup, max_steps, min_ratio):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    for lr, min_lr, warmup, max_steps in [(1.8e-3, 1e-5, 100, 1000), (1e-2, 1e-5, 10, 12), (1e-2, 0.0, 0, 50),
                                          (1e-2, 1e-5, 1, 50), (0.0, 1e-5, 3, 10)]:  # fmt: skip
        params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
        optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=lr)
        scheduler = warmup_cosine(optimizer, warmup, max_steps, min_lr)
        for step in range(max_steps):
            want = lr * seed_formula(step, warmup, max_steps, min_lr / lr if lr > 0 else 1.0)
            assert scheduler.get_last_lr() == pytest.approx([want, want], rel=1e-12, abs=0.0), (lr, warmup, step)
            optimizer.step()
            scheduler.step()


@pytest.mark.slow
def test_torchrun_two_processes_learns_same_genome_embeddings_and_one_cannot_continue(gtdb_fixture, tmp_path, capsys):
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

    # One process cannot continue the two processes' shards: refused in one line naming both.
    assert main(["--config-name", "sample", *overrides, "train.max_steps=102"]) == 1
    checkpoint = run_dir / "checkpoints" / "step_00000100"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {checkpoint} was saved by 2 process(es) and this run has 1: relaunch with 2 process(es) "
        "(training genomes and batches are sharded per process), or start a new output_dir"
    )
