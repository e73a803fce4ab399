"""The shared FASTA contract (biorecipes_shared/fasta_contract.json, one table for every recipe) through this reader."""

from pathlib import Path

import pytest

from biorecipes_shared.testing import check_fasta_case, fasta_contract_cases
from data_processing import FastaError, read_fasta

CASES = fasta_contract_cases("protein")


def read_records(path: Path) -> list[tuple[str, str, str]]:
    return [(header[1:].split()[0], header[1:], seq) for header, seq in read_fasta(path)]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_fasta_contract(tmp_path, case, compressed):
    path = tmp_path / ("case.fasta.gz" if compressed else "case.fasta")
    check_fasta_case(case, "protein", path, compressed, read_records, FastaError)
