"""Config parsing, checkpoint/resume identity incl. bucket memory, bad inputs, a falling loss and torchrun."""

from __future__ import annotations

import dataclasses
import importlib.util
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


def assert_startup_error(capsys, out: Path, args: list[str], message: str) -> None:
    """main() exits 1 with a one-line error naming `message`, and has created nothing under `out`."""
    assert main(args + ["--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err, err
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))  # no output_dir, log or checkpoint left


def test_cli_reports_bad_inputs_without_traceback(tmp_path, capsys, data_dir):
    (tmp_path / "empty").mkdir()
    assert_startup_error(capsys, tmp_path / "o1", ["--data_dir", str(tmp_path / "empty")], "no species folders")
    assert_startup_error(
        capsys,
        tmp_path / "o2",
        ["--data_dir", str(data_dir)],
        "are weighted in species_distribution but have no folder",
    )
    all_species = ["--data_dir", str(data_dir), "--species_distribution", ""]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    assert_startup_error(
        capsys, tmp_path / "o3", all_species + ["--resume", str(bad)], f"{bad}: not a readable checkpoint"
    )
    assert_startup_error(capsys, tmp_path / "o4", all_species + ["--context_size", "0"], "need context_size >= 1")
    assert_startup_error(capsys, tmp_path / "o5", all_species + ["--chunk_size", "100"], "no chunk can hold a window")
    assert_startup_error(
        capsys, tmp_path / "o6", all_species + ["--amp", "fp8"], "--amp must be auto, bf16, fp16 or off"
    )
    (data_dir / "zea_mays").mkdir()
    (data_dir / "zea_mays" / "README.txt").write_text("genome to come")
    assert_startup_error(capsys, tmp_path / "o7", all_species, "zea_mays: species folder has no FASTA")


def test_species_without_a_window_fails_before_the_model_or_any_output(tmp_path, capsys, data_dir, monkeypatch):
    write_fasta(data_dir / "zea_mays" / "x.fa", {"x": "N" * 3000, "y": random_dna(60, 23)})

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before every species was checked")

    monkeypatch.setattr(train_module, "PlantLM", no_model)
    args = ["--data_dir", str(data_dir), "--species_distribution", ""]
    assert_startup_error(capsys, tmp_path / "out", args, "species zea_mays: no window of 65 tokens (390 ACGT bp")


def test_wandb_without_the_package_is_a_one_line_error(tmp_path, capsys, data_dir, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails too, even where it is installed
    args = ["--data_dir", str(data_dir), "--species_distribution", "", "--wandb", "true"]
    assert_startup_error(capsys, tmp_path / "out", args, "--wandb true needs the wandb package: pip install wandb")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--d_model", "30", "--n_heads", "4"], "--d_model 30 must be divisible by --n_heads 4"),
        (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--local_attn_window", "0"], "--local_attn_window must be at least 1"),
        (["--dropout", "1.0"], "--dropout must be in [0, 1)"),
        (["--learning_rate", "0"], "--learning_rate must be positive"),
    ],
)
def test_impossible_settings_are_one_line_errors_before_any_output(tmp_path, capsys, data_dir, flags, message):
    args = ["--data_dir", str(data_dir), "--species_distribution", ""] + flags
    assert_startup_error(capsys, tmp_path / "out", args, message)


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
