"""The command line (Hydra overrides and sweeps) and every check of the settings, run before anything is written.

A bad value is one `ConfigError` line naming the key (`biorecipes_shared.run.check_settings` does the range rules);
a bad override or an unknown key is one line too.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from biorecipes_shared.files import atomic_write_json
from biorecipes_shared.run import ConfigError, check_settings
from data import KmerTokenizer, check_crop
from preprocess import GtdbDataError, check_genomes_root

# Minimum of each integer setting: below it the run would divide by zero, loop zero times or build an empty tensor,
# mostly long after the index build. The AUC needs 2 genomes with 2 fragments each.
MIN_COUNTS = {
    "data.kmer": 1,
    "data.fragment_bp": 1,
    "data.train_tokens": 1,
    "data.val_tokens": 1,
    "data.val_species_target": 1,
    "data.family_count_cap": 1,
    "data.n_val_genomes": 2,
    "data.val_per_genus": 1,
    "data.train_per_genus": 1,
    "data.num_workers": 0,
    "model.d_model": 1,
    "model.n_layers": 1,
    "model.d_state": 1,
    "model.d_conv": 1,
    "model.expand": 1,
    "train.batch_size": 1,
    "train.grad_accumulation": 1,
    "train.max_steps": 1,
    "train.steps_per_epoch": 1,
    "train.warmup_steps": 0,
    "train.log_every": 1,
    "train.checkpoint_every": 1,
    "train.keep_last_k": 0,
    "val.fragments_per_genome": 2,
    "val.batch_size": 1,
}

# (key, rule) for the real-valued settings; rules are those of biorecipes_shared.run.check_settings.
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

CHOICES = {
    "model.norm": ("layernorm", "rmsnorm"),
    "model.pooling": ("sum", "mean"),
    "model.backend": ("auto", "pure"),
}


SWITCHES = (
    "train.bf16",
    "train.compile",
    "train.activation_checkpointing",
    "model.tie_projections",
    "data.reverse_complement",
    "val.at_start",
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError (one line naming the key) for any setting that cannot work; writes nothing."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required setting(s) not given: {', '.join(missing)} (pass them as key=value)")
    for key, allowed in CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: must be one of {', '.join(allowed)}")
    for key in SWITCHES:
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise ConfigError(f"{key} must be true or false, got {OmegaConf.select(cfg, key)!r}")
    for key, minimum in MIN_COUNTS.items():
        value = OmegaConf.select(cfg, key)
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    stop = cfg.train.stop_at_step
    if stop is not None and (not _is_int(stop) or stop < 1):
        raise ConfigError(f"train.stop_at_step must be null or an integer >= 1, got {stop!r}")
    check_settings((key, OmegaConf.select(cfg, key), rule) for key, rule in NUMBER_RULES)
    # Checked here too (not only by the data classes) so that it fails before the split and index are built.
    tokenizer = KmerTokenizer(cfg.data.kmer)
    try:
        check_crop(cfg.data.train_tokens, cfg.data.fragment_bp, tokenizer, "data.train_tokens")
        check_crop(cfg.data.val_tokens, cfg.data.fragment_bp, tokenizer, "data.val_tokens")
    except GtdbDataError as err:
        raise ConfigError(str(err)) from None
    check_input_paths(cfg)


def check_input_paths(cfg: DictConfig) -> None:
    """The input paths exist (GtdbDataError, one line): checked before the run folder is locked or written."""
    if not OmegaConf.is_list(cfg.data.metadata_files):
        raise ConfigError(
            f"data.metadata_files must be a list of files, e.g. '[a.tsv,b.tsv]', got {cfg.data.metadata_files!r}"
        )
    for path in cfg.data.metadata_files:
        if not Path(path).is_file():
            raise GtdbDataError(f"{path}: metadata file not found")
    check_genomes_root(cfg.data.genomes_root, [])


# --- The command line: Hydra's override grammar and sweeps, with one-line errors -----------------------------------

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
SWEEP_RECORD = "sweep_job.json"
USAGE = """usage: train.py [--config-name NAME] [--cfg job|all] [-m] [key=value ...]

  --config-name NAME, -cn NAME   conf/NAME.yaml: config (default, full scale) or sample (the bundled fixture)
  --cfg job|all                  print the composed configuration and exit
  -m, --multirun                 a sweep: key=a,b runs one job per combination, one after the other, each in its
                                 own run folder (<run_dir>/<job number>/ unless the sweep gives each its own run_dir)
  key=value                      Hydra overrides, e.g. train.max_steps=100 'data.metadata_files=[a.tsv,b.tsv]'
