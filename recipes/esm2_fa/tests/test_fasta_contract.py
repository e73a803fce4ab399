"""The shared FASTA contract (tests/data/fasta_contract.json, identical in every recipe) through this reader."""

import gzip
import json
from pathlib import Path

import pytest

from data_processing import FastaError, read_fasta

CONTRACT = json.loads((Path(__file__).parent / "data" / "fasta_contract.json").read_text(encoding="utf-8"))
CASES = [(case["name"], case["text"], case["protein"]) for case in CONTRACT["cases"]]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("name, text, expected", CASES, ids=[c[0] for c in CASES])
def test_fasta_contract(tmp_path, name, text, expected, compressed):
    if expected["verdict"] == "not_applicable":
        pytest.skip("not applicable to protein readers")
    data = text.encode("utf-8")
    path = tmp_path / (f"{name}.fasta.gz" if compressed else f"{name}.fasta")
    path.write_bytes(gzip.compress(data) if compressed else data)
    if expected["verdict"] == "ok":
        records = list(read_fasta(path))
        assert [[header[1:].split()[0], seq] for header, seq in records] == expected["records"]
        if "description" in expected:
            assert records[0][0][1:] == expected["description"]
        return
    with pytest.raises(FastaError) as err:
        list(read_fasta(path))
    message = str(err.value)
    assert "\n" not in message and path.name in message
    for mention in expected["error_mentions"]:
        assert mention in message
