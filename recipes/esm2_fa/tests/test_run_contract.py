"""The run contract of the training loop: one command for first run and requeue, complete-or-absent checkpoints, exact
resume (weights, metrics, early-stopping state), preemption, finished runs, world-size changes, write errors."""

import errno
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import RECIPE_DIR, TINY_CONFIG
from safetensors.torch import load_file

import biorecipes_shared.checkpoint as shared_checkpoint
from biorecipes_shared import verify_checkpoint
from biorecipes_shared.testing import child_env, kill_around_saves, run_command, torchrun_command
from config import load
from train import main, run

TRAIN = RECIPE_DIR / "src" / "train.py"
# One shape of run for the subprocess tests, so they share one uninterrupted reference.
STEPS = 16
RUN_SETTINGS = [
    f"training.max_steps={STEPS}",
    "training.eval_steps=4",
    "training.save_every=4",
    "training.logging_steps=2",
    "training.keep_last=2",
]


def cli_args(tiny_shards, out_dir, *extra):
    train_dir, val_dir = tiny_shards
    args = ["--config", str(TINY_CONFIG), "--train_dir", str(train_dir), "--val_dir", str(val_dir)]
    return [*args, "--output_dir", str(out_dir), *extra]


def cli_command(tiny_shards, out_dir, *extra):
    return [sys.executable, str(TRAIN), *cli_args(tiny_shards, out_dir, *extra)]


WALL_CLOCK = ("tokens_per_s", "samples_per_s")  # differ between any two runs; useful_token_fraction does not


def step_records(out_dir):
    """metrics.jsonl without the wall-clock rates."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


def assert_same_run(a, b):
    wa, wb = load_file(a / "final_model" / "model.safetensors"), load_file(b / "final_model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert step_records(a) == step_records(b)
    assert (
        json.loads((a / "run_finished.json").read_text())["step"]
        == json.loads((b / "run_finished.json").read_text())["step"]
    )


@pytest.fixture(scope="module")
def straight_run(tiny_shards, tmp_path_factory):
    """The uninterrupted reference run, as a fresh process like the interrupted ones."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_command(cli_command(tiny_shards, out, *RUN_SETTINGS), cwd=RECIPE_DIR)
    return out


def tiny_cfg(tiny_shards, out_dir, *extra):
    train_dir, val_dir = tiny_shards
    overrides = [f"data.train_dir={train_dir}", f"data.val_dir={val_dir}", f"training.output_dir={out_dir}"]
    return load(TINY_CONFIG, [*overrides, *extra])


