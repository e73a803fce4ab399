"""Every case of the shared FASTA contract (tests/data/fasta_contract.json) through this recipe's genome reader."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from genome_fasta import CODE_LETTERS, GenomeSkipped, fasta_records

CONTRACT = json.loads((Path(__file__).parent / "data" / "fasta_contract.json").read_text())
CASES = [case for case in CONTRACT["cases"] if case["dna"]["verdict"] != "not_applicable"]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_fasta_contract(case, compressed, tmp_path):
    path = tmp_path / ("case.fna.gz" if compressed else "case.fna")
    data = case["text"].encode("utf-8")
    path.write_bytes(gzip.compress(data) if compressed else data)
    expected = case["dna"]
    if expected["verdict"] == "ok":
        records = fasta_records(path)
        decoded = [[name, "".join(CODE_LETTERS[c] for c in codes)] for name, _, codes in records]
        assert decoded == expected["records"]
        if "description" in expected:
            assert records[0][1] == expected["description"]
        return
    with pytest.raises(GenomeSkipped) as caught:
        fasta_records(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for mention in expected["error_mentions"]:
        assert mention in message
