"""Shared fixtures: paths of the bundled sample data and a tiny model config."""

from pathlib import Path

import pytest

RECIPE_DIR = Path(__file__).resolve().parents[1]
SAMPLE_DIR = RECIPE_DIR / "sample_data"


@pytest.fixture(scope="session")
def recipe_dir() -> Path:
    return RECIPE_DIR


@pytest.fixture(scope="session")
def sample_genbank() -> Path:
    return SAMPLE_DIR / "raw" / "BGC0001090.gbk.gz"


@pytest.fixture(scope="session")
def sample_fasta() -> Path:
    return SAMPLE_DIR / "raw" / "HG003687_proteins.faa.gz"


@pytest.fixture(scope="session")
def sample_base_dir() -> Path:
    return SAMPLE_DIR / "encoded"


@pytest.fixture(scope="session")
def sample_tokenizer():
    from tokenizer import OmniTokenizer

    return OmniTokenizer(SAMPLE_DIR / "encoded" / "tokenizer.model")