"""


@dataclass
class Cli:
    config_name: str = "config"
    show: str | None = None
    multirun: bool = False
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepJob:
    """One run of the command: its composed config and, in a sweep, its number and the values swept for it."""

    cfg: DictConfig
    number: int | None = None  # None: not a sweep (no -m)
    swept: dict[str, str] = field(default_factory=dict)


def _one_line(error: BaseException) -> str:
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


def parse_cli(argv: list[str]) -> Cli:
    """Split the arguments (Hydra's flags that this recipe supports) from the overrides; ConfigError otherwise.

    Parsed here rather than by @hydra.main so that every error is one line and a sweep runs every job."""
    cli, args = Cli(), list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            raise SystemExit(print(USAGE, end="") or 0)
        if arg in ("-m", "--multirun"):
            cli.multirun = True
            continue
        if not arg.startswith("-"):
            cli.overrides.append(arg)
            continue
        flag, value = arg.split("=", 1) if "=" in arg else (arg, None)
        if flag not in ("--config-name", "-cn", "--cfg", "-c"):
            raise ConfigError(f"unknown option {arg!r} (see --help)")
        if value is None:
            if not args:
                raise ConfigError(f"{flag} needs a value")
            value = args.pop(0)
        if flag in ("--config-name", "-cn"):
            cli.config_name = value.removesuffix(".yaml")
        elif value in ("job", "all"):
            cli.show = value
        else:
            raise ConfigError(f"--cfg takes job or all, not {value!r}")
    return cli


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """conf/<config_name>.yaml with the overrides applied (no sweep values); ConfigError (one line) otherwise."""
    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown config name {config_name!r} (known: {known})")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_one_line(error)) from None


def sweep_jobs(cli: Cli) -> list[SweepJob]:
    """Every job of the command, composed and checked before any starts; ConfigError (one line) otherwise."""
    if not cli.multirun:
        return [SweepJob(compose_config(cli.config_name, cli.overrides))]
    try:
        parsed = OverridesParser.create().parse_overrides(cli.overrides)
        choices = [_choices(override) for override in parsed]
    except HydraException as error:
        raise ConfigError(_one_line(error)) from None
    combos = list(itertools.product(*choices))  # Hydra's BasicSweeper order: the last key varies fastest
    swept_keys = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    jobs = []
    for number, overrides in enumerate(combos):
        values = dict(override.split("=", 1) for override in overrides)
        swept = {key: values[key] for key in sorted(swept_keys) if key != "run_dir"}
        jobs.append(SweepJob(compose_config(cli.config_name, list(overrides)), number, swept))
    if len({str(job.cfg.run_dir) for job in jobs}) < len(jobs):  # a shared run_dir: a sub-folder per job number
        for job in jobs:
            job.cfg.run_dir = str(Path(job.cfg.run_dir) / str(job.number))
    for job in jobs:
        check_config(job.cfg)
        check_sweep_record(job)
    return jobs


def _choices(override) -> list[str]:
    """`key=a,b` -> ["key=a", "key=b"]; a fixed value -> one choice. Hydra's BasicSweeper does the same (private)."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [f"{key}={override.get_value_element_as_str()}"]
    if not override.is_discrete_sweep():
        raise ConfigError(f"{key}: only lists (a,b,c), choice() and range() can be swept here, not intervals")
    return [f"{key}={value}" for value in override.sweep_string_iterator()]


def check_sweep_record(job: SweepJob) -> None:
    """A folder a sweep job ran in keeps that job's swept values: a rerun with other values gets a new folder."""
    record = Path(job.cfg.run_dir) / SWEEP_RECORD
    if not record.is_file():
        return
    try:
        saved = json.loads(record.read_text())["swept"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{record}: unreadable sweep record (damaged?); use a new run_dir") from None
    if saved != job.swept:
        raise ConfigError(
            f"{record.parent} holds sweep job {job.number} with {describe_swept(saved)}, not "
            f"{describe_swept(job.swept)}: resuming it would mix hyper-parameters; use a new run_dir"
        )


def write_sweep_record(job: SweepJob) -> None:
    """Rank 0 records the job's swept values in its run folder, once (before its first checkpoint)."""
    record = Path(job.cfg.run_dir) / SWEEP_RECORD
    if record.is_file() or int(os.environ.get("RANK", "0")) != 0:
        return
    atomic_write_json(record, {"job": job.number, "swept": job.swept})


def describe_swept(swept: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in swept.items())


def jobs_from_argv(argv: list[str]) -> list[SweepJob]:
    """The jobs the command line asks for; with --cfg, prints each composed config and returns none."""
    cli = parse_cli(argv)
    jobs = sweep_jobs(cli)
    if cli.show is None:
        return jobs
    for job in jobs:
        print(OmegaConf.to_yaml(job.cfg), end="")
    return []
