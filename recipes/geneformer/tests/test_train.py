"""Training runs: loss falls, exact resume, export, real Genecorpus data, and bad inputs end in one-line errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import RECIPE_DIR, tiny_overrides

import train
from config import load_config
from model import BertForMaskedLM


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
    final = tmp_path / "checkpoints" / "final_model"
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert (tmp_path / "loss_curve.png").is_file()
    ours = BertForMaskedLM.from_pretrained(final).eval()
    theirs = transformers.BertForMaskedLM.from_pretrained(final).eval()
    input_ids = torch.randint(2, 767, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids=input_ids).logits, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_resume_gives_identical_losses(tmp_path):
    """Stop after step 4 (only step_4 survives, as after a kill), resume in a fresh run: same losses as without stop."""
    extra = {
        "training.save_every_n_steps": 4,
        "training.keep_last_k": 5,
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
    config = json.loads((tmp_path / "checkpoints" / "final_model" / "config.json").read_text())
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
        (["training.num_train_steps=many"], "error: Error merging override training.num_train_steps=many"),
        (["training.use_fp8=true"], "error: training.use_fp8=true needs a CUDA GPU"),
        (["data.train_path=/nonexistent/cells.parquet"], "error: /nonexistent/cells.parquet: no such data file"),
        (["data.vocab_path=/nonexistent/vocab.txt"], "error: /nonexistent/vocab.txt: no such vocabulary file"),
        (["model.hidden_act=gelu", "model.use_te_layers=true"], "error: "),
        (["training.use_fsdp=true"], "error: training.use_fsdp=true shards over several processes"),
        (["training.save_every_n_steps=0"], "error: training.save_every_n_steps=0 must be at least 1"),
    ],
)
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, capsys, args, message):
    if torch.cuda.is_available() and "use_fp8" in args[0]:
        pytest.skip("a GPU is present")
    code, lines = run_main(capsys, [f"training.output_dir={tmp_path / 'run'}", *args])
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "run").exists()


def test_existing_but_broken_checkpoints_are_errors(tmp_path, capsys):
    (tmp_path / "checkpoints" / "step_00000004").mkdir(parents=True)  # a save that never finished
    code, lines = run_main(capsys, tiny_overrides(tmp_path))
    assert code == 1 and "none is a complete checkpoint" in lines[-1]
    code, lines = run_main(capsys, tiny_overrides(tmp_path) + ["training.resume_from_checkpoint=false"])
    assert code == 1 and "already holds checkpoints" in lines[-1]


@pytest.mark.slow
def test_corrupt_checkpoint_is_an_error_not_a_restart(tmp_path, capsys):
    assert train.main(tiny_overrides(tmp_path, steps=2)) == 0
    weights = tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, lines = run_main(capsys, tiny_overrides(tmp_path, steps=4))
    assert code == 1 and "sha256 does not match" in lines[-1]
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()


def test_cfg_prints_the_composed_config(capsys):
    assert train.main(["--config-name", "4b", "--cfg", "job", "training.num_train_steps=7"]) == 0
    shown = capsys.readouterr().out
    assert "hidden_size: 2560" in shown and "num_hidden_layers: 36" in shown and "num_train_steps: 7" in shown


def test_cli_error_is_one_line_without_traceback(tmp_path):
    bad = subprocess.run(
        [sys.executable, str(RECIPE_DIR / "train.py"), "model.nope=3"], capture_output=True, text=True, cwd=tmp_path
    )
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "Key 'nope' not in" in bad.stderr


@pytest.mark.slow
def test_preemption_saves_stops_and_resumes_identically(tmp_path, monkeypatch):
    """SIGTERM (as SLURM sends) at step 3: checkpoint, stop without export; the rerun matches an uninterrupted run."""

    class SignalAtStep3(train.PreemptionHandler):
        calls = 0

        def should_stop(self, dist_ctx=None):
            SignalAtStep3.calls += 1
            if SignalAtStep3.calls == 3:
                self._handle(signal.SIGTERM, None)
            return super().should_stop(dist_ctx)

    extra = {"training.save_every_n_steps": 100, "model.hidden_dropout_prob": 0.1}
    train.train(load_config("l0_sanity", tiny_overrides(tmp_path / "full", steps=6, **extra)))
    monkeypatch.setattr(train, "PreemptionHandler", SignalAtStep3)
    train.train(load_config("l0_sanity", tiny_overrides(tmp_path / "cut", steps=6, **extra)))
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_00000003"]
    monkeypatch.undo()
    train.train(load_config("l0_sanity", tiny_overrides(tmp_path / "cut", steps=6, **extra)))
    assert logged_losses(tmp_path / "cut") == logged_losses(tmp_path / "full")
