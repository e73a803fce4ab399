"""Training runs: loss falls, exact resume, export, real Genecorpus data, and bad inputs end in one-line errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from conftest import RECIPE_DIR, copy_run, tiny_overrides

import model as model_module
import train
from config import LR_SCHEDULES, load_config, validate
from model import BertForMaskedLM, check_te_config, geneformer_config
from run_state import make_optimizer


def logged_losses(output_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records}


@pytest.mark.slow
def test_l0_sanity_loss_falls_and_export_loads(tmp_path):
    extra = {"training.warmup_steps": 4, "training.learning_rate": 0.01, "data.micro_batch_size": 8}
    losses = train.train(load_config("l0_sanity", tiny_overrides(tmp_path, steps=40, **extra)))
    assert len(losses) == 40
    # from ln(767) = 6.64 to below 6.45 (the gene frequencies alone, without context, give 6.24 on the top 64 genes)
    assert sum(losses[:5]) / 5 > 6.55 and sum(losses[-5:]) / 5 < 6.45
    final = tmp_path / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (tmp_path / "loss_curve.png").is_file()
    ours = BertForMaskedLM.from_pretrained(final).eval()
    theirs = transformers.BertForMaskedLM.from_pretrained(final).eval()
    input_ids = torch.randint(2, 767, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.smoke
def test_resume_gives_identical_losses(tmp_path):
    """Stop after step 4 (only step_4 survives, as after a kill), resume in a fresh run: same losses as without stop."""
    extra = {
        "training.save_every": 4,
        "training.keep_last": 5,
        "model.hidden_dropout_prob": 0.1,
        "model.attention_probs_dropout_prob": 0.1,
    }
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    train.train(load_config("l0_sanity", tiny_overrides(full_dir, steps=10, **extra)))
    shutil.copytree(full_dir / "checkpoints" / "step_00000004", resumed_dir / "checkpoints" / "step_00000004")
    train.train(load_config("l0_sanity", tiny_overrides(resumed_dir, steps=10, **extra)))
    full, resumed = logged_losses(full_dir), logged_losses(resumed_dir)
    assert sorted(resumed) == list(range(5, 11)), "resume continues at the next step"
    assert [resumed[s] for s in range(5, 11)] == [full[s] for s in range(5, 11)]


@pytest.mark.slow
def test_trains_on_real_genecorpus_with_full_vocab(tmp_path, genecorpus_dir):
    overrides = tiny_overrides(tmp_path, steps=3) + [
        f"data.train_path={genecorpus_dir / 'genecorpus_500_samples.parquet'}",
        f"data.vocab_path={genecorpus_dir / 'vocab.txt'}",
    ]
    losses = train.train(load_config("l0_sanity", overrides))
    config = json.loads((tmp_path / "final_model" / "config.json").read_text())
    assert config["vocab_size"] == 25426
    assert all(9.0 < loss < 11.0 for loss in losses)  # ~ln(25426) = 10.14 at the start


def run_main(capsys, args):
    code = train.main(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config-name", "nope"], "error: unknown config name 'nope'"),
        (["training.foo=1"], "error: Could not override 'training.foo'."),
        (["training.max_steps=many"], "error: Error merging override training.max_steps=many"),
        (["training.use_fp8=true"], "error: training.use_fp8=true needs a CUDA GPU"),
        (["data.train_path=/nonexistent/cells.parquet"], "error: /nonexistent/cells.parquet: no such data file"),
        (["data.vocab_path=/nonexistent/vocab.txt"], "error: /nonexistent/vocab.txt: no such vocabulary file"),
        (["model.use_te_layers=true"], "error: model.use_te_layers=true needs transformer_engine"),
        (["training.use_fsdp=true"], "error: training.use_fsdp=true shards over several processes"),
        (["training.save_every=0"], "error: training.save_every=0 must be an integer >= 1"),
        (["training.learning_rate=-1"], "error: training.learning_rate=-1.0 must be >= 0"),
        (["training.learning_rate=nan"], "error: training.learning_rate=nan must be a finite number"),
        (["training.learning_rate=inf"], "error: training.learning_rate=inf must be a finite number"),
        (["data.mlm_probability=1.5"], "error: data.mlm_probability=1.5 must be in (0, 1)"),
        (["data.mlm_probability=0"], "error: data.mlm_probability=0.0 must be in (0, 1)"),
        (["model.hidden_dropout_prob=1.0"], "error: model.hidden_dropout_prob=1.0 must be in [0, 1)"),
        (["training.keep_last=-2"], "error: training.keep_last=-2 must be an integer >= 1"),
        (["training.warmup_steps=-1"], "error: training.warmup_steps=-1 must be an integer >= 0"),
        (["training.checkpoint_dir=/elsewhere"], "error: training.checkpoint_dir='/elsewhere' is no longer used"),
        (["model.hidden_act=foo"], "error: model.hidden_act='foo' is unknown"),
        (["training.lr_schedule=foo"], "error: training.lr_schedule='foo': use one of linear, cosine,"),
        (["training.lr_schedule=reduce_lr_on_plateau"], "error: training.lr_schedule='reduce_lr_on_plateau': use"),
        (["training.lr_schedule=constant"], "error: training.lr_schedule=constant ignores warmup_steps"),
        (["training.adam_betas=[0.9]"], "error: training.adam_betas=[0.9] must be two values in [0, 1)"),
        (["training.adam_betas=[0.9,1.5]"], "error: training.adam_betas[1]=1.5 must be in [0, 1)"),
        (["+training.wandb_init_args.project=x"], "error: training.wandb_init_args is set but wandb does not import"),
    ],
)
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    if torch.cuda.is_available() and "use_fp8" in args[0]:
        pytest.skip("a GPU is present")
    if model_module.te is not None and "use_te_layers" in args[0]:
        pytest.skip("transformer_engine is installed")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, even where it is: import raises
    code, lines = run_main(capsys, [f"training.output_dir={tmp_path / 'run'}", *args])
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "run").exists()


def test_te_refuses_exact_gelu(tmp_path, capsys, monkeypatch):
    """TE's gelu is the tanh approximation: exact gelu is refused by name, not swapped (checked without TE here)."""
    monkeypatch.setattr(model_module, "te", object())  # stands in for an importable transformer_engine
    for act in ("relu", "gelu_new", "gelu_pytorch_tanh"):
        check_te_config(geneformer_config(2, use_te_layers=True, hidden_act=act))
    with pytest.raises(ValueError, match=r"hidden_act='gelu' has no Transformer Engine equivalent \(use one of"):
        check_te_config(geneformer_config(2, use_te_layers=True, hidden_act="gelu"))
    args = [f"training.output_dir={tmp_path / 'run'}", "model.hidden_act=gelu", "model.use_te_layers=true"]
    code, lines = run_main(capsys, args)
    assert code == 1 and lines == [
        "error: hidden_act='gelu' has no Transformer Engine equivalent "
        "(use one of ['gelu_new', 'gelu_pytorch_tanh', 'relu'])"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_every_accepted_lr_schedule_builds_and_steps(schedule):
    warmup = 0 if schedule == "constant" else 2
    cfg = load_config("l0_sanity", [f"training.lr_schedule={schedule}", f"training.warmup_steps={warmup}"])
    validate(cfg)
    optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), cfg)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] > 0


