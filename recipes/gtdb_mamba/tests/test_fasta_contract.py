"""Every case of the shared FASTA contract (biorecipes_shared/fasta_contract.json) through this recipe's genome reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from biorecipes_shared.testing import check_fasta_case, fasta_contract_cases
from genome_fasta import CODE_LETTERS, GenomeSkipped, fasta_records

CASES = fasta_contract_cases("dna")


def read_records(path: Path) -> list[tuple[str, str, str]]:
    return [(name, header, "".join(CODE_LETTERS[c] for c in codes)) for name, header, codes in fasta_records(path)]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_fasta_contract(case, compressed, tmp_path):
    path = tmp_path / ("case.fna.gz" if compressed else "case.fna")
    check_fasta_case(case, "dna", path, compressed, read_records, GenomeSkipped)
