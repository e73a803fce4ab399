"""The run contract (resume identity incl. bucket memory, preemption, finished runs, write errors, world size),
bad inputs, init_from, a falling loss and torchrun."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    RECIPE_DIR,
    assert_same_weights,
    assert_startup_error,
    cli_args,
    losses_of,
    random_dna,
    tiny_config,
    write_fasta,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

import run_state
import train as train_module
from biorecipes_shared import verify_checkpoint
from biorecipes_shared.testing import kill_around_saves, run_command, torchrun_command
from config import Config
from train import main, train


def test_resume_mid_epoch_and_at_epoch_end_is_identical_including_bucket_memory(straight_run, tmp_path, monkeypatch):
    cfg, straight = straight_run
    straight_dir, split_dir = Path(cfg.output_dir), tmp_path / "split"
    split_cfg = dataclasses.replace(cfg, output_dir=str(split_dir))
    assert sorted(p.name for p in (straight_dir / "dna_model").iterdir()) == ["model_epoch_1.pt", "model_epoch_2.pt"]

    # A real SIGUSR1 (SLURM's warning) arrives during step 4 = epoch 2, step 1 of 3: save mid-epoch and stop.
    def log_then_signal(run, state, *args):
        original_log_step(run, state, *args)
        if state.step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)

    original_log_step = train_module.log_step
    monkeypatch.setattr(train_module, "log_step", log_then_signal)
    first = train(split_cfg)
    monkeypatch.undo()
    assert first["losses"] == straight["losses"][:4] and not first["finished"]
    assert sorted(p.name for p in (split_dir / "checkpoints").iterdir()) == [f"step_0000000{n}" for n in (2, 3, 4)]
    assert not (split_dir / "final_model").exists() and not (split_dir / "run_finished.json").exists()
    second = train(split_cfg)  # the same command again resumes
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

    # A run that died after epoch 1 (only step_2 and step_3 left) resumes at the epoch boundary.
    for name in ("checkpoints/step_00000004", "checkpoints/step_00000006", "final_model", "run_finished.json"):
        shutil.rmtree(split_dir / name) if (split_dir / name).is_dir() else (split_dir / name).unlink()
    third = train(split_cfg)
    assert third["losses"] == straight["losses"][3:]
    assert_same_weights(straight_dir / final, split_dir / final)


def test_damaged_newest_checkpoint_is_skipped_on_auto_resume(straight_run, tmp_path):
    cfg, straight = straight_run
    out = tmp_path / "run"
    shutil.copytree(cfg.output_dir, out)
    (out / "run_finished.json").unlink()
    with open(out / "checkpoints/step_00000006/model.safetensors", "r+b") as handle:
        handle.truncate(100)  # as a crash of the disk, not of the save, would leave it
    with pytest.warns(UserWarning, match="skipping checkpoint step 6"):
        result = train(dataclasses.replace(cfg, output_dir=str(out)))
    assert result["losses"] == straight["losses"][4:] and result["finished"]  # resumed from step 4


def test_finished_run_rerun_is_a_one_line_no_op(straight_run, capsys):
    cfg, _ = straight_run
    out_dir = Path(cfg.output_dir)
    export = out_dir / "final_model" / "model.safetensors"
    before = (export.stat().st_mtime_ns, export.read_bytes())
    capsys.readouterr()
    assert main(cli_args(cfg)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"run in {out_dir} already finished at step 6")
    assert (export.stat().st_mtime_ns, export.read_bytes()) == before
    assert len(list((out_dir / "logs").glob("training_*.log"))) == 1  # no new run log either


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
    cfg = tiny_config(data_dir, tmp_path / "run", save_every=2)
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
    import export

    def torch_writer_fails(*args, **kwargs):  # what torch raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(export.torch, "save", torch_writer_fails)
    assert main(cli_args(tiny_config(data_dir, tmp_path / "run"))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: cannot write {tmp_path / 'run' / 'dna_model' / 'model_epoch_1.pt'}: ")
    assert list((tmp_path / "run" / "dna_model").iterdir()) == []


def test_init_from_own_export_with_lr_0_keeps_the_weights(straight_run, tmp_path):
    cfg, _ = straight_run
    export = Path(cfg.output_dir) / "final_model"
    assert json.loads((export / "config.json").read_text())["species"] == ["arabidopsis", "oryza_sativa"]
    following = dataclasses.replace(
        cfg, output_dir=str(tmp_path / "next"), n_epochs=1, steps_per_epoch=1, learning_rate=0.0, init_from=str(export)
    )
    train(following)
    # lr=0 leaves every parameter bitwise unchanged; the bucket memory (state, not weights) keeps learning.
    assert_same_weights(export / "model.safetensors", tmp_path / "next/final_model/model.safetensors", skip_memory=True)


def test_init_from_an_export_of_other_species_is_one_line(straight_run, data_dir, tmp_path, capsys):
    write_fasta(data_dir / "zea_mays" / "chr1.fa", {"chr1": random_dna(20_000, 5)})
    export = Path(straight_run[0].output_dir) / "final_model"
    assert main(cli_args(tiny_config(data_dir, tmp_path / "next", init_from=str(export)))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"error: {export}: export does not fit this run: species=['arabidopsis', 'oryza_sativa'] "
        "(this run: ['arabidopsis', 'oryza_sativa', 'zea_mays'])"
    )
    assert not (tmp_path / "next").exists()


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

    monkeypatch.setattr(run_state, "PlantLM", no_model)
    args = ["--data_dir", str(data_dir), "--species_distribution", ""]
    assert_startup_error(capsys, tmp_path / "out", args, "species zea_mays: no window of 65 tokens (390 ACGT bp")


def test_resume_refuses_a_different_architecture(straight_run, capsys):
    cfg, _ = straight_run
    assert main(cli_args(dataclasses.replace(cfg, d_model=64, n_epochs=3))) == 1
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
    def config(out: Path) -> Config:
        return tiny_config(data_dir, out, steps_per_epoch=8, n_epochs=1, save_every=1)

    train(config(tmp_path / "reference"))  # in process: the same numbers as `python train.py`
    command = [sys.executable, "train.py", *cli_args(config(tmp_path / "run"))]
    report = kill_around_saves(command, tmp_path / "run" / "checkpoints", kills=3, cwd=RECIPE_DIR)
    assert report.failures == [] and report.kills == 3, report
    assert_same_weights(
        tmp_path / "reference/final_model/model.safetensors", tmp_path / "run/final_model/model.safetensors"
    )
    assert losses_of(tmp_path / "run") == losses_of(tmp_path / "reference")


@pytest.mark.slow
def test_torchrun_and_world_size_changes_continue_from_the_global_data_position(data_dir, tmp_path):
    """2 processes under torchrun (DDP, one all-reduced memory update), then 1, then 2 again, each continuing the
    finished run with one more epoch from the global data position."""
    out = tmp_path / "run"

    def launch(nproc: int, n_epochs: int) -> dict:
        cfg = tiny_config(data_dir, out, n_epochs=n_epochs, steps_per_epoch=2, batch_size=2)
        args = cli_args(cfg)
        cmd = torchrun_command("train.py", args, nproc=nproc) if nproc > 1 else [sys.executable, "train.py", *args]
        result = run_command(cmd, cwd=RECIPE_DIR)
        return {"stderr": result.stderr, **torch.load(out / f"dna_model/model_epoch_{n_epochs}.pt", weights_only=True)}

    first = launch(2, n_epochs=1)
    # 2 steps x 2 micro-batches x 2 windows on each of 2 ranks = 16 windows consumed job-wide.
    assert sum(first["data_positions"].values()) == 16 and int(first["model_state_dict"]["memory.commits"]) == 2
    # both ranks wrote the same all-reduced memory update: 2 steps x 2 ranks x 2 x 2 windows x 8 positions
    assert float(first["model_state_dict"]["memory.counts"].sum()) == pytest.approx(16 * 8, rel=0.2)
    assert (out / "final_model" / "model.safetensors").is_file() and (out / "run_finished.json").is_file()
    for nproc, before, n_epochs in ((1, 2, 2), (2, 1, 3)):  # more epochs continue the finished run
        result = launch(nproc, n_epochs)
        assert (
            f"saved by {before} process(es), resumed by {nproc}: continuing from the global data position"
            in (result["stderr"])
        )
        # 2 steps x 2 micro-batches x 2 windows per process and epoch, with 2, then 1, then 2 processes.
        assert sum(result["data_positions"].values()) == 2 * 2 * 2 * (2 + 1 + 2 * (n_epochs == 3))
        assert int(result["model_state_dict"]["memory.commits"]) == 2 * n_epochs
