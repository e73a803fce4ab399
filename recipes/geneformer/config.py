"""The run configuration: a typed schema whose defaults are the 10m model on the bundled sample, the named
configs/*.yaml that change what differs, and `validate`, every setting check in one place.

Hydra stays the command line (`--config-name 106m`, `key=value` overrides, `-m` sweeps): the schema is registered in
its ConfigStore, so an unknown key or a wrong type is an error, and the composed DictConfig becomes a
`GeneformerConfig` dataclass (`OmegaConf.to_object`) before the recipe reads it.
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
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from transformers.activations import ACT2FN

from batching import BATCHING_MODES
from biorecipes_shared import ConfigError, check_settings, rename_overrides
from fp8 import fp8_backend
from model import check_te_config, geneformer_config
from pretrained import merge_folder_config, read_folder_config

RECIPE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = RECIPE_DIR / "configs"
DEFAULT_CONFIG = "l0_sanity"
# Deprecated override names (one-line note each); the same meaning has the same name in every recipe.
RENAMED = {
    "training.num_train_steps": "training.max_steps",
    "training.save_every_n_steps": "training.save_every",
    "training.keep_last_k": "training.keep_last",
    "training.resume_from_checkpoint": "training.resume",
}

__all__ = ["ConfigError", "GeneformerConfig", "LR_SCHEDULES", "config_from_argv", "load_config", "validate"]

# The transformers schedules that work as run_state.make_optimizer builds and steps them (warmup + total steps,
# step() without a metric); reduce_lr_on_plateau, cosine_with_min_lr and warmup_stable_decay need arguments never
# passed.
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                "inverse_sqrt")  # fmt: skip


@dataclass
class ModelConfig:
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"  # Geneformer uses ReLU; the TE path also takes gelu_pytorch_tanh / gelu_new
    hidden_dropout_prob: float = 0.02
    attention_probs_dropout_prob: float = 0.02
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1.0e-12
    initializer_range: float = 0.02
    vocab_size: int | None = None  # None: the number of lines of data.vocab_path
    use_te_layers: bool = False  # Transformer Engine layers (CUDA), needed for FP8 with the te backend
    # A Hugging Face BertForMaskedLM folder (config.json + weights) to start from; its config.json sets the
    # architecture, so the model.* sizes above must agree with it or stay at their defaults.
    init_from: str | None = None


@dataclass
class DataConfig:
    train_path: str = "sample_data/cells.parquet"  # relative paths are relative to the recipe folder
    vocab_path: str = "sample_data/vocab.txt"
    max_seq_length: int = 2048
    micro_batch_size: int = 10
    mlm_probability: float = 0.15
    pad_to_multiple_of: int = 16  # FP8 GEMMs need token counts divisible by 16
    # batching.BATCHING_MODES: random (padded to the longest of random cells), length_grouped (mega-batches of 50
    # micro-batches sorted by length, as the original pretraining), packed (cells back to back in rows of
    # max_seq_length, attention within each cell; micro_batch_size counts rows)
    batching: str = "length_grouped"


@dataclass
class TrainingConfig:
    max_steps: int = 1000  # the step the run ends at
    learning_rate: float = 1.0e-3
    weight_decay: float = 0.001
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    lr_schedule: str = "linear"  # one of LR_SCHEDULES (transformers schedules that need no extra arguments)
    grad_clip_norm: float = 1.0
    seed: int = 42
    bf16: bool = True  # bf16 autocast (weights and optimizer stay fp32)
    use_fp8: bool = False  # FP8 GEMMs; needs a GPU of compute capability >= 8.9 (see fp8.py)
    fp8_backend: str = "auto"  # fp8.FP8_BACKENDS: auto (te if it imports, else torchao), te, torchao
    use_fsdp: bool = False  # false: DDP when several processes
    compile: bool = False  # torch.compile per encoder layer, in place (checkpoints stay interchangeable)
    activation_checkpointing: bool = False  # per encoder layer: less activation memory for one more forward
    fsdp_impl: str = "torch"  # torch (FSDP2 fully_shard) or megatron (megatron-fsdp, CUDA only)
    log_every_n_steps: int = 10
    save_every: int = 500  # checkpoint interval in steps (the last step and a stop signal always save)
    keep_last: int = 2  # checkpoints kept
    output_dir: str = "runs/geneformer"  # checkpoints/, final_model/, metrics.jsonl, loss.tsv, loss_curve.png
    checkpoint_dir: str | None = None  # removed: always output_dir/checkpoints (a set value is a one-line error)
    # true/auto: newest valid checkpoint in output_dir/checkpoints, else a fresh start; false/none: fresh start (a
    # folder that already holds checkpoints is refused); a path: exactly that checkpoint.
    resume: Any = True
    wandb_init_args: dict[str, Any] = field(default_factory=dict)  # empty: no wandb; +training.wandb_init_args.x=…


@dataclass
class GeneformerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


ConfigStore.instance().store(name="geneformer_schema", node=GeneformerConfig)

USAGE = """usage: train.py [--config-name NAME] [--cfg job|all] [key=value ...]

  --config-name NAME   one of configs/*.yaml: l0_sanity (default), l0_sanity_v2, 10m, 106m, 4b, v2_104m, v2_316m
  --cfg job|all        print the composed configuration and exit
  -m, --multirun       a Hydra sweep: every job, one after another, in <training.output_dir>/<job number>/
  key=value            Hydra overrides, e.g. training.max_steps=100 model.use_te_layers=true
"""


def _one_line(error: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines and chain causes; keep the informative ones on one line."""
    parts, seen = [], set()
    skipped = ("full_key:", "object_type=", "reference_type=", "To append")
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            if line and not line.startswith(skipped) and line not in seen:
                parts.append(line)
                seen.add(line)
        error = error.__cause__
    return "; ".join(parts)


def parse_cli(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """Split Hydra-style arguments into (config name, --cfg value, overrides with deprecated names renamed).

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
    return name, show, rename_overrides(overrides, RENAMED)


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """configs/<config_name>.yaml composed by Hydra with `overrides` against the schema; ConfigError (one line)."""
    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown config name {config_name!r} (known: {', '.join(known)})")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from None
    return cfg


def load_config(config_name: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> GeneformerConfig:
    """The settings of `configs/<config_name>.yaml` with `overrides` (deprecated names accepted with a note), the
    model.* architecture taken from `model.init_from` when set; raises ConfigError (one line). Not yet validated."""
    overrides = rename_overrides(list(overrides or []), RENAMED)
    cfg = compose_config(config_name, overrides)
    if cfg.model.init_from:
        folder = recipe_path(cfg.model.init_from)
        merge_folder_config(cfg.model, read_folder_config(folder), _explicit_model_keys(overrides), folder)
    return OmegaConf.to_object(cfg)


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


def show_config(cfg: GeneformerConfig, show: str) -> None:
    """`--cfg job|all`: print the composed settings as YAML."""
    if show not in ("job", "all"):
        raise ConfigError(f"--cfg takes job or all, not {show!r}")
    print(OmegaConf.to_yaml(cfg), end="")


def config_from_argv(argv: list[str] | None = None) -> GeneformerConfig | None:
    """The config named on the command line; prints it and returns None for --cfg."""
    name, show, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(name, overrides)
    if show is not None:
        show_config(cfg, show)
        return None
    return cfg


_COUNTS = ("max_steps", "log_every_n_steps", "save_every", "keep_last")
_MODEL_COUNTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings")  # fmt: skip


def _setting_checks(cfg: GeneformerConfig) -> list[tuple[str, Any, str]]:
    model, data, training = cfg.model, cfg.data, cfg.training
    checks = [(f"training.{key}", getattr(training, key), "count") for key in _COUNTS]
    checks += [(f"data.{key}", getattr(data, key), "count")
               for key in ("micro_batch_size", "pad_to_multiple_of", "max_seq_length")]  # fmt: skip
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
    checks += [(f"model.{key}", getattr(model, key), "count") for key in _MODEL_COUNTS]
    checks += [(f"training.adam_betas[{i}]", beta, "unit_interval_right_open")
               for i, beta in enumerate(training.adam_betas)]  # fmt: skip
    return checks


def validate(cfg: GeneformerConfig) -> None:
    """Every setting check, in one place, before any output exists; raises ConfigError (one line).

    Ranges go through the shared `check_settings`; combinations that cannot run as asked follow."""
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
    check_batching(model, data)
    fp8_backend(cfg)  # te or torchao; ConfigError when FP8 cannot run here


def _check_schedule(training: TrainingConfig) -> None:
    if training.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"training.lr_schedule={training.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
    if training.lr_schedule == "constant" and training.warmup_steps:
        raise ConfigError("training.lr_schedule=constant ignores warmup_steps; use constant_with_warmup")
    if training.wandb_init_args:
        try:  # MetricsWriter imports wandb only after it has created output_dir: check first
            importlib.import_module("wandb")
        except ImportError as error:
            raise ConfigError(f"training.wandb_init_args is set but wandb does not import ({error})") from None


def check_batching(model: ModelConfig, data: DataConfig) -> None:
    """data.batching is a known mode that the model's layers can run; ConfigError (one line) otherwise."""
    if data.batching not in BATCHING_MODES:
        raise ConfigError(f"data.batching={data.batching!r}: use one of {', '.join(BATCHING_MODES)}")
    if data.batching == "packed" and model.use_te_layers:
        # TE's padding mask cannot say which cell a token belongs to (its THD format would; not wired yet)
        raise ConfigError(
            "data.batching=packed needs the plain layers: set model.use_te_layers=false or another batching"
        )


def _check_parallelism(model: ModelConfig, training: TrainingConfig) -> None:
    if training.fsdp_impl not in ("torch", "megatron"):
        raise ConfigError(f"training.fsdp_impl={training.fsdp_impl!r}: use torch or megatron")
    if training.fsdp_impl == "megatron" and not training.use_fsdp:
        raise ConfigError("training.fsdp_impl=megatron needs training.use_fsdp=true")
    if model.use_te_layers:
        try:
            check_te_config(geneformer_config(2, use_te_layers=True, hidden_act=model.hidden_act))
        except ValueError as error:
            raise ConfigError(str(error)) from None
