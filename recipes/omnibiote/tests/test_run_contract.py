"""The run contract (issue 11) for train_encoder.py: kill -9 and SIGTERM resumes equal the uninterrupted run, a finished
run stays finished, another world size continues from the global data position, write errors are one line."""

import errno
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from biorecipes_shared import checkpoint as checkpoint_module
from biorecipes_shared import latest_checkpoint, run_cli, verify_checkpoint
from biorecipes_shared.run_lock import LOCK_NAME
from biorecipes_shared.testing import child_env, kill_around_saves, run_command, torchrun_command
from data import micro_batches
from errors import OmniBioteError
from model import OmniBioTA, OmniBioTAConfig
from train_encoder import main

TINY = "--n_layer 1 --n_head 2 --n_embd 32 --ctx_len 64 --mini_batch_size 2 --batch_size 8 --force_lr --lr 0.03"
TINY += " --val_batches 2 --log_freq 1 --source_weights genbank=0.5,uniprot=0.5 --ramp_fraction 0.3 --dropout 0.1"
BUDGET = 8 * 64 * 10  # 12 steps: a ramp of 1..4 mini-batches of 2, then 4


def run_args(base_dir, out_dir, name, *extra, budget=BUDGET):
    paths = ["--base_dir", str(base_dir), "--out_dir", str(out_dir), "--save_name", name]
    return [*paths, "--token_budget", str(budget), *TINY.split(), *extra]


def cli(argv) -> int:
    return run_cli(lambda: main(argv), user_errors=(OmniBioteError,))


def error_lines(stderr: str) -> list[str]:
    """stderr without the trainer's INFO/WARNING log lines: what a user sees of a failure."""
    return [line for line in stderr.strip().splitlines() if " INFO " not in line and " WARNING " not in line]


def weights(run_dir):
    return load_file(run_dir / "final_model" / "model.safetensors")


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def training_records(run_dir):
    """metrics.jsonl without the wall-clock fields (throughput differs between any two runs)."""
    timing = {"samples_per_s", "tokens_per_s", "cpu_rss_gib", "cpu_peak_rss_gib", "cuda_peak_gib"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, sample_base_dir, recipe_dir):
    """The reference: the same command run once, to the end, in a fresh process."""
    out = tmp_path_factory.mktemp("reference")
    run_command([sys.executable, "train_encoder.py", *run_args(sample_base_dir, out, "run")], cwd=recipe_dir)
    return out / "run"


@pytest.fixture(scope="module")
def uninterrupted_without_dropout(tmp_path_factory, sample_base_dir, recipe_dir):
    """The reference of the world-size tests (dropout 0: the ranks' dropout streams differ by design)."""
    out = tmp_path_factory.mktemp("reference_no_dropout")
    args = run_args(sample_base_dir, out, "run", "--dropout", "0")
    run_command([sys.executable, "train_encoder.py", *args], cwd=recipe_dir)
    return out / "run"


def test_micro_batches_cover_each_step_once_whatever_the_world_size():
    for units in (1, 3, 4, 8):
        for world in (1, 2, 3, 4):
            plans = [micro_batches(units, world, rank, first_unit=100) for rank in range(world)]
            assert len({len(plan) for plan in plans}) == 1  # every rank joins every all-reduce
            real = sorted(unit for plan in plans for unit, weight in plan if weight > 0)
            assert real == list(range(100, 100 + units))
            # DDP averages over ranks: the weights of the real micro-batches add up to world_size
            assert sum(weight for plan in plans for _, weight in plan) == pytest.approx(world)


def test_finished_run_rerun_is_a_no_op(tmp_path, sample_base_dir, capsys):
    args = run_args(sample_base_dir, tmp_path, "run", "--max_steps", "2")
    assert cli(args) == 0
    final = tmp_path / "run" / "final_model"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in final.iterdir()}
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    capsys.readouterr()
    assert cli(args) == 0
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 1 and "already finished at step 2" in lines[0], lines
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in final.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == checkpoints


@pytest.mark.smoke
def test_resume_none_refuses_existing_checkpoints_and_a_path_resumes_exactly_there(tmp_path, sample_base_dir, capsys):
    assert cli(run_args(sample_base_dir, tmp_path, "run", "--max_steps", "2", "--save_freq", "100")) == 0
    capsys.readouterr()
    assert cli(run_args(sample_base_dir, tmp_path, "run", "--max_steps", "3", "--resume", "none")) == 1
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "already holds checkpoints and resume is 'none'" in err[0], err
    first = sorted((tmp_path / "run" / "checkpoints").iterdir())[0]
    assert cli(run_args(sample_base_dir, tmp_path, "run", "--max_steps", "3", "--resume", str(first))) == 0
    assert f"resumed from {first} at step 1" in capsys.readouterr().err


