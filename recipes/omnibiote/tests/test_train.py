"""End-to-end training on the bundled sample: loss falls, resume is exact, DDP runs, bad flags fail cleanly."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from biorecipes_shared.checkpoint import verify_checkpoint
from biorecipes_shared.run import run_cli
from biorecipes_shared.testing import run_command, torchrun_command
from errors import OmniBioteError
from model import OmniBioTA
from train_encoder import main

TINY = [
    "--n_layer",
    "1",
    "--n_head",
    "2",
    "--n_embd",
    "32",
    "--ctx_len",
    "64",
    "--mini_batch_size",
    "4",
    "--batch_size",
    "8",
    "--force_lr",
    "--lr",
    "0.03",
    "--val_batches",
    "2",
    "--log_freq",
    "2",
    "--source_weights",
    "genbank=0.5,uniprot=0.5",
    "--ramp_fraction",
    "0.2",
]


@pytest.fixture(autouse=True)
def fresh_logger():
    """The trainer's log handler holds the stderr of the test that made it: give each test its own."""
    logger = logging.getLogger("omnibiote")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    yield


def run_args(base_dir, out_dir, name, budget, *extra):
    paths = ["--base_dir", str(base_dir), "--out_dir", str(out_dir), "--save_name", name]
    return [*paths, "--token_budget", str(budget), *TINY, *extra]


