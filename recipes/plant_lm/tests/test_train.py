"""Config parsing, the run contract (resume identity incl. bucket memory, preemption, finished runs, write errors,
world size), bad inputs, init_from, a falling loss and torchrun."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_dna, write_fasta
from safetensors import SafetensorError
from safetensors.torch import load_file

import train as train_module
from biorecipes_shared.checkpoint import verify_checkpoint
from biorecipes_shared.testing import kill_around_saves, run_command, torchrun_command
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


def cli_args(cfg: Config) -> list[str]:
    """The command line that gives `cfg` (species_distribution empty: every species folder, weight 1)."""
    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k != "species_distribution"] + [
        "--species_distribution="
    ]


def assert_same_weights(path_a: Path, path_b: Path, skip_memory: bool = False) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        if not (skip_memory and key.startswith("memory.")):
            assert torch.equal(a[key], b[key]), key


def losses_of(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def test_resume_mid_epoch_and_at_epoch_end_is_identical_including_bucket_memory(data_dir, tmp_path, monkeypatch):
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight = train(tiny_config(data_dir, straight_dir, keep_checkpoints=3))
    assert sorted(p.name for p in (straight_dir / "dna_model").iterdir()) == ["model_epoch_1.pt", "model_epoch_2.pt"]

    # A real SIGUSR1 (SLURM's warning) arrives during step 4 = epoch 2, step 1 of 3: save mid-epoch and stop.
    def log_then_signal(*args):
        original_log_step(*args)
        if args[4] == 4:
            os.kill(os.getpid(), signal.SIGUSR1)

    original_log_step = train_module.log_step
    monkeypatch.setattr(train_module, "log_step", log_then_signal)
    first = train(tiny_config(data_dir, split_dir, keep_checkpoints=3))
    monkeypatch.undo()
    assert first["losses"] == straight["losses"][:4] and not first["finished"]
    assert sorted(p.name for p in (split_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]
    assert not (split_dir / "final_model").exists() and not (split_dir / "run_finished.json").exists()
    second = train(tiny_config(data_dir, split_dir, keep_checkpoints=3))  # the same command again resumes
    assert second["losses"] == straight["losses"][4:]
    final = "checkpoints/step_00000006/model.safetensors"
    assert_same_weights(straight_dir / final, split_dir / final)
    memory = load_file(split_dir / final)
    assert int(memory["memory.commits"]) == 6 and float(memory["memory.counts"].sum()) > 0
    assert_same_weights(straight_dir / "final_model/model.safetensors", split_dir / "final_model/model.safetensors")
    assert losses_of(split_dir) == losses_of(straight_dir)
    epoch_a, epoch_b = (
        torch.load(d / "dna_model/model_epoch_2.pt", weights_only=True) for d in (straight_dir, split_dir)
    )
    assert epoch_a["data_positions"] == epoch_b["data_positions"] and epoch_a["step"] == 6
    assert all(torch.equal(v, epoch_b["model_state_dict"][k]) for k, v in epoch_a["model_state_dict"].items())

    # A run that died after epoch 1 (only step_3 left) resumes at the epoch boundary.
    for name in ("checkpoints/step_00000004", "checkpoints/step_00000006", "final_model", "run_finished.json"):
        shutil.rmtree(split_dir / name) if (split_dir / name).is_dir() else (split_dir / name).unlink()
    third = train(tiny_config(data_dir, split_dir, keep_checkpoints=3))
    assert third["losses"] == straight["losses"][3:]
    assert_same_weights(straight_dir / final, split_dir / final)


def test_damaged_newest_checkpoint_is_skipped_on_auto_resume(data_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, save_every_steps=2))
    (out / "run_finished.json").unlink()
    with open(out / "checkpoints/step_00000006/model.safetensors", "r+b") as handle:
        handle.truncate(100)  # as a crash of the disk, not of the save, would leave it
    with pytest.warns(UserWarning, match="skipping checkpoint step 6"):
        result = train(tiny_config(data_dir, out, save_every_steps=2))
    assert len(result["losses"]) == 2 and result["finished"]  # resumed from step 4


def test_finished_run_rerun_is_a_one_line_no_op(data_dir, tmp_path, capsys):
    cfg = tiny_config(data_dir, tmp_path / "run", n_epochs=1)
    train(cfg)
    export = tmp_path / "run" / "final_model" / "model.safetensors"
    before = (export.stat().st_mtime_ns, export.read_bytes())
    capsys.readouterr()
    assert main(cli_args(cfg)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"run in {tmp_path / 'run'} already finished at step 3")
    assert (export.stat().st_mtime_ns, export.read_bytes()) == before
    assert len(list((tmp_path / "run" / "logs").glob("training_*.log"))) == 1  # no new run log either


def test_disk_full_is_one_line_keeps_earlier_checkpoints_and_the_rerun_finishes(
    data_dir, tmp_path, monkeypatch, capsys
):
    import biorecipes_shared.checkpoint as shared_checkpoint

    real_save = shared_checkpoint.save_file

    def disk_full_at_step_4(tensors, path, metadata=None):
        if "step_00000004" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(shared_checkpoint, "save_file", disk_full_at_step_4)
    cfg = tiny_config(data_dir, tmp_path / "run", save_every_steps=2)
    assert main(cli_args(cfg)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert err[-1].startswith(f"error: cannot write {checkpoints / 'step_00000004'}: ")
    assert err[-1].endswith("no space left on device (free some space or choose another output directory)")
    assert sum(line.startswith("error:") for line in err) == 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000003"]
    verify_checkpoint(checkpoints / "step_00000003")
    monkeypatch.setattr(shared_checkpoint, "save_file", real_save)
    assert main(cli_args(cfg)) == 0 and (tmp_path / "run" / "run_finished.json").is_file()


def test_epoch_file_write_failure_is_one_line_and_leaves_no_temporary_file(data_dir, tmp_path, monkeypatch, capsys):
    import checkpointing

    def torch_writer_fails(*args, **kwargs):  # what torch raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(checkpointing.torch, "save", torch_writer_fails)
    assert main(cli_args(tiny_config(data_dir, tmp_path / "run"))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot write {tmp_path / 'run' / 'dna_model' / 'model_epoch_1.pt'}: ")
    assert list((tmp_path / "run" / "dna_model").iterdir()) == []


def test_init_from_own_export_with_lr_0_keeps_the_weights(data_dir, tmp_path):
    train(tiny_config(data_dir, tmp_path / "first", n_epochs=1))
    export = tmp_path / "first" / "final_model"
    assert json.loads((export / "config.json").read_text())["species"] == ["arabidopsis", "oryza_sativa"]
    cfg = tiny_config(
        data_dir, tmp_path / "next", n_epochs=1, steps_per_epoch=1, learning_rate=0.0, init_from=str(export)
    )
    train(cfg)
    # lr=0 leaves every parameter bitwise unchanged; the bucket memory (state, not weights) keeps learning.
    assert_same_weights(export / "model.safetensors", tmp_path / "next/final_model/model.safetensors", skip_memory=True)


def test_init_from_an_export_of_other_species_is_one_line(data_dir, tmp_path, capsys):
    train(tiny_config(data_dir, tmp_path / "first", n_epochs=1))
    write_fasta(data_dir / "zea_mays" / "chr1.fa", {"chr1": random_dna(20_000, 5)})
    export = tmp_path / "first" / "final_model"
    assert main(cli_args(tiny_config(data_dir, tmp_path / "next", init_from=str(export)))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: {export}: export does not fit this run: species=['arabidopsis', 'oryza_sativa'] "
        "(this run: ['arabidopsis', 'oryza_sativa', 'zea_mays'])"
    )
    assert not (tmp_path / "next").exists()


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
        capsys, tmp_path / "o3", all_species + ["--resume", str(bad)], f"resume checkpoint {bad} is a file"
    )
    assert_startup_error(
        capsys, tmp_path / "o4", all_species + ["--context_size", "0"], "--context_size=0 must be an integer >= 1"
    )
    assert_startup_error(capsys, tmp_path / "o5", all_species + ["--chunk_size", "100"], "no chunk can hold a window")
    assert_startup_error(
        capsys, tmp_path / "o6", all_species + ["--amp", "fp8"], "--amp must be auto, bf16, fp16 or off"
    )
    (data_dir / "zea_mays").mkdir()
    (data_dir / "zea_mays" / "README.txt").write_text("genome to come")
    assert_startup_error(capsys, tmp_path / "o7", all_species, "zea_mays: species folder has no FASTA")


def test_a_bad_file_is_skipped_with_a_warning_and_counted_at_the_end(tmp_path, data_dir):
    """The reader refuses a file in one line; training skips that file with a warning and goes on (exit 0), as
    gtdb_mamba skips a genome: text before the first '>', gaps and a nameless record alike."""
    notes = data_dir / "oryza_sativa" / "a_notes.fa"
    notes.write_text("assembled 2024\n>chr0\n" + random_dna(600, 24) + "\n")
    gapped = write_fasta(data_dir / "arabidopsis" / "a_aln.fa", {"a": "AC-GT" * 200})
    records: list[logging.LogRecord] = []
    recorder = logging.Handler(logging.WARNING)
    recorder.emit = records.append  # the run's own logger does not propagate to pytest's capture
    logging.getLogger("plant_lm").addHandler(recorder)
    try:
        result = train(tiny_config(data_dir, tmp_path / "run", n_epochs=1, steps_per_epoch=1))
    finally:
        logging.getLogger("plant_lm").removeHandler(recorder)
    warnings = "\n".join(record.getMessage() for record in records)
    assert f"skipping bad file (1 so far for oryza_sativa): {notes}: text before the first '>' header" in warnings
    assert f"skipping bad file (1 so far for arabidopsis): {gapped}: record a: '-' not DNA" in warnings
    assert sorted(result["bad_files"]) == sorted([str(gapped), str(notes)]) and result["finished"]
    assert (tmp_path / "run" / "run_finished.json").is_file()


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
        (["--batch_size", "0"], "--batch_size=0 must be an integer >= 1"),
        (["--local_attn_window", "0"], "--local_attn_window=0 must be an integer >= 1"),
        (["--dropout", "1.0"], "--dropout=1.0 must be in [0, 1)"),
        (["--learning_rate", "-1"], "--learning_rate=-1.0 must be >= 0"),
        (["--learning_rate", "nan"], "--learning_rate=nan must be a finite number"),
        (["--overlap_ratio", "1.5"], "--overlap_ratio=1.5 must be in [0, 1)"),
        (["--species_distribution", "arabidopsis=-1"], "--species_distribution arabidopsis=-1.0 must be >= 0"),
        (["--grad_clip", "inf"], "--grad_clip=inf must be a finite number"),
    ],
)
def test_impossible_settings_are_one_line_errors_before_any_output(tmp_path, capsys, data_dir, flags, message):
    args = ["--data_dir", str(data_dir), "--species_distribution", ""] + flags
    assert_startup_error(capsys, tmp_path / "out", args, message)


def test_resume_refuses_a_different_architecture(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, n_epochs=1, steps_per_epoch=1))
    assert main(cli_args(tiny_config(data_dir, out, d_model=64, n_epochs=2, steps_per_epoch=1))) == 1
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


@pytest.mark.slow
def test_kill_9_around_saves_then_rerun_gives_the_uninterrupted_run(data_dir, tmp_path):
    def command(out: Path) -> list[str]:
        cfg = tiny_config(data_dir, out, steps_per_epoch=12, n_epochs=1, save_every_steps=1)
        return [sys.executable, "train.py", *cli_args(cfg)]

    run_command(command(tmp_path / "reference"), cwd=RECIPE_DIR)
    report = kill_around_saves(command(tmp_path / "run"), tmp_path / "run" / "checkpoints", kills=3, cwd=RECIPE_DIR)
    assert report.failures == [] and report.kills == 3, report
    assert_same_weights(
        tmp_path / "reference/final_model/model.safetensors", tmp_path / "run/final_model/model.safetensors"
    )
    assert losses_of(tmp_path / "run") == losses_of(tmp_path / "reference")


@pytest.mark.slow
@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_world_size_change_continues_from_the_global_data_position(data_dir, tmp_path, first, second):
    def launch(nproc: int, n_epochs: int) -> subprocess.CompletedProcess:
        cfg = tiny_config(data_dir, tmp_path / "run", n_epochs=n_epochs, steps_per_epoch=2, batch_size=2, num_threads=1)
        args = cli_args(cfg)
        cmd = torchrun_command("train.py", args, nproc=nproc) if nproc > 1 else [sys.executable, "train.py", *args]
        return run_command(cmd, cwd=RECIPE_DIR)

    launch(first, n_epochs=1)
    result = launch(second, n_epochs=2)  # more epochs continue the finished run
    assert f"saved by {first} process(es), resumed by {second}: continuing from the global data position" in (
        result.stderr
    )
    state = torch.load(tmp_path / "run" / "dna_model" / "model_epoch_2.pt", weights_only=True)
    # 2 steps x 2 micro-batches x 2 windows per process, first with `first` then with `second` processes.
    assert sum(state["data_positions"].values()) == 2 * 2 * 2 * (first + second)
    assert int(state["model_state_dict"]["memory.commits"]) == 4


@pytest.mark.slow
def test_two_process_torchrun(data_dir, tmp_path):
    out = tmp_path / "ddp"
    cfg = tiny_config(data_dir, out, batch_size=2, n_epochs=1, num_threads=1)
    run_command(torchrun_command("train.py", cli_args(cfg), nproc=2), cwd=RECIPE_DIR)
    state = torch.load(out / "dna_model" / "model_epoch_1.pt", weights_only=True)
    # 3 steps x 2 micro-batches x 2 samples on each of 2 ranks = 24 windows consumed job-wide.
    assert sum(state["data_positions"].values()) == 24
    assert int(state["model_state_dict"]["memory.commits"]) == 3
    # both ranks wrote the same all-reduced memory update: 3 steps x 2 ranks x 2 x 2 windows x 8 positions
    assert float(state["model_state_dict"]["memory.counts"].sum()) == pytest.approx(24 * 8, rel=0.2)
    assert (out / "final_model" / "model.safetensors").is_file() and (out / "run_finished.json").is_file()
