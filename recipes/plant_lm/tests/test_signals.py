"""Stop signals (SIGTERM/SIGUSR1) at any moment: during imports and set-up, during the loop, again during the save
and the shutdown; every case exits 0 with valid checkpoints, and the rerun is the uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import RECIPE_DIR, assert_same_weights, cli_args, losses_of, tiny_config

import train as train_module
from biorecipes_shared import stop_signals, verify_checkpoint
from biorecipes_shared.testing import child_env, run_command
from train import train


def test_sigterm_saves_exits_0_and_the_rerun_equals_the_uninterrupted_run(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", steps_per_epoch=12, n_epochs=1)
    train(tiny_config(data_dir, tmp_path / "reference", steps_per_epoch=12, n_epochs=1))  # in process: same numbers
    proc = subprocess.Popen(
        [sys.executable, "train.py", *cli_args(cfg)], cwd=RECIPE_DIR, env=child_env(), stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:
        if "step 2 loss" in line:
            proc.send_signal(signal.SIGTERM)
            # A scheduler that signals again while the run saves and stops must not turn exit 0 into -15.
            threading.Timer(0.3, proc.send_signal, [signal.SIGTERM]).start()
            break
    rest = ""
    for line in proc.stderr:
        rest += line
        if "stopped on a preemption signal" in line:
            proc.send_signal(signal.SIGTERM)  # a third one, after the loop has left the preemption handler
    assert proc.wait() == 0, rest
    assert "stopped on a preemption signal" in rest and not (tmp_path / "run" / "final_model").exists()
    newest = max((tmp_path / "run" / "checkpoints").iterdir())
    verify_checkpoint(newest)  # sizes and sha256 of every file against the manifest
    run_command([sys.executable, "train.py", *cli_args(cfg)], cwd=RECIPE_DIR)
    assert_same_weights(
        tmp_path / "reference/final_model/model.safetensors", tmp_path / "run/final_model/model.safetensors"
    )
    assert losses_of(tmp_path / "run") == losses_of(tmp_path / "reference")


def sigterm_caught(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGTERM (Linux: the SigCgt mask in /proc/<pid>/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signal.SIGTERM - 1) & 1)


def test_sigterm_during_imports_and_set_up_exits_0_without_training(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", steps_per_epoch=20, n_epochs=1)
    proc = subprocess.Popen(
        [sys.executable, "train.py", *cli_args(cfg)], cwd=RECIPE_DIR, env=child_env(), stderr=subprocess.PIPE, text=True
    )
    while proc.poll() is None and not sigterm_caught(proc.pid):  # the first import of train.py installs it
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)  # torch and the recipe's modules are still being imported
    err = proc.stderr.read()
    assert proc.wait() == 0, err
    assert "stopped on a preemption signal before the first step (at step 0)" in err, err
    assert " loss " not in err and not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "final_model").exists() and "Traceback" not in err


@pytest.mark.smoke
def test_signal_during_set_up_of_a_resumed_run_stops_at_the_first_check(data_dir, tmp_path, monkeypatch):
    """In process: the signal arrives inside build_run (checkpoint loaded, model built); the loop's check before its
    first step stops the run, the checkpoint it resumed from stays the newest, and the rerun finishes as usual."""
    stop_signals.install()  # as `python train.py` starts (an earlier run_cli in this process ignores the signals)
    cfg = tiny_config(data_dir, tmp_path / "run", n_epochs=2, steps_per_epoch=1)
    train(tiny_config(data_dir, tmp_path / "run", n_epochs=1, steps_per_epoch=1))  # step_1; more epochs continue it
    original_build_run = train_module.build_run

    def build_run_then_signal(*args):
        built = original_build_run(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return built

    monkeypatch.setattr(train_module, "build_run", build_run_then_signal)
    stopped = train(cfg)
    monkeypatch.undo()
    assert stopped["losses"] == [] and stopped["step"] == 1 and not stopped["finished"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000001"]
    assert train(cfg)["step"] == 2
