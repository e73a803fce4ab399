"""Load `config.yaml` (or another YAML) into typed sections; unknown or mistyped keys fail loudly.

`get_model_config()` reads src/config.yaml; `get_training_config("my.yaml", ["training.max_steps=10"])` reads
another file with a dot-list override; `load_config(...)` returns all three sections at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from biorecipes_shared.run import ConfigError as SharedConfigError
from biorecipes_shared.run import check_settings

DEFAULT_CONFIG = Path(__file__).with_name("config.yaml")


class ConfigError(SharedConfigError):
    """The config file or an override is invalid (a ValueError; `run_cli` prints it as one line)."""


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
    save_steps: int = 1000
    logging_steps: int = 100
    save_total_limit: int = 3
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    load_best_model_at_end: bool = True
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool = False
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 42
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


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Merge the YAML file and `section.key=value` overrides onto the typed defaults and validate them."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(RecipeConfig), OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides))
        )
        cfg: RecipeConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {err}".splitlines()[0]) from err
    _validate(cfg, path)
    return cfg


REPORT_TO_CHOICES = ("none", "wandb", "tensorboard")
MIXED_PRECISION_CHOICES = ("bf16", "fp16", "no")
METRIC_CHOICES = ("eval_loss", "loss", "eval_perplexity", "perplexity")  # "loss" means eval_loss (as in HF)
COMPILE_SCOPES = ("blocks", "model")


def setting_checks(cfg: RecipeConfig) -> list[tuple[str, object, str]]:
    """Every numeric setting with its rule (biorecipes_shared.run.check_settings): the one list of range checks.

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
        ("training.save_steps", t.save_steps, "count"),
        ("training.logging_steps", t.logging_steps, "count"),
        ("training.save_total_limit", t.save_total_limit, "count0"),
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


def _validate(cfg: RecipeConfig, path: Path) -> None:
    """All settings checks, in one place, before anything is written."""
    try:
        check_settings(setting_checks(cfg))
    except SharedConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    t = cfg.training
    if t.report_to not in REPORT_TO_CHOICES:
        raise ConfigError(
            f"{path}: training.report_to must be one of {', '.join(REPORT_TO_CHOICES)}, got {t.report_to!r}"
        )
    if t.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ConfigError(f"{path}: training.mixed_precision must be bf16, fp16 or no, got {t.mixed_precision!r}")
    if t.metric_for_best_model not in METRIC_CHOICES:  # else a KeyError at the first evaluation
        raise ConfigError(
            f"{path}: training.metric_for_best_model must be one of {', '.join(METRIC_CHOICES)}, "
            f"got {t.metric_for_best_model!r}"
        )
    if t.compile_scope not in COMPILE_SCOPES:
        raise ConfigError(f"{path}: training.compile_scope must be blocks or model, got {t.compile_scope!r}")
    if t.early_stopping.enabled and not t.load_best_model_at_end:
        raise ConfigError(f"{path}: training.early_stopping needs training.load_best_model_at_end: true")
    if t.load_best_model_at_end and t.save_steps % t.eval_steps:
        raise ConfigError(f"{path}: training.save_steps must be a multiple of eval_steps for load_best_model_at_end")
    if t.warmup_steps > t.schedule_steps:
        raise ConfigError(f"{path}: training.warmup_steps must not exceed schedule_steps")


def get_model_config(path: str | Path | None = None, overrides=()) -> ModelConfig:
    """The `model` section."""
    return load_config(path, overrides).model


def get_training_config(path: str | Path | None = None, overrides=()) -> TrainingConfig:
    """The `training` section."""
    return load_config(path, overrides).training


def get_data_config(path: str | Path | None = None, overrides=()) -> DataConfig:
    """The `data` section."""
    return load_config(path, overrides).data
