"""GenBank flat files (plain or .gz) -> record shards of DNA and RNA sequences.

    python -m preprocessing.preprocess_genbank gbvrl1.seq.gz gbvrl2.seq.gz --out_dir data/records

Each record is streamed with Biopython, labelled DNA or RNA from its source feature's /mol_type (LOCUS molecule
type as fallback), upper-cased, written with T for DNA and U for RNA, and cut at long runs of ambiguous bases
(assembly gaps such as NNNN... carry no signal). A truncated record, a record without sequence (no ORIGIN),
a non-nucleotide character or an empty file stops the run with the file and record named; no shard is left behind.
"""

import argparse
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from Bio import BiopythonParserWarning, SeqIO
from Bio.Seq import UndefinedSequenceError
from tqdm import tqdm

from errors import PreprocessError, run_cli
from preprocessing.shards import ShardWriter, open_text

IUPAC_NUCLEOTIDES = frozenset("ACGTURYSWKMBDHVN")
UNAMBIGUOUS = {"dna": "ACGT", "rna": "ACGU"}
# Biopython only warns about these; for us they mean the file was cut short.
TRUNCATION_WARNINGS = ("Premature end", "Expected sequence length")


def molecule_modality(record) -> str:
    """'rna' or 'dna' from the source feature's /mol_type (e.g. 'mRNA', 'genomic DNA'), else the LOCUS type."""
    mol_type = record.annotations.get("molecule_type", "DNA")
    for feature in record.features:
        if feature.type == "source" and "mol_type" in feature.qualifiers:
            mol_type = feature.qualifiers["mol_type"][0]
            break
    return "rna" if "RNA" in mol_type.upper() else "dna"


def normalise_nucleotides(sequence: str, modality: str, where: str) -> str:
    """Upper-case, T for DNA and U for RNA; raise on characters that are not IUPAC nucleotide codes."""
    sequence = sequence.upper()
    sequence = sequence.replace("U", "T") if modality == "dna" else sequence.replace("T", "U")
    invalid = set(sequence) - IUPAC_NUCLEOTIDES
    if invalid:
        raise PreprocessError(f"{where}: invalid nucleotide character(s) {''.join(sorted(invalid))!r}")
    return sequence


def split_at_ambiguous_runs(
    sequence: str, modality: str, max_run: int, min_length: int, split_length: int
) -> list[str]:
    """Cut at every run of >= max_run ambiguous bases, drop pieces shorter than min_length, and optionally
    cut long pieces into windows of split_length (0 keeps them whole)."""
    gap = re.compile(f"[^{UNAMBIGUOUS[modality]}]{{{max_run},}}")
    pieces = [piece for piece in gap.split(sequence) if len(piece) >= min_length]
    if split_length > 0:
        pieces = [piece[i : i + split_length] for piece in pieces for i in range(0, len(piece), split_length)]
        pieces = [piece for piece in pieces if len(piece) >= min_length]
    return pieces


def iter_genbank_file(path: str | Path) -> Iterator[tuple[str, str, str]]:
    """Yield (modality, record_id, raw_sequence) for each record of one GenBank file, raising on malformed ones."""
    n_records = 0
    last_id = "the start of the file"
    with open_text(path) as handle, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BiopythonParserWarning)
        records = SeqIO.parse(handle, "genbank")
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            except ValueError as exc:  # Biopython's signal for a broken record (e.g. features end without ORIGIN)
                raise PreprocessError(f"{path}: malformed GenBank record after {last_id}: {exc}") from None
            truncated = [str(w.message) for w in caught if str(w.message).startswith(TRUNCATION_WARNINGS)]
            caught.clear()
            if truncated:
                raise PreprocessError(f"{path}: record {record.id}: truncated ({truncated[-1]})")
            try:
                sequence = str(record.seq)
            except UndefinedSequenceError:
                raise PreprocessError(f"{path}: record {record.id}: no sequence (missing ORIGIN section)") from None
            if not sequence:
                raise PreprocessError(f"{path}: record {record.id}: empty sequence")
            n_records += 1
            last_id = f"record {record.id}"
            yield molecule_modality(record), record.id, sequence
    if n_records == 0:
        raise PreprocessError(f"{path}: no GenBank records found (expected LOCUS ... // entries)")


def preprocess_genbank(
    inputs: list[str | Path],
    out_dir: str | Path,
    max_ambiguous_run: int = 10,
    min_length: int = 32,
    split_length: int = 0,
    shard_chars: int = 100_000_000,
) -> ShardWriter:
    """Parse every GenBank input into `genbank_NNNNN.tsv.gz` record shards under out_dir; returns the writer."""
    with ShardWriter(out_dir, "genbank", max_chars=shard_chars) as writer:
        for path in tqdm(inputs, desc="genbank files", unit="file", disable=len(inputs) < 2):
            for modality, record_id, raw in iter_genbank_file(path):
                sequence = normalise_nucleotides(raw, modality, f"{path}: record {record_id}")
                pieces = split_at_ambiguous_runs(sequence, modality, max_ambiguous_run, min_length, split_length)
                for index, piece in enumerate(pieces):
                    writer.add(modality, record_id if len(pieces) == 1 else f"{record_id}/{index}", piece)
    return writer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="GenBank flat files, plain or gzip")
    parser.add_argument("--out_dir", required=True, help="folder for genbank_NNNNN.tsv.gz record shards")
    parser.add_argument("--max_ambiguous_run", type=int, default=10, help="cut at runs of this many ambiguous bases")
    parser.add_argument("--min_length", type=int, default=32, help="drop pieces shorter than this")
    parser.add_argument("--split_length", type=int, default=0, help="cut pieces into windows this long (0: off)")
    parser.add_argument("--shard_chars", type=int, default=100_000_000, help="residues per shard")
    args = parser.parse_args(argv)
    writer = preprocess_genbank(
        args.inputs, args.out_dir, args.max_ambiguous_run, args.min_length, args.split_length, args.shard_chars
    )
    print(f"wrote {writer.n_records} records ({writer.n_chars:,} bases) into {len(writer.shard_paths)} shard(s)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
