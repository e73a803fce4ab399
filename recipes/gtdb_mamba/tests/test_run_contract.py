"""The run contract, from outside like a user: one command resumes after kill -9 / SIGTERM to the uninterrupted
weights and metrics, a finished run is a no-op, another world size is refused, a write error is one line."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RECIPE_DIR, compose_config, tiny_overrides
from safetensors import SafetensorError
from safetensors.torch import load_file

from biorecipes_shared import verify_checkpoint
from biorecipes_shared.testing import child_env, kill_around_saves, run_command, torchrun_command

STEPS = ["train.max_steps=12", "train.steps_per_epoch=4", "train.save_every=2", "train.grad_accumulation=2"]


def command(root: Path, work: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = [*tiny_overrides(root, work), *STEPS, f"output_dir={run_dir}", *extra]
    return [sys.executable, "train.py", "--config-name", "sample", *overrides]


@pytest.fixture(scope="module")
def reference(gtdb_fixture, tmp_path_factory) -> Path:
    """An uninterrupted run, as a fresh process (same thread count as the interrupted ones)."""
    work = tmp_path_factory.mktemp("reference")
    run_command(command(gtdb_fixture, work, work / "run"), cwd=RECIPE_DIR)
    return work / "run"


def assert_same_run(expected: Path, got: Path) -> None:
    """Same final checkpoint (weights incl. CurricularFace t), same export, same seed logs."""
    final = "checkpoints/step_00000012/model.safetensors"
    for name in (final, "final_model/model.safetensors"):
        want, have = load_file(expected / name), load_file(got / name)
        assert want.keys() == have.keys()
        for key in want:
            assert torch.equal(want[key], have[key]), (name, key)
    assert float(load_file(got / final)["head.t"]) != 0.0  # the running t really moved and was restored
    for name in ("log_file.txt", "AUC_log.tsv"):
        assert (got / name).read_text() == (expected / name).read_text(), name
    steps = [json.loads(line)["step"] for line in (got / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (expected / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_saves_exits_0_and_the_rerun_is_the_uninterrupted_run(gtdb_fixture, tmp_path, reference):
    """A second SIGTERM ~0.3 s after the first lands in the preemption save: still exit 0 and a valid checkpoint."""
    cmd = command(gtdb_fixture, tmp_path, tmp_path / "run")
    proc = subprocess.Popen(cmd, cwd=RECIPE_DIR, env=child_env(), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "step 1: loss" in line:
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait() == 0, rest
    assert "preemption signal" in rest and not (tmp_path / "run" / "run_finished.json").exists()
    verify_checkpoint(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1])
    resumed = run_command(cmd, cwd=RECIPE_DIR)
    assert "resumed from" in resumed.stderr
    assert_same_run(reference, tmp_path / "run")


def test_sigterm_during_set_up_exits_0_before_the_first_step(gtdb_fixture, tmp_path):
    cmd = command(gtdb_fixture, tmp_path, tmp_path / "run")
    proc = subprocess.Popen(cmd, cwd=RECIPE_DIR, env=child_env(), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "split:" in line:  # reading the metadata: before the model, the index and the loop exist
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait() == 0, rest
    assert "stopped on a preemption signal before step 1" in rest and "step 1: loss" not in rest
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    assert not (tmp_path / "run" / "run_finished.json").exists()


def test_finished_run_rerun_is_a_one_line_no_op(gtdb_fixture, tmp_path, reference, capsys):
    import train

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    export = run_dir / "final_model" / "model.safetensors"
    before = (
        export.stat().st_mtime_ns,
        export.read_bytes(),
        sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
    )
    capsys.readouterr()
    assert train.main(command(gtdb_fixture, tmp_path, run_dir)[2:]) == 0
    result = capsys.readouterr()
    assert result.out.strip().splitlines() == [
        f"run in {run_dir} already finished at step 12 (max steps reached); final model: {run_dir / 'final_model'}. "
        "Nothing to do (use a new output directory or more steps to train further)"
    ]
    assert "step 1" not in result.err
    after = (
        export.stat().st_mtime_ns,
        export.read_bytes(),
        sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
    )
    assert after == before


def test_another_world_size_is_refused_in_one_line(gtdb_fixture, tmp_path, reference, capsys):
    import train

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "run_finished.json").unlink()
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["world_size"] = 2  # as if a 2-process job had saved it (the manifest is not in its own hash list)
    (newest / "manifest.json").write_text(json.dumps(manifest))
    assert train.main(command(gtdb_fixture, tmp_path, run_dir, "train.max_steps=14")[2:]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: {newest} was saved by 2 process(es) and this run has 1: relaunch with 2 process(es) "
        "(training genomes and batches are sharded per process), or start a new output_dir"
    )


def test_write_error_is_one_line_keeps_earlier_checkpoints_and_the_rerun_finishes(
    gtdb_fixture, tmp_path, monkeypatch, capsys, reference
):
    import biorecipes_shared.checkpoint as shared_checkpoint
    import train
    from biorecipes_shared import run_cli

    real_save = shared_checkpoint.save_file

    def disk_full_at_step_6(tensors, path, metadata=None):
        if "step_00000006" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(shared_checkpoint, "save_file", disk_full_at_step_6)
    cfg = compose_config([*tiny_overrides(gtdb_fixture, tmp_path), *STEPS, "train.max_steps=6"])  # fails at the end
    assert run_cli(lambda: train.run(cfg)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert err[-1].startswith(f"error: cannot write {checkpoints / 'step_00000006'}: ")
    assert err[-1].endswith("no space left on device (free some space or choose another output directory)")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    verify_checkpoint(checkpoints / "step_00000004")
    monkeypatch.setattr(shared_checkpoint, "save_file", real_save)
    assert run_cli(lambda: train.run(cfg)) == 0
    assert (tmp_path / "run" / "run_finished.json").is_file()


def test_init_from_own_export_with_lr_0_exports_the_same_weights(gtdb_fixture, tmp_path, reference):
    """Without the export's weights the embedder would be a fresh random one: equal weights show they were loaded."""
    import train

    exported = reference / "final_model"
    extra = ["train.max_steps=1", "train.lr=0", "train.min_lr=0", f"train.init_from={exported}"]
    assert train.main(command(gtdb_fixture, tmp_path, tmp_path / "next", *extra)[2:]) == 0
    want, have = load_file(exported / "model.safetensors"), load_file(tmp_path / "next/final_model/model.safetensors")
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    assert json.loads((tmp_path / "next/final_model/config.json").read_text())["kmer"] == 5