def cli(argv) -> int:
    """The exit code `python train_encoder.py argv` gives, run in this process."""
    return run_cli(lambda: main(argv), user_errors=(OmniBioteError,))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_run_validation_loss_falls_and_model_loads(tmp_path, sample_base_dir):
    main(run_args(sample_base_dir, tmp_path, "run", 8 * 64 * 30, "--test_freq", "5000"))
    val = [m["val_loss"] for m in metrics(tmp_path / "run") if "val_loss" in m]
    assert len(val) >= 3 and val[-1] < val[0] - 0.5, val
    training = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert all(m["tokens_per_s"] > 0 for m in training)  # real tokens of this process per second
    assert all(m["useful_token_fraction"] == 1.0 for m in training)  # packed windows of whole sources: no padding
    final = tmp_path / "run" / "final_model"
    assert {p.name for p in final.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 0
    model = OmniBioTA.from_pretrained(final)
    assert model.encode(torch.tensor([[4, 50, 60, 2, 0]]), "mean").shape == (1, 32)


@pytest.mark.slow
def test_max_steps_then_more_steps_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, sample_base_dir):
    budget = 8 * 64 * 12
    main(run_args(sample_base_dir, tmp_path, "straight", budget, "--dropout", "0.1"))
    main(run_args(sample_base_dir, tmp_path, "resumed", budget, "--dropout", "0.1", "--max_steps", "5"))
    assert (tmp_path / "resumed" / "checkpoints" / "step_00000005").is_dir()
    finished = json.loads((tmp_path / "resumed" / "run_finished.json").read_text())
    assert finished["step"] == 5 and finished["reason"] == "--max_steps reached"
    main(run_args(sample_base_dir, tmp_path, "resumed", budget, "--dropout", "0.1"))  # more steps: continues
    straight = load_file(tmp_path / "straight" / "final_model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "final_model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = {m["step"]: m["loss"] for m in metrics(tmp_path / "resumed") if "loss" in m}
    reference = {m["step"]: m["loss"] for m in metrics(tmp_path / "straight") if "loss" in m}
    assert {step: losses[step] for step in reference} == reference  # the stopped run also logged its last step


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_continues(tmp_path, sample_base_dir, recipe_dir):
    args = run_args(sample_base_dir, tmp_path, "preempted", 10**9, "--log_freq", "1")
    process = subprocess.Popen(
        [sys.executable, "train_encoder.py", *args], cwd=recipe_dir, stderr=subprocess.PIPE, text=True
    )
    for line in process.stderr:  # ends when the process does
        if "loss" in line:
            process.send_signal(signal.SIGTERM)
            break
    time.sleep(0.3)  # a second signal while the preemption save runs (before: the process died with -15)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    _, rest = process.communicate()
    assert process.returncode == 0, rest[-2000:]
    assert "received SIGTERM" in rest and "rerun the same command to continue" in rest
    (checkpoint,) = (tmp_path / "preempted" / "checkpoints").iterdir()
    verify_checkpoint(checkpoint, check_hashes=True)
    stopped_at = int(checkpoint.name.split("_")[1])
    assert stopped_at >= 1 and not (tmp_path / "preempted" / "final_model").exists()
    main([*args, "--max_steps", str(stopped_at + 2)])
    assert (tmp_path / "preempted" / "checkpoints" / f"step_{stopped_at + 2:08d}").is_dir()


@pytest.mark.slow
def test_two_process_torchrun(tmp_path, sample_base_dir, recipe_dir):
    args = run_args(
        sample_base_dir, tmp_path, "ddp", 8 * 64 * 6, "--mini_batch_size", "2", "--activation_checkpointing"
    )
    result = run_command(torchrun_command("train_encoder.py", args, nproc=2), cwd=recipe_dir)
    checkpoint = next((tmp_path / "ddp" / "checkpoints").iterdir())
    assert {"rank_0.pt", "rank_1.pt", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert "4 mini-batches of 2 per step over 2 rank(s)" in result.stderr
    assert OmniBioTA.from_pretrained(tmp_path / "ddp" / "final_model").num_parameters() > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch_size", "10"], "--batch_size 10 must be a multiple of --mini_batch_size 4"),
        (["--n_embd", "30"], "--n_embd 30 must split into 2 heads of even size"),
        (["--source_weights", "refseq=1"], "--source_weights names 'refseq'"),
        (["--ctx_len", "0"], "--ctx_len=0 must be an integer >= 1"),
        (["--ctx_len", "1"], "--ctx_len=1 must be at least 2"),
        (["--val_batches", "0"], "--val_batches=0 must be an integer >= 1"),
        (["--log_freq", "0"], "--log_freq=0 must be an integer >= 1"),
        (["--n_head", "0"], "--n_head=0 must be an integer >= 1"),
        (["--mini_batch_size", "0"], "--mini_batch_size=0 must be an integer >= 1"),
        (["--max_steps", "0"], "--max_steps=0 must be an integer >= 1"),
        (["--token_budget", "nan"], "--token_budget=nan must be a finite number"),
        (["--test_freq", "-1"], "--test_freq=-1.0 must be >= 0"),
        (["--dropout", "1.5"], "--dropout=1.5 must be in [0, 1)"),
        (["--lr", "-1"], "--lr=-1.0 must be >= 0"),
        (["--lr", "nan"], "--lr=nan must be a finite number"),
        (["--lr", "inf"], "--lr=inf must be a finite number"),
        (["--ramp_fraction", "1.5"], "--ramp_fraction=1.5 must be in [0, 1)"),
        (["--warmup_fraction", "-0.1"], "--warmup_fraction=-0.1 must be in [0, 1)"),
        (["--beta2", "1"], "--beta2=1.0 must be in [0, 1)"),
        (["--init_from", "nowhere"], "--init_from nowhere: no model.safetensors there"),
        # the val genbank array of the sample holds 4113 tokens: a window cannot be longer
        (["--ctx_len", "5000"], "--ctx_len 5000 is longer than all 4113 tokens of"),
    ],
)
def test_bad_flags_exit_1_with_one_line(tmp_path, sample_base_dir, capsys, extra, message):
    assert cli(run_args(sample_base_dir, tmp_path, "bad", 1000, *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "bad").exists()  # no run folder, no log_file.txt


@pytest.mark.parametrize("extra", [["--ctx_len", "100000"], ["--val_batches", "0"]])
def test_startup_errors_leave_no_run_folder_and_no_traceback(tmp_path, sample_base_dir, recipe_dir, extra):
    args = run_args(sample_base_dir, tmp_path, "bad", 1000, *extra)
    result = subprocess.run(
        [sys.executable, "train_encoder.py", *args], cwd=recipe_dir, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {extra[0]}")
    assert list(tmp_path.iterdir()) == []


def test_missing_base_dir_splits_exit_1(tmp_path, sample_base_dir, capsys):
    assert cli(run_args(tmp_path / "nowhere", tmp_path, "x", 1000)) == 1
    assert "no such folder" in capsys.readouterr().err
    partial = tmp_path / "partial"
    (partial / "train").mkdir(parents=True)
    os.symlink(sample_base_dir / "train" / "uniprot", partial / "train" / "uniprot")
    (partial / "tokenizer.model").write_bytes((sample_base_dir / "tokenizer.model").read_bytes())
    assert cli(run_args(partial, tmp_path, "x", 1000)) == 1
    assert f"error: {partial / 'val'}: no encoded data" in capsys.readouterr().err


def test_resume_with_other_ctx_len_is_refused(tmp_path, sample_base_dir, capsys):
    main(run_args(sample_base_dir, tmp_path, "run", 8 * 64 * 4, "--max_steps", "1"))
    assert cli(run_args(sample_base_dir, tmp_path, "run", 8 * 64 * 4, "--ctx_len", "128")) == 1
    assert "was trained with ctx_len=64, not 128" in capsys.readouterr().err
    assert cli(run_args(sample_base_dir, tmp_path, "run", 8 * 64 * 4, "--n_embd", "64")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume this run from it" in err[0] and "shape mismatch" in err[0]


def test_command_line_error_has_no_traceback(tmp_path, recipe_dir):
    args = run_args(tmp_path / "missing", tmp_path, "x", 1000)
    result = subprocess.run([sys.executable, "train_encoder.py", *args], cwd=recipe_dir, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: --base_dir {tmp_path / 'missing'}: no such folder"
    assert "Traceback" not in result.stderr
