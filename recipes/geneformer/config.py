"""The run configuration: a typed schema (so unknown keys and wrong types are errors) filled by hydra_config/*.yaml.

The values live in the YAML files; the dataclasses below only say which keys exist and their types.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers.activations import ACT2FN

from batching import BATCHING_MODES
from biorecipes_shared.run import ConfigError, check_settings
from model import check_te_config, geneformer_config
from pretrained import merge_folder_config, read_folder_config

RECIPE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = RECIPE_DIR / "hydra_config"
DEFAULT_CONFIG = "l0_sanity"


# The shared ConfigError (a RunError), so `run_cli` prints it as one line like every other recipe's setting errors.
__all__ = ["ConfigError", "check_config", "config_from_argv", "load_config", "LR_SCHEDULES"]

# The transformers schedules that work as train.make_optimizer builds and steps them (warmup + total steps, step()
# without a metric); reduce_lr_on_plateau, cosine_with_min_lr and warmup_stable_decay need arguments never passed.
LR_SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


@dataclass
class ModelConfig:
    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    intermediate_size: int = MISSING
    hidden_act: str = MISSING
    hidden_dropout_prob: float = MISSING
    attention_probs_dropout_prob: float = MISSING
    max_position_embeddings: int = MISSING
    layer_norm_eps: float = MISSING
    initializer_range: float = MISSING
    vocab_size: int | None = None  # None: the number of lines of data.vocab_path
    use_te_layers: bool = MISSING
    # A Hugging Face BertForMaskedLM folder (config.json + weights) to start from; its config.json sets the
    # architecture, so the model.* sizes above must agree with it or stay at their defaults.
    init_from: str | None = None


@dataclass
class DataConfig:
    train_path: str = MISSING
    vocab_path: str = MISSING
    max_seq_length: int = MISSING
    micro_batch_size: int = MISSING
    mlm_probability: float = MISSING
    pad_to_multiple_of: int = MISSING
    # batching.BATCHING_MODES: random (padded to the longest of random cells), length_grouped (mega-batches of 50
    # micro-batches sorted by length, as the original pretraining), packed (cells back to back in rows of
    # max_seq_length, attention within each cell; micro_batch_size counts rows)
    batching: str = "length_grouped"


@dataclass
class TrainingConfig:
    num_train_steps: int = MISSING
    learning_rate: float = MISSING
    weight_decay: float = MISSING
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = MISSING
    lr_schedule: str = MISSING  # one of train.LR_SCHEDULES: linear, cosine, constant_with_warmup, ...
    grad_clip_norm: float = MISSING
    seed: int = MISSING
    bf16: bool = MISSING
    use_fp8: bool = MISSING
    fp8_backend: str = "auto"  # fp8.FP8_BACKENDS: auto (te if it imports, else torchao), te, torchao
    use_fsdp: bool = MISSING
    compile: bool = False  # torch.compile of each encoder layer (model.configure_layers)
    activation_checkpointing: bool = False  # recompute each encoder layer's activations in the backward
    fsdp_impl: str = MISSING  # torch (FSDP2 fully_shard) or megatron (megatron-fsdp, CUDA only)
    log_every_n_steps: int = MISSING
    save_every_n_steps: int = MISSING
    keep_last_k: int = MISSING
    output_dir: str = MISSING  # checkpoints/, final_model/, metrics.jsonl, loss.tsv, loss_curve.png, run_finished.json
    checkpoint_dir: str | None = None  # removed: always output_dir/checkpoints (a set value is a one-line error)
    # true/auto: newest valid checkpoint in output_dir/checkpoints, else a fresh start; false/none: fresh start (a
    # folder that already holds checkpoints is refused); a path: exactly that checkpoint.
    resume_from_checkpoint: Any = True
    wandb_init_args: dict[str, Any] = field(default_factory=dict)  # empty: no wandb


@dataclass
class GeneformerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


ConfigStore.instance().store(name="geneformer_schema", node=GeneformerConfig)

USAGE = """usage: train.py [--config-name NAME] [--cfg job|all] [key=value ...]

  --config-name NAME   one of hydra_config/*.yaml: l0_sanity (default), l0_sanity_v2, 10m, 106m, 4b, v2_104m, v2_316m
  --cfg job|all        print the composed configuration and exit
  -m, --multirun       a Hydra sweep: every job, one after another, in <training.output_dir>/<job number>/
  key=value            Hydra overrides, e.g. training.num_train_steps=100 model.use_te_layers=true
"""


def _one_line(error: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines and chain causes; keep the informative ones on one line."""
    parts, seen = [], set()
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            if (
                line
                and not line.startswith(("full_key:", "object_type=", "reference_type=", "To append"))
                and line not in seen
            ):
                parts.append(line)
                seen.add(line)
        error = error.__cause__
    return "; ".join(parts)


def parse_cli(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """Split Hydra-style arguments into (config name, --cfg value, overrides).

    Parsed here rather than by @hydra.main so errors are one line and torchrun workers make no output folders."""
    name, show, overrides = DEFAULT_CONFIG, None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            raise SystemExit(print(USAGE) or 0)
        if arg in ("--config-name", "-cn", "--cfg", "-c"):
            if not args:
                raise ConfigError(f"{arg} needs a value")
            value = args.pop(0)
        elif arg.startswith(("--config-name=", "--cfg=")):
            arg, value = arg.split("=", 1)
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r} (see --help)")
        else:
            overrides.append(arg)
            continue
        if arg in ("--config-name", "-cn"):
            name = value.removesuffix(".yaml")
        else:
            show = value
    return name, show, overrides


def load_config(config_name: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> DictConfig:
    """Compose hydra_config/<config_name>.yaml with overrides against the schema; raise ConfigError."""
    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "defaults")
        raise ConfigError(f"unknown config name {config_name!r} (known: {', '.join(known)})")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
        missing = OmegaConf.missing_keys(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from None
    if missing:
        raise ConfigError(f"config {config_name!r} leaves {sorted(missing)} unset")
    if cfg.model.init_from:
        folder = recipe_path(cfg.model.init_from)
        merge_folder_config(cfg.model, read_folder_config(folder), _explicit_model_keys(overrides or []), folder)
    return cfg


def recipe_path(path: str | Path) -> Path:
    """Relative paths in the config are relative to the recipe folder, wherever train.py is launched from."""
    return Path(path) if Path(path).is_absolute() else RECIPE_DIR / path


def _explicit_model_keys(overrides: list[str]) -> set[str]:
    """model.* keys set on the command line (`model.hidden_size=64`, `+model.x=…`, `++model.x=…`)."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("model."):
            keys.add(key.removeprefix("model."))
    return keys


def config_from_argv(argv: list[str] | None = None) -> DictConfig | None:
    """The config named on the command line; prints it and returns None for --cfg."""
    name, show, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(name, overrides)
    if show is not None:
        if show not in ("job", "all"):
            raise ConfigError(f"--cfg takes job or all, not {show!r}")
        print(OmegaConf.to_yaml(cfg), end="")
        return None
    return cfg


def _setting_checks(cfg: DictConfig) -> list[tuple[str, Any, str]]:
    model, data, training = cfg.model, cfg.data, cfg.training
    checks = [(f"training.{key}", training[key], "count") for key in _COUNTS]
    checks += [
        (f"data.{key}", data[key], "count") for key in ("micro_batch_size", "pad_to_multiple_of", "max_seq_length")
    ]
    checks += [
        ("training.learning_rate", training.learning_rate, "non_negative"),  # 0: a frozen run (e.g. export a start)
        ("training.weight_decay", training.weight_decay, "non_negative"),
        ("training.grad_clip_norm", training.grad_clip_norm, "positive"),
        ("training.warmup_steps", training.warmup_steps, "count0"),
        ("data.mlm_probability", data.mlm_probability, "open_fraction"),
        ("model.hidden_dropout_prob", model.hidden_dropout_prob, "unit_interval_right_open"),
        ("model.attention_probs_dropout_prob", model.attention_probs_dropout_prob, "unit_interval_right_open"),
        ("model.layer_norm_eps", model.layer_norm_eps, "positive"),
        ("model.initializer_range", model.initializer_range, "positive"),
    ]
    checks += [(f"model.{key}", model[key], "count") for key in _MODEL_COUNTS]
    checks += [
        (f"training.adam_betas[{i}]", beta, "unit_interval_right_open") for i, beta in enumerate(training.adam_betas)
    ]
    return checks


_COUNTS = ("num_train_steps", "log_every_n_steps", "save_every_n_steps", "keep_last_k")
_MODEL_COUNTS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def check_config(cfg: DictConfig) -> None:
    """Every setting check, in one place, before any output exists; raises ConfigError (one line).

    Ranges go through `biorecipes_shared.run.check_settings`; combinations that cannot run as asked follow."""
    model, data, training = cfg.model, cfg.data, cfg.training
    if training.checkpoint_dir is not None:
        raise ConfigError(
            f"training.checkpoint_dir={training.checkpoint_dir!r} is no longer used: checkpoints always go to "
            "training.output_dir/checkpoints; set training.output_dir instead"
        )
    if len(training.adam_betas) != 2:
        raise ConfigError(f"training.adam_betas={list(training.adam_betas)} must be two values in [0, 1)")
    check_settings(_setting_checks(cfg))
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(f"model.hidden_size={model.hidden_size} is not divisible by num_attention_heads")
    if data.max_seq_length > model.max_position_embeddings:
        raise ConfigError(f"data.max_seq_length={data.max_seq_length} > model.max_position_embeddings")
    if model.hidden_act not in ACT2FN:
        raise ConfigError(f"model.hidden_act={model.hidden_act!r} is unknown (e.g. relu, gelu, gelu_new)")
    _check_schedule(training)
    _check_parallelism(model, training)
    _check_batching(model, data)
    from fp8 import fp8_backend  # fp8.py imports this module (ConfigError): import it here, not at the top

    fp8_backend(cfg)  # te or torchao; ConfigError when FP8 cannot run here


def _check_schedule(training: DictConfig) -> None:
    if training.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"training.lr_schedule={training.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    if training.lr_schedule == "constant" and training.warmup_steps:
        raise ConfigError("training.lr_schedule=constant ignores warmup_steps; use constant_with_warmup")
    if training.wandb_init_args:
        try:  # MetricsWriter imports wandb only after it has created output_dir: check first
            importlib.import_module("wandb")
        except ImportError as error:
            raise ConfigError(f"training.wandb_init_args is set but wandb does not import ({error})") from None


def _check_batching(model: DictConfig, data: DictConfig) -> None:
    if data.batching not in BATCHING_MODES:
        raise ConfigError(f"data.batching={data.batching!r}: use one of {', '.join(BATCHING_MODES)}")
    if data.batching == "packed" and model.use_te_layers:
        # TE's padding mask cannot say which cell a token belongs to (its THD format would; not wired yet)
        raise ConfigError(
            "data.batching=packed needs the plain layers: set model.use_te_layers=false or another batching"
        )


def _check_parallelism(model: DictConfig, training: DictConfig) -> None:
    if training.fsdp_impl not in ("torch", "megatron"):
        raise ConfigError(f"training.fsdp_impl={training.fsdp_impl!r}: use torch or megatron")
    if training.fsdp_impl == "megatron" and not training.use_fsdp:
        raise ConfigError("training.fsdp_impl=megatron needs training.use_fsdp=true")
    if model.use_te_layers:
        try:
            check_te_config(geneformer_config(2, use_te_layers=True, hidden_act=model.hidden_act))
        except ValueError as error:
            raise ConfigError(str(error)) from None
