"""Training: LR schedule, optimizer choice, CLI errors, a tiny run whose loss falls, exact resume, 2 processes."""

import json
import logging
import math
import shutil

import pytest
import torch
from conftest import RECIPE_DIR, TINY_CONFIG
from safetensors.torch import load_file
from transformers import EsmForMaskedLM
from transformers.integrations import is_wandb_available

from biorecipes_shared.testing import run_command, torchrun_command
from config import ConfigError, load
from data import check_data_fingerprints
from data_processing import PACKING_FILE
from model import faesm_available, load_pretrained
from run_state import esm2_schedule, fused_adamw_supported
from train import main, parse_args, run


def old_esm2_lr_lambda(step: int, warmup_steps: int, schedule_steps: int, floor: float = 0.1) -> float:
    """The recipe's hand-written schedule before it came from transformers (src/trainer.py:31 at 3ef3636)."""
    if step < warmup_steps:
        return step / warmup_steps
    if step >= schedule_steps:
        return floor
    progress = (step - warmup_steps) / max(1, schedule_steps - warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_lr_schedule_equals_the_old_formula_and_survives_a_state_dict_round_trip():
    def lrs(scheduler, steps):
        out = []
        for _ in range(steps):
            out.append(scheduler.get_last_lr()[0])
            scheduler.optimizer.step()
            scheduler.step()
        return out

    make = lambda: esm2_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=4e-4), 100, 1100)  # noqa: E731
    got = lrs(make(), 1300)
    old = [4e-4 * old_esm2_lr_lambda(step, 100, 1100) for step in range(1300)]
    assert got == old  # bitwise: the same float64 operations in the same order
    assert got[0] == 0.0 and got[50] == pytest.approx(2e-4) and got[600] == pytest.approx(0.55 * 4e-4)
    assert got[1100] == got[1299] == pytest.approx(0.4e-4)  # held at the floor after schedule_steps
    resumed = make()
    resumed.load_state_dict(make_at(make(), 700).state_dict())
    assert lrs(resumed, 5) == got[700:705]


def make_at(scheduler, step):
    for _ in range(step):
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler


