"""The training settings: `Config` (every field is a command-line flag of the same name) and every check of them,
in one place (`check_config`), run before anything is read or written."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass, field

import torch

from biorecipes_shared.run import ConfigError, check_settings
from data import parse_distribution


class TrainingSetupError(ConfigError):
    """A setting that cannot work on this machine (message names the flag)."""


@dataclass
class Config:
    # data
    data_dir: str = "data"
    species_distribution: dict[str, float] = field(
        default_factory=lambda: {
            "glycine_max": 1.0,
            "arabidopsis": 0.8,
            "oryza_sativa": 0.7,
            "zea_mays": 0.6,
            "vitis_vinifera": 0.5,
        }
    )
    default_species_weight: float = 0.5  # for species on disk that species_distribution does not name
    context_size: int = 64  # tokens (6-mers) per training window
    overlap_ratio: float = 0.5
    chunk_size: int = 1_200_000  # bp per streamed chunk of a chromosome
    # model
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 6
    dropout: float = 0.1
    local_attn_window: int = 32
    global_context: int = 200_000  # forgetting horizon of the bucket memory, in written tokens
    memory_normalize_every: int = 1000  # optimizer steps
    # optimisation
    batch_size: int = 16  # per rank and micro-step
    accumulation_steps: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    n_epochs: int = 10
    steps_per_epoch: int = 1000  # optimizer steps; streams are endless, so an epoch is a fixed step count
    amp: str = "auto"  # auto (bf16 on a GPU that has it, else fp16; off on CPU) | bf16 | fp16 | off
    seed: int = 42
    # outputs
    output_dir: str = "."
    resume: str = "auto"  # auto (newest valid checkpoints/step_N, else fresh) | none | a checkpoint path
    init_from: str = ""  # a final_model/ export of this recipe to start from (same species and model shape)
    keep_checkpoints: int = 3  # newest N checkpoints (and dna_model/ epoch files) kept; 0 keeps all
    save_every_steps: int = 0  # also save mid-epoch every N steps (0: at epoch ends and on SIGTERM/SIGUSR1 only)
    wandb: bool = False
    wandb_project: str = "plant_lm"
    num_threads: int = 0  # torch CPU threads; 0 = torch default
    # execution switches (results unchanged; checkpoints interchangeable between on and off)
    # torch.compile each transformer block. Off by default: on CPU 1.5x faster per step but ~2 min of compilation at
    # every start, which short runs (the sample, tests) never earn back (BENCHMARKS.md)
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block in backward: less activation memory, more time


def parse_config(argv: list[str] | None = None) -> Config:
    """Build a Config from `--field value` flags (dict fields as name=weight,name=weight)."""
    parser = argparse.ArgumentParser(
        description="Train the plant DNA language model (python train.py --help lists every flag)."
    )
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            kind = lambda text: text.lower() in ("1", "true", "yes", "on")  # noqa: E731
        elif isinstance(default, dict):
            kind = parse_distribution
        else:
            kind = type(default)
        parser.add_argument(f"--{f.name}", type=kind, default=default, metavar=type(default).__name__.upper())
    return Config(**vars(parser.parse_args(argv)))


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `setting` on `device` (None: full fp32)."""
    if setting not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError(f"--amp must be auto, bf16, fp16 or off, not {setting!r}")
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


# (flag, rule) for biorecipes_shared.run.check_settings: counts must be >= 1 (0 divides by zero or trains nothing).
SETTING_RULES = (
    *((name, "count") for name in (
        "d_model", "n_heads", "n_layers", "local_attn_window", "global_context", "memory_normalize_every",
        "batch_size", "accumulation_steps", "n_epochs", "steps_per_epoch", "context_size", "chunk_size",
    )),
    *((name, "count0") for name in ("warmup_steps", "keep_checkpoints", "save_every_steps", "num_threads")),
    ("learning_rate", "non_negative"),  # 0 is a frozen run (e.g. to check that an --init_from export round-trips)
    ("weight_decay", "non_negative"),
    ("grad_clip", "positive"),
    ("dropout", "unit_interval_right_open"),
    ("overlap_ratio", "unit_interval_right_open"),
    ("default_species_weight", "non_negative"),
)  # fmt: skip


def check_config(cfg: Config) -> None:
    """Every settings check, before anything is read or written; ConfigError (one line naming the flag)."""
    check_settings((f"--{name}", getattr(cfg, name), rule) for name, rule in SETTING_RULES)
    check_settings(
        (f"--species_distribution {name}", w, "non_negative") for name, w in cfg.species_distribution.items()
    )
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(f"--d_model {cfg.d_model} must be divisible by --n_heads {cfg.n_heads}")
    amp_dtype(cfg.amp, torch.device("cpu"))  # checks the choice
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise TrainingSetupError("--wandb true needs the wandb package: pip install wandb")
