"""Resume determinism, preemption and multi-process behaviour, each run as fresh processes of toy_train.py."""

import signal
import subprocess

import pytest
import torch
from conftest import toy_command
from safetensors.torch import load_file

from biorecipes_shared.checkpoint import latest_checkpoint
from biorecipes_shared.logging_utils import read_metrics


def losses(path):
    return {record["step"]: record["loss"] for record in read_metrics(path)}


def assert_same_weights(dir_a, dir_b):
    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def straight_and_resumed(toy, tmp_path, steps, stop_after, *extra, nproc=1):
    """Run `steps` straight through, and as a run stopped after `stop_after` plus a resumed fresh process."""
    straight, split = tmp_path / "straight", tmp_path / "split"

    def run(run_dir, *args):
        common = ["--output-dir", str(run_dir), "--steps", str(steps)]
        toy(*common, *args, *extra, nproc=nproc)

    run(straight)
    run(split, "--stop-after", str(stop_after))
    assert latest_checkpoint(split / "checkpoints").name == f"step_{stop_after:08d}"
    run(split, "--resume")
    return straight, split


def test_resume_is_bitwise_identical(toy, tmp_path):
    # 20 steps cross an epoch boundary (96 samples / batch 8 = 12 steps per epoch) after the resume point.
    straight, split = straight_and_resumed(toy, tmp_path, 20, 10)
    assert losses(straight / "metrics.jsonl") == losses(split / "metrics.jsonl")
    assert sorted(losses(split / "metrics.jsonl")) == list(range(1, 21))
    assert_same_weights(straight / "final_model", split / "final_model")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        toy_command(
            "--output-dir",
            str(tmp_path),
            "--steps",
            "100000",
            "--sleep",
            "0.05",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.strip() == "step 3":
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err
    saved = latest_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and int(saved.name.split("_")[1]) >= 3
    # a stopped run is not a finished one: the checkpoint is its state, and the same command continues it
    assert not (tmp_path / "final_model").exists() and not (tmp_path / "run_finished.json").exists()


@pytest.mark.slow
def test_two_process_ddp_resume(toy, tmp_path):
    straight, split = straight_and_resumed(toy, tmp_path, 8, 4, nproc=2)
    assert losses(straight / "metrics.jsonl") == losses(split / "metrics.jsonl")
    assert_same_weights(straight / "final_model", split / "final_model")
    manifest_files = (latest_checkpoint(split / "checkpoints") / "manifest.json").read_text()
    assert "rank_0.pt" in manifest_files and "rank_1.pt" in manifest_files


@pytest.mark.slow
def test_two_process_fsdp2_sharded_resume(toy, tmp_path):
    straight, split = straight_and_resumed(toy, tmp_path, 8, 4, "--fsdp", nproc=2)
    assert losses(straight / "metrics.jsonl") == losses(split / "metrics.jsonl")
    assert_same_weights(straight / "final_model", split / "final_model")
    assert (latest_checkpoint(split / "checkpoints") / "sharded" / ".metadata").is_file()
