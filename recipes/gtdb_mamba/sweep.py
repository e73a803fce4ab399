"""The command line: Hydra's flags this recipe supports, its override grammar and `-m` sweeps, with one-line errors.

Parsed here rather than by @hydra.main so that every error is one line and a sweep runs every job (Hydra's own
launcher would stop at the first failure with a traceback). Deprecated override names (config.RENAMED) are rewritten
with a one-line note before Hydra sees them.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from biorecipes_shared import ConfigError, atomic_write_json, rename_overrides
from config import RENAMED, Config, compose_config, one_line, validate

SWEEP_RECORD = "sweep_job.json"
USAGE = """usage: train.py [--config-name NAME] [--cfg job|all] [-m] [key=value ...]

  --config-name NAME, -cn NAME   configs/NAME.yaml: config (default, full scale) or sample (the bundled fixture)
  --cfg job|all                  print the composed configuration and exit
  -m, --multirun                 a sweep: key=a,b runs one job per combination, one after the other, each in its
                                 own run folder (<output_dir>/<job number>/ unless the sweep gives each its own
                                 output_dir)
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
    """One run of the command: its settings and, in a sweep, its number and the values swept for it."""

    cfg: Config
    number: int | None = None  # None: not a sweep (no -m)
    swept: dict[str, str] = field(default_factory=dict)


def parse_cli(argv: list[str]) -> Cli:
    """Split the arguments (Hydra's flags that this recipe supports) from the overrides; ConfigError otherwise."""
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
    cli.overrides = rename_overrides(cli.overrides, RENAMED)
    return cli


def sweep_jobs(cli: Cli) -> list[SweepJob]:
    """Every job of the command, composed and checked before any starts; ConfigError (one line) otherwise."""
    if not cli.multirun:
        return [SweepJob(compose_config(cli.config_name, cli.overrides))]
    try:
        parsed = OverridesParser.create().parse_overrides(cli.overrides)
        choices = [_choices(override) for override in parsed]
    except HydraException as error:
        raise ConfigError(one_line(error)) from None
    combos = list(itertools.product(*choices))  # Hydra's BasicSweeper order: the last key varies fastest
    swept_keys = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    jobs = []
    for number, overrides in enumerate(combos):
        values = dict(override.split("=", 1) for override in overrides)
        swept = {key: values[key] for key in sorted(swept_keys) if key != "output_dir"}
        jobs.append(SweepJob(compose_config(cli.config_name, list(overrides)), number, swept))
    if len({job.cfg.output_dir for job in jobs}) < len(jobs):  # a shared output_dir: a sub-folder per job number
        for job in jobs:
            job.cfg.output_dir = str(Path(job.cfg.output_dir) / str(job.number))
    for job in jobs:
        validate(job.cfg)
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
    record = Path(job.cfg.output_dir) / SWEEP_RECORD
    if not record.is_file():
        return
    try:
        saved = json.loads(record.read_text())["swept"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{record}: unreadable sweep record (damaged?); use a new output_dir") from None
    if saved != job.swept:
        raise ConfigError(
            f"{record.parent} holds sweep job {job.number} with {describe_swept(saved)}, not "
            f"{describe_swept(job.swept)}: resuming it would mix hyper-parameters; use a new output_dir"
        )


def write_sweep_record(job: SweepJob) -> None:
    """Rank 0 records the job's swept values in its run folder, once (before its first checkpoint)."""
    record = Path(job.cfg.output_dir) / SWEEP_RECORD
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
        print(OmegaConf.to_yaml(OmegaConf.structured(job.cfg)), end="")
    return []