def test_a_checkpoint_write_error_is_one_line_and_the_next_run_resumes(tmp_path, sample_base_dir, capsys, monkeypatch):
    args = run_args(sample_base_dir, tmp_path, "run", "--save_freq", "1000", "--max_steps", "6")
    real_save = torch.save
    calls = []

    def disk_fills_up(obj, path, *a, **k):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoint (rank file + training state) fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_fills_up)
    assert cli(args) == 1
    monkeypatch.undo()
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: ") and "no space left on device" in err[0], err
    ckpt_dir = tmp_path / "run" / "checkpoints"
    (kept,) = ckpt_dir.iterdir()  # the earlier checkpoint, and no temp folder
    assert kept.name.startswith("step_") and verify_checkpoint(kept, check_hashes=True)
    assert cli(args) == 0  # the next run resumes from the earlier checkpoint and finishes
    assert latest_checkpoint(ckpt_dir).name == "step_00000006"
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()


def test_a_final_model_write_error_leaves_no_temp_folder(tmp_path, sample_base_dir, capsys, monkeypatch):
    args = run_args(sample_base_dir, tmp_path, "run", "--max_steps", "1")

    def unwritable(self, out_dir):
        raise PermissionError(errno.EACCES, "Permission denied", str(out_dir / "model.safetensors"))

    monkeypatch.setattr(OmniBioTA, "save_pretrained", unwritable)
    assert cli(args) == 1
    monkeypatch.undo()
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "Permission denied" in err[0] and "model.safetensors" in err[0], err
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".") and p.name != LOCK_NAME]
    assert leftovers == []  # the run-folder lock file stays (an flock on it, dropped with the process)
    assert not (tmp_path / "run" / "run_finished.json").exists()
    assert cli(args) == 0 and (tmp_path / "run" / "run_finished.json").is_file()


def test_bad_settings_leave_no_output_folder(tmp_path, sample_base_dir, capsys):
    for bad in (["--lr", "-1"], ["--lr", "nan"], ["--ramp_fraction", "2"], ["--dropout", "1"]):
        assert cli(run_args(sample_base_dir, tmp_path, "bad", *bad)) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {bad[0]}="), err
    assert list(tmp_path.iterdir()) == []


def test_init_from_with_lr_0_exports_the_same_weights(tmp_path, sample_base_dir, sample_tokenizer):
    source = tmp_path / "source"
    torch.manual_seed(3)
    config = OmniBioTAConfig(vocab_size=sample_tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32, ctx_len=64)
    OmniBioTA(config).save_pretrained(source)
    args = run_args(sample_base_dir, tmp_path, "cont", "--init_from", str(source), "--lr", "0", "--dropout", "0")
    assert cli([*args, "--max_steps", "1"]) == 0
    assert_same_weights(load_file(source / "model.safetensors"), weights(tmp_path / "cont"))
    wrong = run_args(sample_base_dir, tmp_path, "wrong", "--init_from", str(source), "--n_embd", "64")
    assert cli(wrong) == 1


def test_max_steps_below_the_plan_validates_and_logs_its_last_step_once(tmp_path, sample_base_dir):
    """Before (issue 21): the end of the run was worked out in three places, so a run stopped by --max_steps below
    the plan logged its last step but skipped the final validation. (Bitwise resume: the kill -9 and SIGTERM tests.)"""
    args = run_args(sample_base_dir, tmp_path, "run", "--log_freq", "4")
    assert cli([*args, "--max_steps", "5"]) == 0
    records = training_records(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [4, 5]  # every --log_freq steps, and the last step once
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5]  # the initial and the final validation
    finished = json.loads((tmp_path / "run" / "run_finished.json").read_text())
    assert finished["step"] == 5 and finished["reason"] == "--max_steps reached"
    assert cli(args) == 0  # without --max_steps the finished run continues, from step 5 to the plan's end (12)
    records = training_records(tmp_path / "run")
    assert [r["step"] for r in records if "loss" in r] == [4, 5, 8, 12]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5, 12]
    finished = json.loads((tmp_path / "run" / "run_finished.json").read_text())
    assert finished["step"] == 12 and finished["reason"] == "token budget reached"


@pytest.mark.slow
def test_kill_9_around_saves_then_rerun_equals_the_uninterrupted_run(
    tmp_path, sample_base_dir, recipe_dir, uninterrupted
):
    command = [sys.executable, "train_encoder.py", *run_args(sample_base_dir, tmp_path, "run", "--save_freq", "300")]
    report = kill_around_saves(command, tmp_path / "run" / "checkpoints", kills=3, cwd=recipe_dir)
    assert report.kills == 3 and not report.failures, report
    assert_same_weights(weights(uninterrupted), weights(tmp_path / "run"))
    assert training_records(tmp_path / "run") == training_records(uninterrupted)
    assert (tmp_path / "run" / "log_file.txt").read_text() == (uninterrupted / "log_file.txt").read_text()