def test_init_from_an_export_of_another_model_is_one_line(gtdb_fixture, tmp_path, reference, capsys):
    import train

    extra = ["train.max_steps=1", "model.d_model=8", f"train.init_from={reference / 'final_model'}"]
    assert train.main(command(gtdb_fixture, tmp_path, tmp_path / "next", *extra)[2:]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: {reference / 'final_model'}: export does not fit this run: d_model=16 (this run: 8)"
    )
    assert not (tmp_path / "next").exists()


def test_slurm_script_signals_the_workers_and_uses_no_torchrun():
    script = (RECIPE_DIR / "slurm_train.sh").read_text()
    assert "#SBATCH --signal=USR1@120" in script and "srun " in script
    assert "torchrun" not in "\n".join(line for line in script.splitlines() if not line.startswith("#"))


@pytest.mark.slow
def test_kill_9_around_saves_then_rerun_gives_the_uninterrupted_run(gtdb_fixture, tmp_path, reference):
    cmd = command(gtdb_fixture, tmp_path, tmp_path / "run", "train.save_every=1")
    report = kill_around_saves(cmd, tmp_path / "run" / "checkpoints", kills=3, cwd=RECIPE_DIR)
    assert report.failures == [] and report.kills == 3, report
    assert_same_run(reference, tmp_path / "run")


@pytest.mark.slow
def test_two_processes_refuse_a_one_process_checkpoint(gtdb_fixture, tmp_path, reference):
    """The refusal on every rank of a torchrun job (2 -> 1 is in test_train.py's torchrun test)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    cmd = command(gtdb_fixture, tmp_path, run_dir, "train.max_steps=14")
    result = run_command(torchrun_command(cmd[1], cmd[2:], nproc=2), cwd=RECIPE_DIR, check=False)
    assert result.returncode != 0
    checkpoint = run_dir / "checkpoints" / "step_00000012"
    assert f"error: {checkpoint} was saved by 1 process(es) and this run has 2: relaunch with 1 " in result.stderr
