"""Shared fixtures: a small synthetic GTDB-layout tree generated once per test session."""

import gzip
import logging
import shutil
import sys
from pathlib import Path

import pytest

from scripts.build_sample import make_fixture

RECIPE_DIR = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def loggers_write_to_this_tests_stderr():
    """In-process runs: the shared logger's handler keeps the stderr it was made with, which is closed once the test
    that made it (under capsys) ends; every test points it at the stderr of its own start."""
    for name in ("gtdb_mamba", "preprocess", "data"):
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "_biorecipes", False):
                handler.stream = sys.stderr  # not setStream: it flushes the old, closed stream


@pytest.fixture(scope="session")
def gtdb_fixture(tmp_path_factory) -> Path:
    """12 families x 2 genera x 2 genomes of 20 kbp in 2 contigs (synthetic only: fast to index)."""
    return make_fixture(
        tmp_path_factory.mktemp("gtdb") / "release",
        families=12,
        genera_per_family=2,
        genomes_per_genus=2,
        genome_bp=20_000,
        include_real=False,
    )


@pytest.fixture(scope="session")
def two_step_run(gtdb_fixture, tmp_path_factory) -> Path:
    """A finished 2-step run of the tiny settings (checkpoint step_00000002), made once for the tests that resume it
    with other settings; each takes its own copy with `copy_two_step_run`."""
    from train import run

    work = tmp_path_factory.mktemp("two_steps")
    run(compose_config([*tiny_overrides(gtdb_fixture, work), *TWO_STEPS]))
    return work / "run"


TWO_STEPS = ["train.max_steps=2", "train.steps_per_epoch=2"]


def copy_two_step_run(two_step_run: Path, work: Path) -> Path:
    """The 2-step run in `work/run`, where `tiny_overrides(root, work)` points."""
    return shutil.copytree(two_step_run, work / "run")


def metadata_files(root: Path) -> list[Path]:
    return [root / "bac120_metadata_r0.tsv", root / "ar53_metadata_r0.tsv"]


def write_fasta_gz(path: Path, records: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        for name, sequence in records:
            handle.write(f">{name}\n{sequence}\n")
    return path


def tiny_overrides(root: Path, work: Path) -> list[str]:
    """Hydra overrides for a seconds-long run on the session fixture."""
    return [
        f"data.genomes_root={root / 'database'}",
        f"data.metadata_files=[{root / 'bac120_metadata_r0.tsv'},{root / 'ar53_metadata_r0.tsv'}]",
        f"data.cache_dir={work / 'cache'}",
        f"output_dir={work / 'run'}",
        "data.val_species_target=6",
        "data.n_val_genomes=8",
        "data.num_workers=0",
        "data.fragment_bp=150",
        "data.train_tokens=32",
        "data.val_tokens=64",
        "model.d_model=16",
        "model.n_layers=1",
        "model.d_state=4",
        "train.batch_size=8",
        "train.log_every=1",
        "val.fragments_per_genome=3",
        "val.at_start=false",
    ]


def compose_config(overrides: list[str]):
    """The sample config with overrides, as `python train.py --config-name sample ...` would see it (a `Config`)."""
    import config

    return config.compose_config("sample", overrides)