def test_the_default_linear_schedule_follows_its_closed_formula():
    """transformers' linear schedule as train.py steps it: warmup from 0 over warmup_steps, then down to 0 at
    max_steps (lr * step / W, then lr * (T - step) / (T - W))."""
    overrides = ["training.max_steps=20", "training.warmup_steps=5", "training.learning_rate=0.01"]
    optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), load_config("l0_sanity", overrides))
    for step in range(1, 21):
        optimizer.step()
        scheduler.step()
        expected = 0.01 * (step / 5 if step < 5 else (20 - step) / 15)
        assert scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-6, abs=1e-12), step


def test_too_few_cells_is_an_error_before_any_output(tmp_path, capsys):
    cells = tmp_path / "cells.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[5, 6, 7]] * 3, type=pa.list_(pa.int32()))}), cells)
    code, lines = run_main(capsys, tiny_overrides(tmp_path / "run") + [f"data.train_path={cells}"])
    assert code == 1 and lines == [f"error: {cells}: 3 cells cannot fill one micro-batch of 4 on 1 ranks"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cells_longer_than_max_seq_length_are_warned_once(tmp_path, caplog):
    logger = logging.getLogger("geneformer.test")  # propagates, unlike the recipe's logger, so caplog sees it
    with caplog.at_level(logging.INFO, logger="geneformer.test"):
        cfg = load_config("l0_sanity", tiny_overrides(tmp_path, steps=2))  # sample cells: 183-409 tokens
        train.train(cfg, logger_factory=lambda name, dist_ctx: logger)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "500 of 500 cells in" in warnings[0] and "longer than data.max_seq_length=64" in warnings[0]


@pytest.mark.slow
def test_checkpoint_of_another_model_size_is_one_line_error(tmp_path, capsys, finished_two_step_run):
    tmp_path = copy_run(finished_two_step_run, tmp_path / "run")
    code, lines = run_main(capsys, tiny_overrides(tmp_path, steps=4) + ["model.hidden_size=64"])
    assert code == 1 and lines[-1].startswith("error: ") and "shape mismatches" in lines[-1]
    assert lines[-1].endswith("the model config differs from the run that saved it: use a new training.output_dir")
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()


def test_leftover_of_a_killed_save_is_removed_and_resume_false_refuses_checkpoints(
    tmp_path, capsys, finished_two_step_run
):
    tmp_path = copy_run(finished_two_step_run, tmp_path / "run")
    (tmp_path / "checkpoints" / "step_00000004").mkdir()  # a save that never finished: no manifest
    (tmp_path / "checkpoints" / ".tmp-step_00000006").mkdir()
    with pytest.warns(UserWarning, match="removed 2 incomplete checkpoint"):
        assert train.main(tiny_overrides(tmp_path, steps=3)) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    code, lines = run_main(capsys, tiny_overrides(tmp_path, steps=4) + ["training.resume=false"])
    assert code == 1 and "already holds checkpoints and resume is 'none'" in lines[-1]


@pytest.mark.slow
def test_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path, capsys, finished_two_step_run):
    tmp_path = copy_run(finished_two_step_run, tmp_path / "run")
    weights = tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, lines = run_main(capsys, tiny_overrides(tmp_path, steps=4))
    assert code == 1 and "sha256 does not match" in lines[-1]
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()


@pytest.mark.smoke
def test_cfg_prints_the_composed_config_and_old_names_still_work(capsys):
    assert (
        train.main(["--config-name", "4b", "--cfg", "job", "training.num_train_steps=7", "training.keep_last=3"]) == 0
    )
    shown, err = capsys.readouterr()
    assert "hidden_size: 2560" in shown and "num_hidden_layers: 36" in shown and "max_steps: 7" in shown
    assert "keep_last: 3" in shown and "num_train_steps" not in shown
    assert err.splitlines() == [
        "note: command line: 'training.num_train_steps' is now called 'training.max_steps'; the old name still works "
        "for now"
    ]


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = subprocess.run(
        [sys.executable, str(RECIPE_DIR / "train.py"), "model.nope=3"], capture_output=True, text=True, cwd=tmp_path
    )
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "Key 'nope' not in" in bad.stderr