@pytest.mark.slow
def test_sigterm_exits_0_and_the_rerun_equals_the_uninterrupted_run(
    tmp_path, sample_base_dir, recipe_dir, uninterrupted
):
    command = [sys.executable, "train_encoder.py", *run_args(sample_base_dir, tmp_path, "run")]
    process = subprocess.Popen(command, cwd=recipe_dir, stderr=subprocess.PIPE, text=True, env=child_env())
    for line in process.stderr:
        if "step 3/" in line:
            process.send_signal(signal.SIGTERM)
            break
    time.sleep(0.3)  # a second signal while the stop save runs (before: the process died with -15)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    _, rest = process.communicate()
    assert process.returncode == 0, rest[-2000:]
    assert "received SIGTERM" in rest and "rerun the same command to continue" in rest
    assert not (tmp_path / "run" / "final_model").exists()
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    verify_checkpoint(checkpoint, check_hashes=True)
    assert int(checkpoint.name.split("_")[1]) >= 3
    run_command(command, cwd=recipe_dir)
    assert_same_weights(weights(uninterrupted), weights(tmp_path / "run"))
    assert training_records(tmp_path / "run") == training_records(uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_another_world_size_continues_from_the_global_position(
    tmp_path, sample_base_dir, recipe_dir, uninterrupted_without_dropout, first, second
):
    def launch(nproc, *extra):
        args = run_args(sample_base_dir, tmp_path, "run", "--dropout", "0", *extra)
        if nproc == 1:
            return run_command([sys.executable, "train_encoder.py", *args], cwd=recipe_dir)
        # the two-process run also recomputes activations: bitwise the same math, and it must work under DDP
        return run_command(torchrun_command("train_encoder.py", [*args, "--activation_checkpointing"], nproc=nproc),
                           cwd=recipe_dir)  # fmt: skip

    started = launch(first, "--max_steps", "4")
    if first == 2:
        assert "4 mini-batches of 2 per step over 2 rank(s)" in started.stderr
        files = {p.name for p in (tmp_path / "run" / "checkpoints" / "step_00000004").iterdir()}
        assert {"rank_0.pt", "rank_1.pt", "model.safetensors"} <= files
    result = launch(second)
    assert f"saved by {first} process(es), resumed by {second}" in result.stderr
    reference = uninterrupted_without_dropout
    # the same mini-batches in every step: only the order of the gradient sums differs (DDP all-reduce)
    assert_same_weights(weights(reference), weights(tmp_path / "run"), atol=2e-4)
    ours, theirs = training_records(tmp_path / "run"), training_records(reference)
    # the stop at --max_steps 4 validated its last step; the uninterrupted run validates only at its end
    assert [r["step"] for r in ours if "val_loss" in r] == [0, 4, theirs[-1]["step"]]
    ours = [r for r in ours if not ("val_loss" in r and r["step"] == 4)]
    assert [(r["step"], r.get("tokens")) for r in ours] == [(r["step"], r.get("tokens")) for r in theirs]
    for mine, reference_record in zip(ours, theirs):
        if "loss" in mine:
            assert mine["loss"] == pytest.approx(reference_record["loss"], abs=1e-3)


def wait_until_sigterm_is_caught(pid: int) -> None:
    """Until the process has installed its SIGTERM handler (bit 15 of SigCgt): the first thing train_encoder does."""
    while True:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)


@pytest.mark.slow
def test_sigterm_during_set_up_exits_0_and_writes_nothing(tmp_path, sample_base_dir, recipe_dir):
    """Before: a SIGTERM before the loop (here during the imports of torch) killed the process with -15."""
    command = [sys.executable, "train_encoder.py", *run_args(sample_base_dir, tmp_path, "run")]
    process = subprocess.Popen(command, cwd=recipe_dir, stderr=subprocess.PIPE, text=True, env=child_env())
    wait_until_sigterm_is_caught(process.pid)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate()
    assert process.returncode == 0, err[-2000:]
    assert "received SIGTERM" in err and "stopped before the first step" in err, err[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_second_run_on_a_live_run_folder_exits_1_naming_the_holder(tmp_path, sample_base_dir, recipe_dir):
    """Before: two runs in one folder both trained and wrote duplicate steps into metrics.jsonl (issue 18 item 3)."""
    command = [sys.executable, "train_encoder.py", *run_args(sample_base_dir, tmp_path, "run", budget=10**9)]
    first = subprocess.Popen(command, cwd=recipe_dir, stderr=subprocess.PIPE, text=True, env=child_env())
    for line in first.stderr:
        if "loss" in line:  # a training line is in metrics.jsonl: the first run holds the folder and trains
            break
    second = run_command(command, cwd=recipe_dir, check=False)
    first.send_signal(signal.SIGTERM)
    _, rest = first.communicate()
    assert first.returncode == 0, rest[-2000:]
    assert second.returncode == 1, second.stderr[-2000:]
    (line,) = error_lines(second.stderr)
    assert line.startswith("error: ") and f"pid {first.pid} on {socket.gethostname()}" in line, line
    steps = [r["step"] for r in training_records(tmp_path / "run") if "loss" in r]
    assert steps and len(steps) == len(set(steps)), steps
