"""Shared fixtures: paths of the bundled sample data, and of the optional shared real data beside the checkout."""

import logging
import os
from pathlib import Path

import pytest

RECIPE_DIR = Path(__file__).resolve().parents[1]
SAMPLE_DIR = RECIPE_DIR / "sample_data"


@pytest.fixture(autouse=True)
def fresh_logger():
    """The trainer's log handler holds the stderr of the test that made it: give each test its own."""
    logger = logging.getLogger("omnibiote")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    yield


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


def find_shared_data() -> Path | None:
    """BIORECIPES_SHARED_DATA, else the first `<ancestor>/../shared/data` (or `<ancestor>/shared/data`) that has a
    README.md; None on a user's machine."""
    if os.environ.get("BIORECIPES_SHARED_DATA"):
        return Path(os.environ["BIORECIPES_SHARED_DATA"])
    for ancestor in RECIPE_DIR.parents:
        for candidate in (ancestor / "shared" / "data", ancestor.parent / "shared" / "data"):
            if (candidate / "README.md").is_file():
                return candidate
    return None


@pytest.fixture(scope="session")
def uniref_parquet() -> Path:
    data = find_shared_data()
    path = data / "uniref_10k" / "train.parquet" if data else None
    if path is None or not path.is_file():
        pytest.skip("shared real data (../shared/data/uniref_10k) is not available here")
    return path
