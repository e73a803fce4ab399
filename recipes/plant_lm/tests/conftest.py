"""Helpers shared by the tests: tiny synthetic FASTA data directories, a tiny run's settings, and one finished
tiny run that every test which only reads (or copies) a finished run shares."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from config import Config

RECIPE_DIR = Path(__file__).resolve().parents[1]


def write_fasta(path: Path, records: dict[str, str], gz: bool = False, width: int = 60) -> Path:
    """Write records {id: sequence} as FASTA (gzip when `gz`), `width` bases a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        f">{rid} test\n" + "".join(seq[i : i + width] + "\n" for i in range(0, len(seq), width))
        for rid, seq in records.items()
    )
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def random_dna(n: int, seed: int, gc: float = 0.4) -> str:
    rng = np.random.default_rng(seed)
    probs = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
    return "".join(rng.choice(list("ACGT"), size=n, p=probs))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread: on a shared 2-core machine two threads ran 5x slower (the runs in
    subprocesses get the same through `tiny_config`'s num_threads=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_species(root: Path) -> Path:
    """Two species with different composition, one gzip and one plain file."""
    write_fasta(root / "oryza_sativa" / "chr1.fa.gz", {"chr1": random_dna(30_000, 1, gc=0.6)}, gz=True)
    write_fasta(root / "arabidopsis" / "chr1.fna", {"chr1": random_dna(20_000, 2, gc=0.3)})
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return two_species(tmp_path / "data")


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> Config:
    """2 epochs of 3 steps of a 1-layer d=32 model on 16-token windows (every species folder, weight 1)."""
    values = dict(
        data_dir=str(data_dir), species_distribution={}, output_dir=str(out_dir), d_model=32, n_heads=4, n_layers=1,
        batch_size=4, accumulation_steps=2, context_size=16, steps_per_epoch=3, n_epochs=2, warmup_steps=2,
        learning_rate=1e-3, memory_normalize_every=4, global_context=500, num_threads=1,
    )  # fmt: skip
    values.update(overrides)
    return Config(**values)


def cli_args(cfg: Config) -> list[str]:
    """The command line that gives `cfg` (species_distribution empty: every species folder, weight 1)."""
    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if k != "species_distribution"] + [
        "--species_distribution="
    ]


def assert_same_weights(path_a: Path, path_b: Path, skip_memory: bool = False) -> None:
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        if not (skip_memory and key.startswith("memory.")):
            assert torch.equal(a[key], b[key]), key


def losses_of(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def assert_startup_error(capsys, out: Path, args: list[str], message: str) -> None:
    """main() exits 1 with a one-line error naming `message`, and has created nothing under `out`."""
    from train import main

    assert main(args + ["--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and message in err and "Traceback" not in err, err
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))  # no output_dir, log or checkpoint left


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory) -> tuple[Config, dict]:
    """One finished, uninterrupted tiny run (6 steps, checkpoints every 2 steps and per epoch, newest 3 kept), its
    settings and result. Tests read it or copy it; none changes it."""
    from train import train

    root = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(two_species(root / "data"), root / "run", save_every=2, keep_last=3)
    return cfg, train(cfg)