def test_config_defaults_and_validation(tmp_path):
    cfg = load()
    t = cfg.training
    assert (t.learning_rate, t.gradient_accumulation_steps, t.mlm_probability) == (4e-4, 64, 0.2)
    assert t.early_stopping.enabled and t.early_stopping.patience == 5 and t.early_stopping.threshold == 0.0
    assert t.metric_for_best_model == "eval_loss" and t.load_best_model_at_end and t.optimizer.fused is None
    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        load(TINY_CONFIG, ["training.load_best_model_at_end=false"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        load(TINY_CONFIG, ["training.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="learning_rte"):
        load(TINY_CONFIG, ["training.learning_rte=1.0"])
    with pytest.raises(ConfigError, match=r"attention_probs_dropout_prob=1.5 must be in \[0, 1\)"):
        load(TINY_CONFIG, ["model.attention_probs_dropout_prob=1.5"])
    with pytest.raises(ConfigError, match="data.num_workers=-1 must be an integer >= 0"):
        load(TINY_CONFIG, ["data.num_workers=-1"])


@pytest.mark.smoke
def test_the_originals_hf_names_still_work_with_a_one_line_note(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("training:\n  save_steps: 20\n  save_total_limit: 1\n  eval_steps: 10\n")
    _, overrides = parse_args(["--resume_from_checkpoint", "none", "training.max_steps=40"])
    cfg = load(old, overrides)
    assert (cfg.training.save_every, cfg.training.keep_last, cfg.training.resume) == (20, 1, "none")
    assert cfg.training.max_steps == 40 and load(old).training.resume == "auto"
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 5 and all("the old name still works" in line for line in notes), notes
    assert any("'training.save_total_limit' is now called 'training.keep_last'" in line for line in notes)
    assert any("'training.resume_from_checkpoint' is now called 'training.resume'" in line for line in notes)


def test_fused_adamw_detection_runs_here():
    assert isinstance(fused_adamw_supported(torch.device("cpu")), bool)


def test_cli_errors_are_one_line_and_exit_1(tiny_shards, tmp_path, capsys):
    train_dir, val_dir = tiny_shards
    base = ["--config", str(TINY_CONFIG), "--output_dir", str(tmp_path / "out")]
    assert main([*base, "--train_dir", str(train_dir), "--val_dir", str(tmp_path / "nope")]) == 1
    assert "val dir" in capsys.readouterr().err
    assert main([*base, "--train_dir", str(train_dir), "--val_dir", str(val_dir), "data.num_workers=64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "num_workers 64" in err and len(err.strip().splitlines()) == 1
    args = [*base, "--train_dir", str(train_dir), "--val_dir", str(val_dir), "--resume", "nope/step_1"]
    assert main([*args, "training.max_steps=1"]) == 1
    assert "resume checkpoint nope/step_1 does not exist" in capsys.readouterr().err
    out = tmp_path / "out"
    assert not out.exists() or [p.name for p in out.iterdir()] == [".run.lock"]  # at most the run-folder lock


def assert_refused(args, out_dir, capsys, *fragments):
    """main() exits 1 with a single `error:` line naming the fragments, and creates no output dir."""
    assert main(args) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["training.max_steps=-1"], ["training.max_steps=-1 must be an integer >= 1"]),
        (["training.eval_steps=0"], ["training.eval_steps=0 must be an integer >= 1"]),
        (["training.gradient_accumulation_steps=0"], ["training.gradient_accumulation_steps=0 must be an integer"]),
        (["training.keep_last=-1"], ["training.keep_last=-1 must be an integer >= 0"]),
        (["training.learning_rate=-1"], ["training.learning_rate=-1.0 must be > 0"]),
        (["training.learning_rate=nan"], ["training.learning_rate=nan must be a finite number"]),
        (["training.learning_rate=inf"], ["training.learning_rate=inf must be a finite number"]),
        (["training.mlm_probability=1.5"], ["training.mlm_probability=1.5 must be in (0, 1)"]),
        (["training.mlm_probability=0"], ["training.mlm_probability=0.0 must be in (0, 1)"]),
        (["training.optimizer.adam_beta2=1.0"], ["training.optimizer.adam_beta2=1.0 must be in [0, 1)"]),
        (["model.hidden_dropout_prob=-0.1"], ["model.hidden_dropout_prob=-0.1 must be in [0, 1)"]),
        (["training.gradient_clipping=0"], ["training.gradient_clipping=0.0 must be > 0"]),
        (["training.metric_for_best_model=eval_acc"], ["training.metric_for_best_model must be one of"]),
        (["training.report_to=wandb", "training.max_steps=1"], ["report_to=wandb", "needs the wandb package"]),
        (["training.report_to=tensorbord"], ["training.report_to must be one of"]),
        (["model.max_batch_size=512", "training.max_steps=1"], ["token budget of 1024", "max_batch_size is 512"]),
        (["model.attention=flash", "training.max_steps=1"], ["model.attention must be one of", "attention=faesm"]),
        (["model.attention=flex_attention", "training.max_steps=1"], ["flex_attention has no backward pass on CPU"]),
        (["training.mixed_precision=fp16", "training.max_steps=1"], ["fp16 needs a CUDA GPU"]),
        (["training.compile_scope=layer"], ["training.compile_scope must be one of blocks, model"]),
        (["model.attention=faesm", "training.max_steps=1"], ["model.attention=faesm needs faesm 0.1.1"]),
    ],
)
def test_bad_training_input_is_one_error_line_and_no_output_dir(tiny_shards, tmp_path, capsys, overrides, fragments):
    if "report_to=wandb" in fragments and is_wandb_available():
        pytest.skip("wandb is installed here")
    if "model.attention=faesm" in overrides and faesm_available():
        pytest.skip("faesm imports here")
    train_dir, val_dir = tiny_shards
    out = tmp_path / "out"
    args = ["--config", str(TINY_CONFIG), "--train_dir", str(train_dir), "--val_dir", str(val_dir)]
    assert_refused([*args, "--output_dir", str(out), *overrides], out, capsys, *fragments)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_shard_dir_that_is_not_a_dataset_is_refused_before_training(tiny_shards, tmp_path, capsys, split):
    dirs = {name: tmp_path / name for name in ("train", "val")}
    for name, src in zip(("train", "val"), tiny_shards):
        shutil.copytree(src, dirs[name])
    broken = dirs[split] / "shard-00000"
    shutil.rmtree(broken)
    broken.mkdir()
    (broken / "notes.txt").write_text("not a dataset")
    out = tmp_path / "out"
    args = ["--config", str(TINY_CONFIG), "--train_dir", str(dirs["train"]), "--val_dir", str(dirs["val"])]
    assert_refused([*args, "--output_dir", str(out), "training.max_steps=1"], out, capsys, f"{split} shard {broken}")


def test_output_dir_that_is_a_file_is_refused(tiny_shards, tmp_path, capsys):
    train_dir, val_dir = tiny_shards
    out = tmp_path / "out.txt"
    out.write_text("keep")
    args = ["--config", str(TINY_CONFIG), "--train_dir", str(train_dir), "--val_dir", str(val_dir)]
    assert main([*args, "--output_dir", str(out), "training.max_steps=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a directory" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "keep"


def test_packing_json_smaller_budget_passes_and_missing_one_warns(tiny_shards, tmp_path, caplog):
    train_dir, _ = tiny_shards
    model_cfg = load(TINY_CONFIG).model
    assert json.loads((train_dir / PACKING_FILE).read_text())["token_budget"] == 1024 < model_cfg.max_batch_size
    check_data_fingerprints({"train": train_dir}, model_cfg)  # packed under the budget: fine
    old = tmp_path / "old"
    shutil.copytree(train_dir, old)
    (old / PACKING_FILE).unlink()
    logging.getLogger("esm2_fa").addHandler(caplog.handler)
    try:
        check_data_fingerprints({"train": old}, model_cfg)
    finally:
        logging.getLogger("esm2_fa").removeHandler(caplog.handler)
    assert any(r.levelno == logging.WARNING and PACKING_FILE in r.getMessage() for r in caplog.records)


def tiny_cfg(train_dir, val_dir, out_dir, *extra):
    overrides = [
        f"data.train_dir={train_dir}",
        f"data.val_dir={val_dir}",
        f"training.output_dir={out_dir}",
        "training.logging_steps=2",
        *extra,
    ]
    return load(TINY_CONFIG, overrides)


@pytest.mark.slow
def test_tiny_training_loss_falls_and_exports_a_loadable_model(tiny_shards, tmp_path):
    cfg = tiny_cfg(*tiny_shards, tmp_path, "training.max_steps=40", "training.eval_steps=20", "training.save_every=20")
    final = run(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 20 and len(evals) == 2
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert (tmp_path / "checkpoints" / "step_00000040" / "manifest.json").is_file()
    assert all(0.5 < r["useful_token_fraction"] <= 1.0 and r["tokens_per_s"] > 0 for r in records if "loss" in r)
    assert (tmp_path / "loss_curve.png").is_file() and (tmp_path / "run_finished.json").is_file()
    model = EsmForMaskedLM.from_pretrained(final)  # plain transformers loads the export
    assert model.config.num_hidden_layers == 2 and (final / "vocab.txt").is_file()
    assert model.config.architectures == ["EsmForMaskedLM"] and not (final / "training_args.bin").exists()


@pytest.mark.slow
def test_resume_continues_the_same_run_exactly(tiny_shards, tmp_path):
    common = ["training.eval_steps=3", "training.save_every=3", "training.keep_last=5", "data.num_workers=2"]
    common += ["training.early_stopping.enabled=false", "training.load_best_model_at_end=false"]
    run(tiny_cfg(*tiny_shards, tmp_path / "straight", "training.max_steps=6", *common))
    run(tiny_cfg(*tiny_shards, tmp_path / "resumed", "training.max_steps=3", *common))  # "preempted" after step 3
    run(tiny_cfg(*tiny_shards, tmp_path / "resumed", "training.max_steps=6", "training.resume=latest", *common))
    ckpt = lambda run_dir, step: run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"  # noqa: E731
    a = load_file(ckpt(tmp_path / "straight", 6))
    b = load_file(ckpt(tmp_path / "resumed", 6))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(ckpt(tmp_path / "straight", 3))
    assert not all(torch.equal(a[k], start[k]) for k in a)  # training did change the weights


@pytest.mark.slow
def test_two_process_torchrun_on_cpu(tiny_shards, tmp_path):
    train_dir, val_dir = tiny_shards
    cmd = torchrun_command(
        RECIPE_DIR / "src" / "train.py", ["--config", str(TINY_CONFIG), "--train_dir", str(train_dir)]
    )
    cmd += ["--val_dir", str(val_dir), "--output_dir", str(tmp_path), "training.max_steps=6", "training.eval_steps=3"]
    cmd += ["training.save_every=3", "training.logging_steps=2", "data.num_workers=1"]
    run_command(cmd, cwd=tmp_path)
    checkpoint = tmp_path / "checkpoints" / "step_00000006"
    extra = torch.load(checkpoint / "training_state.pt", weights_only=True)["extra"]
    assert extra["stream"] == {"world_size": 2, "num_workers": 1, "seed": 42}
    for rank in (0, 1):  # each rank's own position in its own part of the stream
        assert torch.load(checkpoint / f"rank_{rank}.pt", weights_only=True)["data_state"]["batches_consumed"] == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_loss" in r for r in records) == 2  # written once (rank 0), not once per rank
    assert (tmp_path / "final_model" / "model.safetensors").is_file()


@pytest.mark.faesm
def test_faesm_trains_resumes_exactly_and_its_export_loads_in_transformers(tiny_shards, tmp_path):
    pytest.importorskip("faesm.esm", reason="faesm needs transformers <= 4.53: .venv-faesm", exc_type=ImportError)
    common = ["model.attention=faesm", "training.eval_steps=2", "training.save_every=2", "data.num_workers=0"]
    common += ["training.early_stopping.enabled=false", "training.load_best_model_at_end=false"]
    final = run(tiny_cfg(*tiny_shards, tmp_path / "straight", "training.max_steps=4", *common))
    run(tiny_cfg(*tiny_shards, tmp_path / "resumed", "training.max_steps=2", *common))  # "preempted" after step 2
    run(tiny_cfg(*tiny_shards, tmp_path / "resumed", "training.max_steps=4", *common))
    a = load_file(tmp_path / "straight" / "final_model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = EsmForMaskedLM.from_pretrained(final).eval()  # the export is transformers' layout
    assert model.config.architectures == ["EsmForMaskedLM"] and not hasattr(model.config, "use_fa")
    ids = torch.tensor([[0, 5, 6, 7, 32, 9, 2]])
    with torch.no_grad():
        expected = load_pretrained(final, attention="faesm").eval()(input_ids=ids)["logits"]
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
