"""End-to-end training on the bundled sample: loss falls, resume is exact, DDP runs, bad flags fail cleanly."""

import json
import os
import subprocess
import sys

import pytest
import torch

from biorecipes_shared import run_cli
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


@pytest.mark.parametrize("case", ["ctx_len", "missing base_dir"])
def test_startup_errors_leave_no_run_folder_and_no_traceback(tmp_path, sample_base_dir, recipe_dir, case):
    """The entry point itself (a fresh process): one line, exit 1, nothing written; a settings error (checked
    in-process for every setting by test_bad_flags_exit_1_with_one_line) and a data-dependent one."""
    if case == "ctx_len":
        args, line = run_args(sample_base_dir, tmp_path, "bad", 1000, "--ctx_len", "100000"), "error: --ctx_len"
    else:
        args = run_args(tmp_path / "missing", tmp_path, "bad", 1000)
        line = f"error: --base_dir {tmp_path / 'missing'}: no such folder"
    result = subprocess.run([sys.executable, "train_encoder.py", *args], cwd=recipe_dir, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(line)
    assert list(tmp_path.iterdir()) == []  # no run folder, no log_file.txt


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
    assert len(err) == 1 and "step_00000001: weights do not fit" in err[0], err
    assert "blocks.0.attn.qkv.weight (96, 32) vs model (192, 64)" in err[0], err
