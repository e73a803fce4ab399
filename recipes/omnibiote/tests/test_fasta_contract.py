"""The shared FASTA contract (biorecipes_shared/fasta_contract.json, one table for every recipe) through this reader."""

import pytest

from biorecipes_shared.testing import check_fasta_case, fasta_contract_cases
from errors import PreprocessError
from preprocessing.preprocess_uniprot import read_fasta

CASES = fasta_contract_cases("protein")


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_fasta_contract(tmp_path, case, compressed):
    path = tmp_path / ("case.faa.gz" if compressed else "case.faa")
    check_fasta_case(case, "protein", path, compressed, lambda p: list(read_fasta(p)), PreprocessError)
