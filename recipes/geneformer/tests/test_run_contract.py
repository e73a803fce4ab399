"""The run contract (issue 11) for geneformer: kill -9, SIGTERM, finished reruns, world-size changes, write errors."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import RECIPE_DIR, copy_run, tiny_overrides
from safetensors import SafetensorError
from safetensors.torch import load_file

import train
from biorecipes_shared import checkpoint as checkpoint_module
from biorecipes_shared import read_metrics, verify_checkpoint
from biorecipes_shared.testing import child_env, kill_around_saves, run_command, torchrun_command

TRAIN = str(RECIPE_DIR / "train.py")


def losses(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl")]


def same_weights(a, b) -> bool:
    first, second = (
        load_file(a / "final_model" / "model.safetensors"),
        load_file(b / "final_model" / "model.safetensors"),
    )
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def data_position(run_dir, step: int) -> dict:
    state = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "training_state.pt", weights_only=True)
    return state["extra"]["data_position"]


DROPOUT = {"model.hidden_dropout_prob": 0.1, "model.attention_probs_dropout_prob": 0.1}


def command(run_dir) -> list[str]:
    """The command the interrupted runs and their uninterrupted reference share: 12 steps, a save every 2."""
    extra = {"training.save_every": 2, "training.keep_last": 2, **DROPOUT}
    return [sys.executable, TRAIN, *tiny_overrides(run_dir, steps=12, **extra)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run of `command`, once for every interrupted one to equal."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_command(command(run_dir), cwd=run_dir.parent)
    return run_dir


@pytest.mark.slow
def test_kill_9_around_saves_then_the_same_command_equals_an_uninterrupted_run(tmp_path, straight):
    report = kill_around_saves(command(tmp_path / "killed"), tmp_path / "killed" / "checkpoints", kills=3, seed=2)
    assert report.kills == 3 and report.failures == [], report
    assert same_weights(straight, tmp_path / "killed")
    assert losses(tmp_path / "killed") == losses(straight)
    leftovers = [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if not p.name.startswith("step_")]
    assert leftovers == []


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_rerun_equals_an_uninterrupted_run(tmp_path, straight):
    proc = subprocess.Popen(command(tmp_path / "cut"), stderr=subprocess.PIPE, text=True, env=child_env(), cwd=tmp_path)
    for line in proc.stderr:
        if "step 3/12" in line:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # a scheduler that signals again while the preemption checkpoint is being written
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            break
    proc.communicate()
    assert proc.returncode == 0
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    stopped_at = max(step for step, _ in losses(tmp_path / "cut"))  # every step is logged
    assert saved[-1] == f"step_{stopped_at:08d}" and stopped_at < 12, (saved, stopped_at)  # the stop step saved
    assert not (tmp_path / "cut" / "final_model").exists()
    verify_checkpoint(tmp_path / "cut" / "checkpoints" / saved[-1])
    run_command(command(tmp_path / "cut"), cwd=tmp_path)
    assert losses(tmp_path / "cut") == losses(straight)
    assert same_weights(straight, tmp_path / "cut")


@pytest.mark.slow
def test_sigterm_during_imports_and_set_up_exits_0_before_the_first_step(tmp_path):
    command = [sys.executable, TRAIN, *tiny_overrides(tmp_path / "run", steps=40)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=tmp_path)
    time.sleep(1.5)  # importing torch alone takes longer: the signal lands during imports or set-up
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "SIGTERM before step 1: stopped" in err and "step 1/40" not in err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not (checkpoints.exists() and any(checkpoints.iterdir())) and not (tmp_path / "run" / "final_model").exists()


@pytest.mark.smoke
def test_a_finished_run_is_left_alone_and_says_so_in_one_line(tmp_path, capsys, finished_two_step_run):
    tmp_path = copy_run(finished_two_step_run, tmp_path / "run")
    weights = tmp_path / "final_model" / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes(), sorted(p.name for p in tmp_path.rglob("*")))
    capsys.readouterr()
    assert train.main(tiny_overrides(tmp_path, steps=2)) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"run in {tmp_path} already finished at step 2 (max steps reached); final model: {tmp_path / 'final_model'}. "
        "Nothing to do (use a new output directory or more steps to train further)"
    ]
    assert err == ""
    assert (weights.stat().st_mtime_ns, weights.read_bytes(), sorted(p.name for p in tmp_path.rglob("*"))) == before
    assert json.loads((tmp_path / "run_finished.json").read_text())["step"] == 2


def torch_full_disk(monkeypatch):
    def full_disk(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full_disk)


def safetensors_full_disk(monkeypatch):
    def full_disk(*args, **kwargs):  # what safetensors raises on ENOSPC: not an OSError
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)


@pytest.mark.parametrize("fill_disk", [torch_full_disk, safetensors_full_disk])
def test_a_full_disk_is_one_line_and_the_next_run_resumes_cleanly(
    tmp_path, capsys, monkeypatch, fill_disk, finished_two_step_run
):
    tmp_path = copy_run(finished_two_step_run, tmp_path / "run")
    fill_disk(monkeypatch)
    capsys.readouterr()
    assert train.main(tiny_overrides(tmp_path, steps=4)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "step_00000004" in err[0], err
    assert "no space left on device" in err[0].lower()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    verify_checkpoint(tmp_path / "checkpoints" / "step_00000002")
    monkeypatch.undo()
    assert train.main(tiny_overrides(tmp_path, steps=4)) == 0
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run_finished.json").read_text())["step"] == 4


def test_an_unwritable_output_dir_is_one_line(tmp_path, capsys, monkeypatch):
    real_mkdir = type(tmp_path).mkdir

    def no_permission(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "run")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)  # the corpus cache lives elsewhere

    monkeypatch.setattr(type(tmp_path), "mkdir", no_permission)
    assert train.main(tiny_overrides(tmp_path / "run", steps=2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'run'}: Permission denied"]


def test_the_run_folder_has_one_shape(finished_two_step_run):
    tmp_path = finished_two_step_run
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != ".run.lock")  # the shared run-folder lock
    assert names == ["checkpoints", "final_model", "loss.tsv", "loss_curve.png", "metrics.jsonl", "run_finished.json"]
    assert sorted(p.name for p in (tmp_path / "final_model").iterdir()) == [
        "config.json",
        "model.safetensors",
        "vocab.txt",
    ]
    assert data_position(tmp_path, 2) == {"epoch": 0, "cells_done": 8}


@pytest.mark.slow
def test_ddp_and_another_world_size_continue_the_global_data_position(tmp_path):
    """4 steps on 2 processes (DDP, activation checkpointing), to 8 on 1, to 12 on 2 again: each resume continues
    the data position with the cells of every run before; DDP saves one file per rank and exports one model."""

    def launch(nproc: int, steps: int):
        extra = {"training.save_every": 4, "training.activation_checkpointing": "true"}
        overrides = tiny_overrides(tmp_path, steps=steps, **extra)
        command = torchrun_command(TRAIN, overrides, nproc) if nproc > 1 else [sys.executable, TRAIN, *overrides]
        return run_command(command, cwd=tmp_path)

    launch(2, 4)
    assert (tmp_path / "checkpoints" / "step_00000004" / "rank_1.pt").is_file()
    assert data_position(tmp_path, 4) == {"epoch": 0, "cells_done": 4 * 4 * 2}
    assert "saved by 2 process(es), resumed by 1" in launch(1, 8).stderr
    assert data_position(tmp_path, 8) == {"epoch": 0, "cells_done": 4 * 4 * 3}
    assert "saved by 1 process(es), resumed by 2" in launch(2, 12).stderr
    assert data_position(tmp_path, 12) == {"epoch": 0, "cells_done": 4 * 4 * 5}
    assert [step for step, _ in losses(tmp_path)] == list(range(1, 13))
    assert (tmp_path / "final_model" / "model.safetensors").is_file()
