"""Hydra multirun for train.py: `python train.py -m training.learning_rate=1e-3,3e-3` runs every job of the sweep.

Jobs are Hydra's BasicSweeper product of the comma lists (and `range(...)` / `choice(...)`), numbered from 0 in its
order, and run one after another in this process. Each job gets its own run folder: `<training.output_dir>/<N>/`
(as Hydra's `multirun/…/N/`), unless `training.output_dir` is itself swept, then each job's own value, which must
all differ. Every job's config is composed and checked before the first one starts, so a bad value in any job is one
line with nothing written. A job that ends without finishing (SIGTERM/SIGUSR1) ends the sweep; rerunning the same
command skips the finished jobs (one line each), resumes the stopped one and runs the rest.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from biorecipes_shared import ConfigError, read_launch_env
from config import GeneformerConfig, load_config, parse_cli, recipe_path, show_config, validate

MULTIRUN_FLAGS = ("-m", "--multirun")
OUTPUT_DIR_KEY = "training.output_dir"


def is_sweep(argv: list[str]) -> bool:
    return any(arg in MULTIRUN_FLAGS for arg in argv)


def expand_overrides(overrides: list[str]) -> list[list[str]]:
    """The override list of every job, in Hydra's BasicSweeper order (the first swept key varies slowest)."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        choices = []
        for override in parsed:
            key = override.get_key_element()
            if override.is_sweep_override():
                choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
            else:
                choices.append([override.input_line])
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(f"cannot expand the sweep: {str(error).splitlines()[0]}") from None
    return [list(job) for job in itertools.product(*choices)]


def _swept_output_dir(overrides: list[str]) -> bool:
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.get_key_element().lstrip("+~") == OUTPUT_DIR_KEY and override.is_sweep_override():
            return True
    return False


def sweep_configs(argv: list[str]) -> tuple[str | None, list[tuple[list[str], GeneformerConfig]]]:
    """(--cfg value, [(job overrides, checked config)]) for a `-m` command line; ConfigError (one line) for any
    job's bad value, for run folders that two jobs would share, and under torchrun."""
    if read_launch_env()[2] > 1:
        raise ConfigError("a sweep (-m) runs its jobs one after another in one process: launch one torchrun per job")
    name, show, overrides = parse_cli([arg for arg in argv if arg not in MULTIRUN_FLAGS])
    jobs = expand_overrides(overrides)
    own_dirs = _swept_output_dir(overrides)
    configs = []
    for number, job in enumerate(jobs):
        cfg = load_config(name, job)
        if not own_dirs:
            cfg.training.output_dir = str(Path(cfg.training.output_dir) / str(number))
        validate(cfg)
        configs.append((job, cfg))
    folders = [recipe_path(cfg.training.output_dir).resolve() for _, cfg in configs]
    shared = sorted({str(folder) for folder in folders if folders.count(folder) > 1})
    if shared:
        raise ConfigError(
            f"sweep jobs would share the run folder {shared[0]}: give each job its own training.output_dir"
        )
    return show, configs


def print_configs(configs: list[tuple[list[str], GeneformerConfig]], show: str) -> None:
    if show not in ("job", "all"):  # before any job is printed
        raise ConfigError(f"--cfg takes job or all, not {show!r}")
    for number, (job, cfg) in enumerate(configs):
        print(f"# job {number}: {' '.join(job)}")
        show_config(cfg, show)
