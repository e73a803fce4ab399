"""Settings: flags, YAML and overrides into one Config, the old names, the schedule, and every impossible setting as
one line before any output."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from conftest import RECIPE_DIR, assert_startup_error

from biorecipes_shared import ConfigError
from config import Config, load
from run_state import warmup_cosine


@pytest.mark.smoke
def test_load_reads_flags_yaml_and_overrides_and_accepts_the_old_names(tmp_path, capsys):
    cfg = load(["--batch_size", "8", "--learning_rate", "3e-4", "--wandb", "true", "--init_from", "",
                "--species_distribution", "zea_mays=0.6,glycine_max=1"])  # fmt: skip
    assert cfg.batch_size == 8 and cfg.learning_rate == 3e-4 and cfg.wandb is True and cfg.init_from == ""
    assert cfg.species_distribution == {"zea_mays": 0.6, "glycine_max": 1.0}  # replaces the default mapping
    defaults = load([])
    assert (defaults.d_model, defaults.n_heads, defaults.n_layers, defaults.context_size, defaults.chunk_size) == (
        512, 8, 6, 64, 1_200_000,
    )  # fmt: skip
    assert defaults == Config() and defaults.max_steps == 10 * 1000
    sample = load(["--config", str(RECIPE_DIR / "configs/sample.yaml"), "n_epochs=3", "--resume", "none"])
    assert sample.species_distribution == {"arabidopsis_thaliana": 1.0, "arabidopsis_lyrata": 0.8,
                                           "arabidopsis_arenosa": 0.6}  # fmt: skip
    assert (sample.d_model, sample.n_epochs, sample.max_steps, sample.resume) == (128, 3, 300, "none")
    capsys.readouterr()
    old = load(["--keep_checkpoints", "5", "save_every_steps=2"])
    assert (old.keep_last, old.save_every) == (5, 2)
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [
        "note: command line: 'keep_checkpoints' is now called 'keep_last'; the old name still works for now",
        "note: command line: 'save_every_steps' is now called 'save_every'; the old name still works for now",
    ]
    with pytest.raises(ConfigError, match="batch_size"):
        load(["--batch_size", "many"])
    with pytest.raises(ConfigError, match="n_epoch"):
        load(["n_epoch=3"])


def test_the_schedule_is_the_seeds_warmup_cosine():
    """torch's LinearLR + CosineAnnealingLR give the seed's closed formula: (step + 1) / warmup during warm-up,
    then 0.1 + 0.9 * (1 + cos(pi * progress)) / 2 of the peak."""

    def seed_factor(step: int, warmup: int, total: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    for warmup, total in [(20, 200), (1, 10), (0, 10), (5, 3), (100, 1000)]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        scheduler = warmup_cosine(optimizer, warmup, total)
        optimizer.step()  # the schedule does not depend on the updates; one step keeps torch's order check quiet
        lrs = []
        for _ in range(total + 1):
            lrs.append(scheduler.get_last_lr()[0])
            scheduler.step()
        assert lrs == pytest.approx([2e-3 * seed_factor(step, warmup, total) for step in range(total + 1)], rel=1e-6)


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
