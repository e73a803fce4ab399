"""The training settings: one typed dataclass built from the original's command-line flags, checked in one place.

Every flag check lives in `check_config` (through `biorecipes_shared.run.check_settings`), so a bad value is one
`error:` line before any data is read or any output folder exists.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from biorecipes_shared.run import ConfigError, RunLayout, check_settings

DESCRIPTION = """Train OmniBioTA with masked-language modelling on encoded DNA/RNA/protein tokens.

    torchrun --nnodes=1 --nproc_per_node=4 train_encoder.py --base_dir data/encoded --save_name omni_small \\
        --n_layer 12 --n_head 12 --n_embd 768 --ctx_len 1024 --mini_batch_size 16 --batch_size 1024 \\
        --lr 0.01 --token_budget 10_000_000_000

Outputs go to <out_dir>/<save_name>/: checkpoints/step_XXXXXXXX (the same command resumes from the newest valid one),
metrics.jsonl, log_file.txt, loss_curve.png, final_model/ (config.json, model.safetensors, tokenizer.model) and
run_finished.json once the run is over.
"""

# Settings that fix the data stream and the step plan: a resumed run must share them with its checkpoint.
PLAN_FIELDS = (
    "batch_size",
    "mini_batch_size",
    "token_budget",
    "ramp_fraction",
    "warmup_fraction",
    "seed",
    "source_weights",
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """All settings of one training run (flag names and meanings of the original train_encoder.py, plus ours)."""

    base_dir: Path
    mini_batch_size: int = 16
    batch_size: int = 1024
    n_head: int = 12
    n_embd: int = 768
    n_layer: int = 12
    ctx_len: int = 1024
    dropout: float = 0.0
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.98
    epsilon: float = 1e-8
    weight_decay: float = 0.01
    token_budget: float = 1e9
    test_freq: float = 1e7
    save_freq: float = 1e8
    save_name: str = "omnibiota"
    disable_flash: bool = False
    wandb_project_name: str | None = None
    force_lr: bool = False
    # additions of this recipe
    tokenizer: Path | None = None
    out_dir: Path = Path("runs")
    ramp_fraction: float = 0.05
    warmup_fraction: float = 0.0
    grad_clip: float = 1.0
    source_weights: str | None = None
    val_batches: int = 8
    log_freq: int = 10
    seed: int = 0
    max_steps: int | None = None
    resume: str = "auto"
    init_from: Path | None = None
    keep_last_k: int = 2
    compile: bool = False
    activation_checkpointing: bool = False

    @property
    def layout(self) -> RunLayout:
        return RunLayout(Path(self.out_dir) / self.save_name)

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.base_dir) / "tokenizer.model"

    def plan_settings(self) -> dict:
        return {name: getattr(self, name) for name in PLAN_FIELDS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the flags of the original train_encoder.py, same names and meanings
    p.add_argument("--mini_batch_size", type=int, default=16, help="sequences per rank per micro-step")
    p.add_argument("--batch_size", type=int, default=1024, help="global batch in sequences (after the ramp)")
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--ctx_len", type=int, default=1024, help="tokens per row; at most the smallest source's tokens")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument(
        "--lr", type=float, default=1e-2, help="muP base LR, scaled by sqrt(batch_size)/32 unless --force_lr"
    )
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--epsilon", type=float, default=1e-8)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--token_budget", type=float, default=1e9, help="tokens to train on, ramp included (approx.)")
    p.add_argument("--test_freq", type=float, default=1e7, help="validate every this many tokens (0: at the end)")
    p.add_argument("--save_freq", type=float, default=1e8, help="checkpoint every this many tokens (0: at the end)")
    p.add_argument("--save_name", default="omnibiota", help="run name: outputs go to <out_dir>/<save_name>")
    p.add_argument("--disable_flash", action="store_true", help="use the plain math attention path")
    p.add_argument("--wandb_project_name", default=None, help="log to this wandb project (off when unset)")
    p.add_argument("--base_dir", type=Path, required=True, help="encoded data: train/, val/ and tokenizer.model")
    p.add_argument("--force_lr", action="store_true", help="use --lr as given, without the batch-size scaling")
    # additions of this recipe
    p.add_argument(
        "--tokenizer", type=Path, default=None, help="sentencepiece model (default: <base_dir>/tokenizer.model)"
    )
    p.add_argument("--out_dir", type=Path, default=Path("runs"), help="parent folder of the run folder")
    p.add_argument("--ramp_fraction", type=float, default=0.05, help="share of steps over which the batch grows")
    p.add_argument("--warmup_fraction", type=float, default=0.0, help="share of steps of linear LR warmup")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--source_weights", default=None, help="e.g. genbank=0.8,uniprot=0.2 (default: by token count)")
    p.add_argument("--val_batches", type=int, default=8, help="mini-batches per rank in each validation")
    p.add_argument("--log_freq", type=int, default=10, help="log the training loss every this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many steps (final model written)")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (default): newest valid checkpoint of the run folder, else a fresh start; none: fresh start"
        " (refused when checkpoints exist); or a checkpoint folder",
    )
    p.add_argument("--init_from", type=Path, default=None, help="final_model/ folder whose weights start a fresh run")
    p.add_argument("--keep_last_k", type=int, default=2, help="checkpoints kept (older ones are removed)")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile each transformer block (off: slower on CPU, BENCHMARKS)"
    )
    p.add_argument(
        "--activation_checkpointing",
        action="store_true",
        help="recompute each block's activations in backward: less memory, about a third more compute",
    )
    return p


def parse_config(argv=None) -> TrainConfig:
    """Flags → a checked TrainConfig; raises ConfigError (one line) for any impossible value."""
    args = build_parser().parse_args(argv)
    config = TrainConfig(**vars(args))
    check_config(config)
    return config


def check_config(config: TrainConfig) -> None:
    """Every check of the flags alone (the data-dependent ones follow once the data is open), in one place."""
    c = config
    check_settings(
        [
            ("--mini_batch_size", c.mini_batch_size, "count"),
            ("--batch_size", c.batch_size, "count"),
            ("--n_head", c.n_head, "count"),
            ("--n_embd", c.n_embd, "count"),
            ("--n_layer", c.n_layer, "count"),
            ("--ctx_len", c.ctx_len, "count"),
            ("--val_batches", c.val_batches, "count"),
            ("--log_freq", c.log_freq, "count"),
            ("--keep_last_k", c.keep_last_k, "count"),
            ("--token_budget", c.token_budget, "positive"),
            ("--lr", c.lr, "non_negative"),  # 0 freezes the weights (a check of --init_from)
            ("--epsilon", c.epsilon, "non_negative"),
            ("--weight_decay", c.weight_decay, "non_negative"),
            ("--grad_clip", c.grad_clip, "non_negative"),
            ("--test_freq", c.test_freq, "non_negative"),
            ("--save_freq", c.save_freq, "non_negative"),
            ("--dropout", c.dropout, "unit_interval_right_open"),
            ("--beta1", c.beta1, "unit_interval_right_open"),
            ("--beta2", c.beta2, "unit_interval_right_open"),
            ("--ramp_fraction", c.ramp_fraction, "unit_interval_right_open"),
            ("--warmup_fraction", c.warmup_fraction, "unit_interval_right_open"),
            ("--seed", c.seed, "count0"),
        ]
    )
    if c.max_steps is not None:
        check_settings([("--max_steps", c.max_steps, "count")])
    if c.ctx_len < 2:  # a window needs its modality token and at least one residue to mask
        raise ConfigError(f"--ctx_len={c.ctx_len} must be at least 2")
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
        raise ConfigError(f"--n_embd {c.n_embd} must split into {c.n_head} heads of even size (rotary)")
    if c.batch_size % c.mini_batch_size:
        raise ConfigError(f"--batch_size {c.batch_size} must be a multiple of --mini_batch_size {c.mini_batch_size}")
    if not c.save_name or Path(c.save_name).name != c.save_name:
        raise ConfigError(f"--save_name {c.save_name!r} must be a plain folder name")
    if c.init_from is not None and not (Path(c.init_from) / "model.safetensors").is_file():
        raise ConfigError(f"--init_from {c.init_from}: no model.safetensors there (give a final_model/ folder)")


def check_world_size(config: TrainConfig, world_size: int) -> None:
    """The global batch must split evenly over the ranks' micro-batches (after the ramp)."""
    per_micro_step = config.mini_batch_size * world_size
    if config.batch_size % per_micro_step:
        raise ConfigError(
            f"--batch_size {config.batch_size} must be a positive multiple of world size {world_size} x"
            f" --mini_batch_size {config.mini_batch_size} = {per_micro_step}"
        )
