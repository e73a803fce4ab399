"""The training settings: `Config`, the typed schema (every field is a `--field value` flag, a YAML key and a
`field=value` override of the same name), `load` (defaults < `--config FILE` < flags and overrides, in the order
given) and every check of them in `validate`, run before anything is read or written.

    python train.py --config configs/sample.yaml --output_dir outputs/run --n_epochs 3 learning_rate=1e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from biorecipes_shared import ConfigError, check_settings, load_config
from data import parse_distribution

# Deprecated names (flags, YAML keys, overrides) -> today's; each use prints a one-line note.
RENAMED = {"keep_checkpoints": "keep_last", "save_every_steps": "save_every"}


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
    keep_last: int = 3  # newest N checkpoints (and dna_model/ epoch files) kept; 0 keeps all
    save_every: int = 0  # also save mid-epoch every N steps (0: at epoch ends and on SIGTERM/SIGUSR1 only)
    wandb: bool = False
    wandb_project: str = "plant_lm"
    num_threads: int = 0  # torch CPU threads; 0 = torch default
    # execution switches (results unchanged; checkpoints interchangeable between on and off)
    # torch.compile each transformer block. Off by default: on CPU 1.5x faster per step but ~2 min of compilation at
    # every start, which short runs (the sample, tests) never earn back (BENCHMARKS.md)
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block in backward: less activation memory, more time

    @property
    def max_steps(self) -> int:
        """The optimizer step the run ends at: n_epochs x steps_per_epoch (computed here only)."""
        return self.n_epochs * self.steps_per_epoch


def build_parser() -> argparse.ArgumentParser:
    """`--config FILE`, one `--field VALUE` flag per Config field (and per deprecated name), `field=value` overrides.
    No flag has a default: the defaults are the dataclass's."""
    parser = argparse.ArgumentParser(
        description="Train the plant DNA language model (python train.py --help lists every setting).",
        epilog="species_distribution is written name=weight,name=weight ('' weights every species folder equally).",
    )
    parser.add_argument("--config", type=Path, help="YAML file of settings (e.g. configs/sample.yaml)")
    for name, default in dataclasses.asdict(Config()).items():
        shown = ",".join(f"{k}={v}" for k, v in default.items()) if isinstance(default, dict) else default
        parser.add_argument(f"--{name}", metavar="VALUE", default=argparse.SUPPRESS, help=f"default: {shown}")
    for old, new in RENAMED.items():
        parser.add_argument(f"--{old}", metavar="VALUE", default=argparse.SUPPRESS, help=f"old name of --{new}")
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="settings as dotted overrides")
    return parser


def load(argv: list[str] | None = None) -> Config:
    """The Config of a command line; ConfigError (one line) for an unknown setting, a wrong type or a bad file."""
    args = vars(build_parser().parse_intermixed_args(argv))
    config_file, positional = args.pop("config", None), args.pop("overrides")
    overrides = [flag_override(name, value) for name, value in args.items()]
    for item in positional:
        key, _, value = item.partition("=")
        seed_form = key.strip() == "species_distribution" and not value.strip().startswith("{")
        overrides.append(distribution_override(value) if seed_form else item)
    return load_config(Config, config_file, overrides, renamed=RENAMED)


def flag_override(name: str, value: str) -> str:
    """`--name value` as the override `name=value`, quoted for YAML so that `--init_from ""` stays a string and
    `--resume none` stays 'none'."""
    if name == "species_distribution":
        return distribution_override(value)
    return f"{name}='{value.replace(chr(39), chr(39) * 2)}'"


def distribution_override(text: str) -> str:
    """The seed's `name=weight,name=weight` ('' = every species folder alike) as a YAML mapping override."""
    weights = parse_distribution(text)
    return "species_distribution={" + ", ".join(f"'{name}': {weight!r}" for name, weight in weights.items()) + "}"


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `setting` on `device` (None: full fp32)."""
    if setting not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError(f"--amp must be auto, bf16, fp16 or off, not {setting!r}")
    if device.type != "cuda" or setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


# (flag, rule) for biorecipes_shared.check_settings: counts must be >= 1 (0 divides by zero or trains nothing).
SETTING_RULES = (
    *((name, "count") for name in (
        "d_model", "n_heads", "n_layers", "local_attn_window", "global_context", "memory_normalize_every",
        "batch_size", "accumulation_steps", "n_epochs", "steps_per_epoch", "context_size", "chunk_size",
    )),
    *((name, "count0") for name in ("warmup_steps", "keep_last", "save_every", "num_threads")),
    ("learning_rate", "non_negative"),  # 0 is a frozen run (e.g. to check that an --init_from export round-trips)
    ("weight_decay", "non_negative"),
    ("grad_clip", "positive"),
    ("dropout", "unit_interval_right_open"),
    ("overlap_ratio", "unit_interval_right_open"),
    ("default_species_weight", "non_negative"),
)  # fmt: skip


def validate(cfg: Config) -> None:
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
