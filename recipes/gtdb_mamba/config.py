"""The settings: a typed schema (the defaults, written once, are the original full-scale run), Hydra composition of
`configs/<name>.yaml` with `key=value` overrides, and every check in one `validate()`, run before anything is written.

Hydra stays the front end (users type `--config-name sample`, Hydra overrides and `-m` sweeps; see sweep.py); the
schema is registered in Hydra's ConfigStore as `schema`, so an unknown key or a value of the wrong type is refused by
OmegaConf, and the composed config becomes a `Config` with `OmegaConf.to_object`. A bad value is one `ConfigError`
line naming the key (`biorecipes_shared.check_settings` does the range rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, OverrideParseException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from biorecipes_shared import ConfigError, check_settings
from data import KmerTokenizer, check_crop
from preprocess import GtdbDataError, check_genomes_root

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Deprecated override names (the seed's) and their names now; rewritten before Hydra parses the command line.
RENAMED = {
    "run_dir": "output_dir",
    "train.checkpoint_every": "train.save_every",
    "train.keep_last_k": "train.keep_last",
}


@dataclass
class DataConfig:
    genomes_root: str = MISSING  # the `database` folder of gtdb_genomes_reps_rXXX
    metadata_files: list[str] = MISSING  # [bac120_metadata_rXXX.tsv, ar53_metadata_rXXX.tsv]
    cache_dir: str = "cache"  # genome index + split cache; reused across runs (put it on local disk)
    contamination_column: str = "checkm_contamination"
    max_contamination: float = 5.0  # genomes with contamination >= this are dropped
    val_species_target: int = 1000  # take shuffled families until this many species (each family counts <= cap)
    family_count_cap: int = 100
    n_val_genomes: int = 500
    val_per_genus: int = 10
    train_per_genus: int = 20
    kmer: int = 5  # overlapping k-mer tokens: 4**k ids + N token + pad token
    fragment_bp: int = 2000
    train_tokens: int = 512  # training crop (first tokens of each fragment)
    val_tokens: int = 1536
    reverse_complement: bool = True  # half of the fragments are reverse-complemented
    max_n_fraction: float = 0.0  # resample fragments with more non-ACGT than this (10 tries, then N tokens)
    num_workers: int = 4  # background loader processes per rank
    index_workers: int | None = None  # genome-decoding processes for the index build; None: this rank's cores


@dataclass
class ModelConfig:
    d_model: int = 1536
    n_layers: int = 8
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    norm: str = "layernorm"  # layernorm | rmsnorm
    pooling: str = "sum"  # sum | mean
    tie_projections: bool = False
    backend: str = "auto"  # auto: mamba_ssm kernels on CUDA when installed; pure: mambapy everywhere


@dataclass
class HeadConfig:
    """CurricularFace (Huang et al. 2020): scale s, margin m, momentum of the running `t`."""

    scale: float = 30.0
    margin: float = 0.0
    t_momentum: float = 0.01


@dataclass
class TrainConfig:
    batch_size: int = 64  # fragments per rank per micro-batch
    grad_accumulation: int = 2
    max_steps: int = 150_000  # optimizer steps; the cosine schedule ends here
    steps_per_epoch: int = 1000  # validation (and a checkpoint) after every epoch
    lr: float = 1.8e-3
    min_lr: float = 1.0e-5
    warmup_steps: int = 10_000
    weight_decay: float = 0.05
    grad_clip: float = 10.0
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False  # torch.compile each bidirectional Mamba block (slower on CPU: BENCHMARKS.md)
    activation_checkpointing: bool = False  # recompute each block in the backward pass: less memory, more compute
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 2
    # true/auto: newest valid checkpoint in output_dir/checkpoints, else fresh; false/none: fresh (refused if
    # checkpoints exist); or a checkpoint path. Any: the originals' users type booleans as well as paths.
    resume: Any = True
    init_from: str | None = None  # a final_model/ export of this recipe: start from its embedder (new head)
    stop_at_step: int | None = None  # stop early (checkpoint first) without changing the schedule


@dataclass
class ValConfig:
    fragments_per_genome: int = 8  # 500 genomes x 8 = 4,000 embeddings = 8M pairs
    batch_size: int = 64
    at_start: bool = False  # also validate before the first step


@dataclass
class Config:
    output_dir: str = "runs/gtdb_mamba"  # checkpoints/, final_model/, metrics.jsonl, AUC_log.tsv, log_file.txt, ...
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)

    @property
    def stop_step(self) -> int:
        """The step this call of the run ends at: `train.max_steps`, or the earlier `train.stop_at_step`."""
        return min(self.train.max_steps, self.train.stop_at_step or self.train.max_steps)


ConfigStore.instance().store(name="schema", node=Config)

# Integer settings and their rule: below the minimum the run would divide by zero, loop zero times or build an
# empty tensor, mostly long after the index build.
COUNTS = (
    *((f"data.{key}", "count") for key in ("kmer", "fragment_bp", "train_tokens", "val_tokens", "val_species_target",
                                          "family_count_cap", "val_per_genus", "train_per_genus")),
    ("data.num_workers", "count0"),
    *((f"model.{key}", "count") for key in ("d_model", "n_layers", "d_state", "d_conv", "expand")),
    *((f"train.{key}", "count") for key in ("batch_size", "grad_accumulation", "max_steps", "steps_per_epoch",
                                           "log_every", "save_every")),
    ("train.warmup_steps", "count0"),
    ("train.keep_last", "count0"),
    ("val.batch_size", "count"),
)  # fmt: skip
# The AUC needs 2 genomes with 2 fragments each.
AT_LEAST_TWO = ("data.n_val_genomes", "val.fragments_per_genome")
NUMBER_RULES = (
    ("train.lr", "non_negative"),  # 0 is allowed: a frozen run (e.g. to check an init_from export round-trips)
    ("train.min_lr", "non_negative"),
    ("train.weight_decay", "non_negative"),
    ("train.grad_clip", "positive"),
    ("data.max_n_fraction", "fraction"),
    ("data.max_contamination", "finite"),
    ("head.scale", "positive"),
    ("head.margin", "non_negative"),
    ("head.t_momentum", "fraction"),
)
CHOICES = {"model.norm": ("layernorm", "rmsnorm"), "model.pooling": ("sum", "mean"), "model.backend": ("auto", "pure")}


def setting(cfg: Config, key: str) -> Any:
    """The value of a dotted key, e.g. `setting(cfg, "train.lr")`."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    """Raise ConfigError (one line naming the key) for any setting that cannot work, and GtdbDataError for a
    missing input path; writes nothing."""
    for key, allowed in CHOICES.items():
        if setting(cfg, key) not in allowed:
            raise ConfigError(f"{key}={setting(cfg, key)!r}: must be one of {', '.join(allowed)}")
    check_settings((key, setting(cfg, key), rule) for key, rule in COUNTS)
    for key in AT_LEAST_TWO:
        if setting(cfg, key) < 2:
            raise ConfigError(f"{key}={setting(cfg, key)!r} must be an integer >= 2")
    if cfg.train.stop_at_step is not None:
        check_settings([("train.stop_at_step", cfg.train.stop_at_step, "count")])
    check_settings((key, setting(cfg, key), rule) for key, rule in NUMBER_RULES)
    # Checked here too (not only by the data classes) so that it fails before the split and index are built.
    tokenizer = KmerTokenizer(cfg.data.kmer)
    try:
        check_crop(cfg.data.train_tokens, cfg.data.fragment_bp, tokenizer, "data.train_tokens")
        check_crop(cfg.data.val_tokens, cfg.data.fragment_bp, tokenizer, "data.val_tokens")
    except GtdbDataError as err:
        raise ConfigError(str(err)) from None
    for path in cfg.data.metadata_files:
        if not Path(path).is_file():
            raise GtdbDataError(f"{path}: metadata file not found")
    check_genomes_root(cfg.data.genomes_root, [])


def one_line(error: BaseException) -> str:
    """Hydra/OmegaConf messages span several lines and chain causes; keep the informative lines, on one line."""
    if isinstance(error, OverrideParseException):  # its message does not name the override
        reason = str(error).splitlines()[0]
        return f"cannot parse the override {error.override!r}: {reason} (see Hydra's override grammar)"
    parts, seen = [], set()
    while error is not None:
        for line in str(error).splitlines():
            line = line.strip()
            if line and not line.startswith(("full_key:", "object_type=", "reference_type=")) and line not in seen:
                parts.append(line.rstrip("."))
                seen.add(line)
        error = error.__cause__
    return "; ".join(parts)


def compose_config(config_name: str, overrides: list[str]) -> Config:
    """configs/<config_name>.yaml with the overrides applied (no sweep values), as a `Config`; ConfigError (one
    line) for an unknown config name, key or override, a value of the wrong type, or a required setting not given."""
    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown config name {config_name!r} (known: {known})")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed = compose(config_name=config_name, overrides=overrides)
        missing = sorted(OmegaConf.missing_keys(composed))
        if missing:
            raise ConfigError(f"required setting(s) not given: {', '.join(missing)} (pass them as key=value)")
        return OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(one_line(error)) from None
