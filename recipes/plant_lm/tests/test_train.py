"""Config parsing, checkpoint/resume identity incl. bucket memory, bad inputs, a falling loss and torchrun."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_dna, write_fasta

import train as train_module
from checkpointing import load_checkpoint_file
from train import Config, main, parse_config, train

RECIPE_DIR = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> Config:
    values = dict(
        data_dir=str(data_dir),
        species_distribution={},
        output_dir=str(out_dir),
        d_model=32,
        n_heads=4,
        n_layers=1,
        batch_size=4,
        accumulation_steps=2,
        context_size=16,
        steps_per_epoch=3,
        n_epochs=2,
        warmup_steps=2,
        learning_rate=1e-3,
        memory_normalize_every=4,
        global_context=500,
    )
    values.update(overrides)
    return Config(**values)


def test_parse_config_overrides_every_kind():
    cfg = parse_config(
        [
            "--batch_size",
            "8",
            "--learning_rate",
            "3e-4",
            "--wandb",
            "true",
            "--species_distribution",
            "zea_mays=0.6,glycine_max=1",
        ]
    )
    assert cfg.batch_size == 8 and cfg.learning_rate == 3e-4 and cfg.wandb is True
    assert cfg.species_distribution == {"zea_mays": 0.6, "glycine_max": 1.0}
    defaults = parse_config([])
    assert (defaults.d_model, defaults.n_heads, defaults.n_layers, defaults.context_size, defaults.chunk_size) == (
        512,
        8,
        6,
        64,
        1_200_000,
    )


def assert_same_checkpoint(path_a: Path, path_b: Path) -> None:
    a, b = load_checkpoint_file(path_a), load_checkpoint_file(path_b)
    assert (a["epoch"], a["step"], a["data_positions"]) == (b["epoch"], b["step"], b["data_positions"])
    assert (
        int(a["model_state_dict"]["memory.commits"]) == a["step"] and a["model_state_dict"]["memory.counts"].sum() > 0
    )
    for key, value in a["model_state_dict"].items():
        assert torch.equal(value, b["model_state_dict"][key]), key
    for slot, state in a["optimizer_state_dict"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer_state_dict"]["state"][slot]["exp_avg"])


def test_resume_mid_epoch_and_at_epoch_end_is_identical_including_bucket_memory(data_dir, tmp_path, monkeypatch):
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight = train(tiny_config(data_dir, straight_dir, save_every_steps=2, keep_checkpoints=2))
    # Periodic mid-epoch files are pruned once an epoch file supersedes them.
    assert sorted(p.name for p in (straight_dir / "dna_model").iterdir()) == ["model_epoch_1.pt", "model_epoch_2.pt"]

    # A real SIGUSR1 (SLURM's warning) arrives during step 4 = epoch 2, step 1 of 3: save mid-epoch and stop.
    def log_then_signal(*args):
        original_log_step(*args)
        if args[4] == 4:
            os.kill(os.getpid(), signal.SIGUSR1)

    original_log_step = train_module.log_step
    monkeypatch.setattr(train_module, "log_step", log_then_signal)
    first = train(tiny_config(data_dir, split_dir))
    monkeypatch.undo()
    assert first["losses"] == straight["losses"][:4]
    assert sorted(p.name for p in (split_dir / "dna_model").iterdir()) == ["model_epoch_1.pt", "model_step_4.pt"]
    second = train(tiny_config(data_dir, split_dir))  # the same command again resumes mid-epoch
    assert second["losses"] == straight["losses"][4:]
    assert_same_checkpoint(
        straight_dir / "dna_model" / "model_epoch_2.pt", split_dir / "dna_model" / "model_epoch_2.pt"
    )
    assert not (split_dir / "dna_model" / "model_step_4.pt").exists()

    # A run that died after epoch 1 (only model_epoch_1.pt left) resumes at the epoch boundary.
    (split_dir / "dna_model" / "model_epoch_2.pt").unlink()
    third = train(tiny_config(data_dir, split_dir))
    assert third["losses"] == straight["losses"][3:]
    assert_same_checkpoint(
        straight_dir / "dna_model" / "model_epoch_2.pt", split_dir / "dna_model" / "model_epoch_2.pt"
    )


def test_damaged_newest_checkpoint_is_skipped_on_auto_resume(data_dir, tmp_path, caplog):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out))
    (out / "dna_model" / "model_epoch_2.pt").write_bytes(b"PK\x03\x04 truncated")
    result = train(tiny_config(data_dir, out))
    assert "skipping damaged checkpoint" in caplog.text and len(result["losses"]) == 3
    assert load_checkpoint_file(out / "dna_model" / "model_epoch_2.pt")["step"] == 6
    assert not list((out / "dna_model").glob(".*.tmp"))


def test_cli_reports_bad_inputs_without_traceback(tmp_path, capsys, data_dir):
    (tmp_path / "empty").mkdir()
    assert main(["--data_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no species folders" in err and "Traceback" not in err
    assert main(["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "o2")]) == 1
    assert "are weighted in species_distribution but have no folder" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    args = ["--data_dir", str(data_dir), "--species_distribution", "", "--resume", str(bad)]
    assert main(args + ["--output_dir", str(tmp_path / "o3")]) == 1
    assert f"{bad}: not a readable checkpoint" in capsys.readouterr().err


def test_resume_refuses_a_different_architecture(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, n_epochs=1, steps_per_epoch=1))
    cfg = dataclasses.asdict(tiny_config(data_dir, out, d_model=64))
    args = [f"--{k}={v}" for k, v in cfg.items() if k != "species_distribution"] + ["--species_distribution="]
    assert main(args) == 1
    assert "d_model=32 (now 64)" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_loss_falls(tmp_path):
    motif = random_dna(60, 21)
    write_fasta(tmp_path / "data" / "repeat_a" / "x.fa", {"x": motif * 400})
    write_fasta(tmp_path / "data" / "repeat_b" / "x.fa", {"x": random_dna(90, 22) * 300})
    cfg = tiny_config(
        tmp_path / "data",
        tmp_path / "out",
        n_epochs=1,
        steps_per_epoch=40,
        learning_rate=3e-3,
        context_size=32,
        batch_size=8,
        accumulation_steps=1,
        dropout=0.0,
    )
    losses = train(cfg)["losses"]
    assert losses[0] > 7.5  # ~ln(4096) at the start
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_torchrun(data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(RECIPE_DIR / "train.py"),
        "--data_dir",
        str(data_dir),
        "--species_distribution",
        "",
        "--output_dir",
        str(out),
        "--d_model",
        "32",
        "--n_heads",
        "4",
        "--n_layers",
        "1",
        "--batch_size",
        "2",
        "--accumulation_steps",
        "2",
        "--context_size",
        "16",
        "--steps_per_epoch",
        "3",
        "--n_epochs",
        "1",
        "--num_threads",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(RECIPE_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint_file(out / "dna_model" / "model_epoch_1.pt")
    # 3 steps x 2 micro-batches x 2 samples on each of 2 ranks = 24 windows consumed job-wide.
    assert sum(state["data_positions"].values()) == 24
    assert int(state["model_state_dict"]["memory.commits"]) == 3
    # both ranks wrote the same all-reduced memory update: 3 steps x 2 ranks x 2 x 2 windows x 8 positions
    assert float(state["model_state_dict"]["memory.counts"].sum()) == pytest.approx(24 * 8, rel=0.2)