@pytest.mark.slow
def test_kill_9_around_saves_then_the_same_command_ends_as_the_uninterrupted_run(tiny_shards, tmp_path, straight_run):
    out = tmp_path / "killed"
    report = kill_around_saves(
        cli_command(tiny_shards, out, *RUN_SETTINGS), out / "checkpoints", kills=3, cwd=RECIPE_DIR
    )
    assert report.failures == [] and report.kills == 3, report
    assert_same_run(straight_run, out)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_the_rerun_is_the_uninterrupted_run(tiny_shards, tmp_path, straight_run):
    out = tmp_path / "preempted"
    command = cli_command(tiny_shards, out, *RUN_SETTINGS)
    proc = subprocess.Popen(command, cwd=RECIPE_DIR, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / "checkpoints" / "step_00000004"
    while not first.is_dir() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # a second signal, as schedulers send, lands during the preemption save
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "preempted at step" in stdout.decode() and "received SIGTERM" in stderr.decode()
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert saved and int(saved[-1][5:]) < STEPS and not (out / "final_model").exists()
    run_command(command, cwd=RECIPE_DIR)
    assert_same_run(straight_run, out)


@pytest.mark.smoke
def test_one_command_starts_requeues_past_leftovers_and_leaves_a_finished_run_alone(tiny_shards, tmp_path, capsys):
    args = cli_args(tiny_shards, tmp_path, "training.eval_steps=2", "training.save_every=2", "training.logging_steps=2")
    assert main([*args, "training.max_steps=2"]) == 0  # fresh folder, default resume=auto
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_00000004").mkdir()  # what a kill during HF's in-place save used to leave
    (checkpoints / "step_00000004" / "config.json").write_text("{}")
    (checkpoints / ".tmp-step_00000006").mkdir()
    with pytest.warns(UserWarning, match="removed 2 incomplete checkpoint"):
        assert main([*args, "training.max_steps=4"]) == 0  # the same command, more steps: continues from step 2
    assert [r["step"] for r in step_records(tmp_path) if "eval_loss" in r] == [2, 4]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]
    assert verify_checkpoint(checkpoints / "step_00000004")["step"] == 4

    final = tmp_path / "final_model" / "model.safetensors"
    weights, metrics = final.read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    before = (final.stat().st_mtime_ns, weights, sorted(p.name for p in checkpoints.iterdir()))
    capsys.readouterr()
    assert main([*args, "training.max_steps=4"]) == 0  # finished: a one-line no-op
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "already finished at step 4" in out[0], out
    assert before == (final.stat().st_mtime_ns, final.read_bytes(), sorted(p.name for p in checkpoints.iterdir()))
    assert (tmp_path / "metrics.jsonl").read_text() == metrics

    # Killed between the final checkpoint and run_finished.json: HF's loop would train a step past max_steps.
    (tmp_path / "run_finished.json").unlink()
    shutil.rmtree(tmp_path / "final_model")
    assert main([*args, "training.max_steps=4"]) == 0
    assert final.read_bytes() == weights and (tmp_path / "metrics.jsonl").read_text() == metrics
    assert json.loads((tmp_path / "run_finished.json").read_text())["step"] == 4
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002", "step_00000004"]

    capsys.readouterr()
    assert main([*args, "training.max_steps=6", "--resume", "none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds checkpoints and resume is 'none'" in err[0]


def test_early_stopping_patience_survives_a_resume(tiny_shards, tmp_path):
    # The repro, shortened: patience 2 with an unreachable threshold stops after the 3rd evaluation.
    common = ["training.eval_steps=2", "training.save_every=2", "training.logging_steps=2"]
    common += ["training.early_stopping.patience=2", "training.early_stopping.threshold=10.0"]
    common += ["training.keep_last=0"]
    run(tiny_cfg(tiny_shards, tmp_path / "a", "training.max_steps=40", *common))
    run(tiny_cfg(tiny_shards, tmp_path / "b", "training.max_steps=4", *common))
    run(tiny_cfg(tiny_shards, tmp_path / "b", "training.max_steps=40", *common))
    for name in ("a", "b"):
        record = json.loads((tmp_path / name / "run_finished.json").read_text())
        assert record["early_stopped"] and record["step"] == 6, (name, record)
    assert step_records(tmp_path / "a") == step_records(tmp_path / "b")


def test_checkpoint_write_error_is_one_line_and_the_next_run_resumes(tiny_shards, tmp_path, capsys, monkeypatch):
    original = shared_checkpoint.save_file

    def disk_full_at_step_4(tensors, filename, *args, **kwargs):
        if ".tmp-step_00000004" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(shared_checkpoint, "save_file", disk_full_at_step_4)
    args = cli_args(tiny_shards, tmp_path, "training.max_steps=4", "training.eval_steps=2", "training.save_every=2")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no space left on device" in err[0], err
    assert "step_00000004" in err[0]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]  # no temp dir left
    assert verify_checkpoint(checkpoints / "step_00000002")["step"] == 2
    monkeypatch.setattr(shared_checkpoint, "save_file", original)
    assert main(args) == 0
    assert json.loads((tmp_path / "run_finished.json").read_text())["step"] == 4


@pytest.mark.slow
def test_world_size_change_is_refused_in_one_line_naming_both_sizes(tiny_shards, tmp_path, capsys):
    settings = ["training.eval_steps=2", "training.save_every=2", "data.num_workers=1"]
    two = tmp_path / "two"
    run_command(torchrun_command(TRAIN, cli_args(tiny_shards, two, "training.max_steps=2", *settings)), cwd=tmp_path)
    assert main(cli_args(tiny_shards, two, "training.max_steps=4", *settings)) == 1  # 2 -> 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved by 2 process(es) and this run has 1" in err[0], err
    one = tmp_path / "one"
    assert main(cli_args(tiny_shards, one, "training.max_steps=2", *settings)) == 0
    result = run_command(
        torchrun_command(TRAIN, cli_args(tiny_shards, one, "training.max_steps=4", *settings)),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode != 0  # 1 -> 2
    assert "error: " in result.stderr and "saved by 1 process(es) and this run has 2" in result.stderr
    assert json.loads((one / "run_finished.json").read_text())["step"] == 2  # nothing was trained


@pytest.fixture(scope="module")
def two_step_run(tiny_shards, tmp_path_factory):
    """A run stopped after its step-2 checkpoint (module-scoped: the tamper cases copy it)."""
    out = tmp_path_factory.mktemp("two_step") / "run"
    args = cli_args(tiny_shards, out, "training.max_steps=2", "training.eval_steps=2", "training.save_every=2")
    assert main(args) == 0
    (out / "run_finished.json").unlink()  # so that a longer rerun resumes from step 2
    return out


class Payload:
    """A pickle that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (print, ("tampered",))


@pytest.mark.parametrize(
    "name, content",
    [
        ("training_state.pt", {"optimizer": Payload()}),
        ("rank_0.pt", {"python": Payload()}),
        ("training_state.pt", {"step": 2}),  # loads, but holds no optimizer state
        ("rank_0.pt", {"junk": torch.zeros(1)}),  # loads, but is no RNG state
    ],
)
def test_a_tampered_checkpoint_file_with_a_rehashed_manifest_is_one_line_exit_1(
    tiny_shards, two_step_run, tmp_path, capsys, name, content
):
    out = tmp_path / "run"
    shutil.copytree(two_step_run, out)
    checkpoint = out / "checkpoints" / "step_00000002"
    torch.save(content, checkpoint / name)
    (checkpoint / "manifest.json").unlink()
    shared_checkpoint.write_manifest(checkpoint, 2)  # the manifest matches the tampered file
    verify_checkpoint(checkpoint)
    args = cli_args(tiny_shards, out, "training.max_steps=4", "training.eval_steps=2", "training.save_every=2")
    assert main(args) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in captured.err, err
    assert str(checkpoint) in err[0] and "tampered" not in captured.out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # nothing trained


@pytest.mark.slow
def test_sigterm_before_the_loop_exits_0_and_saves_nothing(tiny_shards, tmp_path):
    out = tmp_path / "early"
    command = cli_command(tiny_shards, out, *RUN_SETTINGS)
    proc = subprocess.Popen(command, cwd=RECIPE_DIR, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.0)  # the interpreter is up and importing torch: the stop flag is installed, the loop not reached
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode()[-3000:]
    assert "before the first step" in stdout.decode(), stdout.decode()
    assert not list((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else True
