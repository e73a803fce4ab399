"""The recipe's settings: a typed schema (the dataclasses below, defaults written once), filled from a YAML file
(src/config.yaml unless --config names another) and `section.key=value` overrides by the shared loader, then
checked in `validate()`.

    cfg = load("src/config_tiny_cpu.yaml", ["training.max_steps=10"])

Every problem is one ConfigError line. The HF TrainingArguments names of the original still work, with a one-line
note: training.save_steps -> save_every, save_total_limit -> keep_last, resume_from_checkpoint -> resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from biorecipes_shared import ConfigError, check_settings, load_config

__all__ = ["ConfigError", "RecipeConfig", "load", "validate"]

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")
RENAMED = {
    "training.save_steps": "training.save_every",
    "training.save_total_limit": "training.keep_last",
    "training.resume_from_checkpoint": "training.resume",
}


@dataclass
class ModelConfig:
    model_name: str = "esm2_t6_8M"  # ESM-2 size name (see model.ESM2_SIZES) or a local checkpoint dir
    max_position_embeddings: int = 1026  # incl. <cls>/<eos>; must match the architecture
    max_batch_size: int = 16384  # token budget per batch (rows x longest row): preprocessing packs to it, train checks
    # auto (flash_attention_2 where flash-attn imports on CUDA, else sdpa) | sdpa | flash_attention_2 |
    # flex_attention (no backward on CPU) | eager: transformers' EsmForMaskedLM; faesm: its own environment
    attention: str = "auto"
    hidden_dropout_prob: float | None = None  # None keeps the architecture's value (0.0 for ESM-2)
    attention_probs_dropout_prob: float | None = None  # > 0 not with attention: faesm (it ignores it)


@dataclass
class OptimizerConfig:
    fused: bool | None = None  # None: fused AdamW when this torch supports it on the device; false forces unfused
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8


@dataclass
class EarlyStoppingConfig:
    enabled: bool = True
    patience: int = 5  # evaluations without improvement
    threshold: float = 0.0


@dataclass
class TrainingConfig:
    output_dir: str = "outputs/esm2"
    learning_rate: float = 4e-4
    gradient_accumulation_steps: int = 64
    mlm_probability: float = 0.2
    warmup_steps: int = 2000  # linear 0 -> 1
    schedule_steps: int = 500_000  # cosine 1.0 -> 0.1 ends here, then flat 0.1
    max_steps: int = 500_000
    mixed_precision: str = "bf16"  # bf16 | fp16 | no
    gradient_clipping: float = 1.0  # -> max_grad_norm
    eval_steps: int = 1000
    save_every: int = 1000  # checkpoint interval in steps (was save_steps)
    logging_steps: int = 100
    keep_last: int = 3  # newest checkpoints kept, plus the best one; 0 keeps all (was save_total_limit)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    load_best_model_at_end: bool = True
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 42
    # auto (latest = auto): newest complete checkpoint, else a fresh start; none: fresh start (refused when
    # checkpoints exist); or a checkpoints/step_N dir (was --resume_from_checkpoint)
    resume: str = "auto"
    report_to: str = "none"  # none | wandb | tensorboard (the package must be installed)
    compile: bool = False  # torch.compile (off by default: see BENCHMARKS.md for the CPU figure)
    compile_scope: str = "blocks"  # blocks: each transformer layer; model: the whole EsmForMaskedLM
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward pass


@dataclass
class DataConfig:
    train_dir: str | None = None  # dir of shard-XXXXX/ datasets from data_processing.py
    val_dir: str | None = None
    num_workers: int = 2  # DataLoader workers per rank; needs num_shards >= world_size * max(1, num_workers)


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """The YAML file (default src/config.yaml) and `section.key=value` overrides on the typed defaults, validated."""
    cfg = load_config(RecipeConfig, path or DEFAULT_CONFIG, list(overrides), renamed=RENAMED)
    validate(cfg)
    return cfg


REPORT_TO_CHOICES = ("none", "wandb", "tensorboard")
MIXED_PRECISION_CHOICES = ("bf16", "fp16", "no")
METRIC_CHOICES = ("eval_loss", "loss", "eval_perplexity", "perplexity")  # "loss" means eval_loss (as in HF)
COMPILE_SCOPES = ("blocks", "model")


def setting_checks(cfg: RecipeConfig) -> list[tuple[str, object, str]]:
    """Every numeric setting with its rule (biorecipes_shared.check_settings): the one list of range checks.

    A 0, negative or non-finite value would otherwise surface deep inside the loop as a traceback, after the output
    folder exists.
    """
    m, t, d = cfg.model, cfg.training, cfg.data
    o, e = t.optimizer, t.early_stopping
    checks = [
        ("model.max_position_embeddings", m.max_position_embeddings, "count"),
        ("model.max_batch_size", m.max_batch_size, "count"),
        ("training.learning_rate", t.learning_rate, "positive"),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps, "count"),
        ("training.mlm_probability", t.mlm_probability, "open_fraction"),
        ("training.warmup_steps", t.warmup_steps, "count0"),
        ("training.schedule_steps", t.schedule_steps, "count"),
        ("training.max_steps", t.max_steps, "count"),
        ("training.gradient_clipping", t.gradient_clipping, "positive"),
        ("training.eval_steps", t.eval_steps, "count"),
        ("training.save_every", t.save_every, "count"),
        ("training.logging_steps", t.logging_steps, "count"),
        ("training.keep_last", t.keep_last, "count0"),
        ("training.early_stopping.patience", e.patience, "count"),
        ("training.early_stopping.threshold", e.threshold, "non_negative"),
        ("training.optimizer.weight_decay", o.weight_decay, "non_negative"),
        ("training.optimizer.adam_beta1", o.adam_beta1, "unit_interval_right_open"),
        ("training.optimizer.adam_beta2", o.adam_beta2, "unit_interval_right_open"),
        ("training.optimizer.adam_epsilon", o.adam_epsilon, "positive"),
        ("training.seed", t.seed, "count0"),
        ("data.num_workers", d.num_workers, "count0"),
    ]
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if getattr(m, key) is not None:
            checks.append((f"model.{key}", getattr(m, key), "unit_interval_right_open"))
    return checks


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError naming the setting and its allowed values when `value` is not one of them."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def validate(cfg: RecipeConfig) -> None:
    """All settings checks, in one place, before anything is written; raises ConfigError (one line)."""
    check_settings(setting_checks(cfg))
    t = cfg.training
    check_choice("training.report_to", t.report_to, REPORT_TO_CHOICES)
    check_choice("training.mixed_precision", t.mixed_precision, MIXED_PRECISION_CHOICES)
    check_choice("training.metric_for_best_model", t.metric_for_best_model, METRIC_CHOICES)  # else a KeyError later
    check_choice("training.compile_scope", t.compile_scope, COMPILE_SCOPES)
    if t.early_stopping.enabled and not t.load_best_model_at_end:
        raise ConfigError("training.early_stopping needs training.load_best_model_at_end: true")
    if t.load_best_model_at_end and t.save_every % t.eval_steps:
        raise ConfigError("training.save_every must be a multiple of eval_steps for load_best_model_at_end")
    if t.warmup_steps > t.schedule_steps:
        raise ConfigError("training.warmup_steps must not exceed schedule_steps")
    check_report_to(t.report_to)


def check_report_to(report_to: str) -> None:
    """The logging integration must import now, not after the output dir exists."""
    if report_to == "none":  # nothing to import (transformers.integrations alone takes seconds)
        return
    from transformers.integrations import is_tensorboard_available, is_wandb_available

    available = {"none": True, "wandb": is_wandb_available(), "tensorboard": is_tensorboard_available()}
    if not available[report_to]:
        raise ConfigError(
            f"training.report_to={report_to} needs the {report_to} package; install it or set training.report_to=none"
        )
