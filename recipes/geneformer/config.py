"""The run configuration: a typed schema (so unknown keys and wrong types are errors) filled by hydra_config/*.yaml.

The values live in the YAML files; the dataclasses below only say which keys exist and their types.
"""

from __future__ import annotations

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

CONFIG_DIR = Path(__file__).resolve().parent / "hydra_config"
DEFAULT_CONFIG = "l0_sanity"


class ConfigError(ValueError):
    """An unusable configuration (unknown name or key, wrong type, incompatible choices)."""


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


@dataclass
class DataConfig:
    train_path: str = MISSING
    vocab_path: str = MISSING
    max_seq_length: int = MISSING
    micro_batch_size: int = MISSING
    mlm_probability: float = MISSING
    pad_to_multiple_of: int = MISSING


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
    fsdp_impl: str = MISSING  # torch (FSDP2 fully_shard) or megatron (megatron-fsdp, CUDA only)
    log_every_n_steps: int = MISSING
    save_every_n_steps: int = MISSING
    keep_last_k: int = MISSING
    output_dir: str = MISSING
    checkpoint_dir: str = MISSING
    resume_from_checkpoint: bool = MISSING
    wandb_init_args: dict[str, Any] = field(default_factory=dict)  # empty: no wandb


@dataclass
class GeneformerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)


ConfigStore.instance().store(name="geneformer_schema", node=GeneformerConfig)

USAGE = """usage: train.py [--config-name NAME] [--cfg job|all] [key=value ...]

  --config-name NAME   one of hydra_config/*.yaml: l0_sanity (default), 10m, 106m, 4b
  --cfg job|all        print the composed configuration and exit
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
    return cfg


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
