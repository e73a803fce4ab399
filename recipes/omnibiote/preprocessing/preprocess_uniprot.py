"""UniProt / UniRef FASTA (plain or .gz) -> record shards of peptides.

    python -m preprocessing.preprocess_uniprot uniref100.fasta.gz --out_dir data/records

Sequences are upper-cased and a trailing stop `*` is dropped. A character outside the amino-acid alphabet,
an empty record, text before the first `>` or an empty file stops the run with the file and record named
(or, with --skip_invalid, the bad record is counted and skipped); no shard is left behind on error.
"""

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from Bio.SeqIO.FastaIO import SimpleFastaParser
from tqdm import tqdm

from errors import PreprocessError, run_cli
from preprocessing.shards import ShardWriter, open_text

# The 20 standard residues plus IUPAC/UniProt codes: B, Z ambiguity, J (I/L), U selenocysteine, O pyrrolysine, X unknown.
AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWYBJOUXZ")


def normalise_peptide(sequence: str, where: str) -> str:
    """Upper-case, drop a trailing stop '*', and raise on any character outside AMINO_ACIDS."""
    sequence = sequence.upper().rstrip("*")
    if not sequence:
        raise PreprocessError(f"{where}: empty sequence")
    invalid = set(sequence) - AMINO_ACIDS
    if invalid:
        raise PreprocessError(f"{where}: invalid amino-acid character(s) {''.join(sorted(invalid))!r}")
    return sequence


def iter_fasta_file(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (record_id, raw_sequence) from one FASTA file; raise when the file is not FASTA or has no records."""
    n_records = 0
    with open_text(path) as handle:
        first_line = ""
        for first_line in handle:
            if first_line.strip():
                break
        if not first_line.startswith(">"):
            # SimpleFastaParser would silently return nothing for such a file
            raise PreprocessError(f"{path}: not FASTA (the first non-empty line does not start with '>')")
        handle.seek(0)
        for title, sequence in SimpleFastaParser(handle):
            n_records += 1
            record_id = title.split(maxsplit=1)[0] if title.strip() else f"record#{n_records}"
            yield record_id, sequence
    if n_records == 0:
        raise PreprocessError(f"{path}: no FASTA records found")


def preprocess_uniprot(
    inputs: list[str | Path], out_dir: str | Path, skip_invalid: bool = False, shard_chars: int = 100_000_000
) -> tuple[ShardWriter, int]:
    """Parse FASTA inputs into `uniprot_NNNNN.tsv.gz` shards; returns the writer and the number of skipped records."""
    n_skipped = 0
    with ShardWriter(out_dir, "uniprot", max_chars=shard_chars) as writer:
        for path in tqdm(inputs, desc="fasta files", unit="file", disable=len(inputs) < 2):
            for record_id, raw in iter_fasta_file(path):
                try:
                    sequence = normalise_peptide(raw, f"{path}: record {record_id}")
                except PreprocessError:
                    if not skip_invalid:
                        raise
                    n_skipped += 1
                    continue
                writer.add("protein", record_id, sequence)
    return writer, n_skipped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="protein FASTA files, plain or gzip")
    parser.add_argument("--out_dir", required=True, help="folder for uniprot_NNNNN.tsv.gz record shards")
    parser.add_argument(
        "--skip_invalid", action="store_true", help="skip (and count) invalid records instead of failing"
    )
    parser.add_argument("--shard_chars", type=int, default=100_000_000, help="residues per shard")
    args = parser.parse_args(argv)
    writer, n_skipped = preprocess_uniprot(args.inputs, args.out_dir, args.skip_invalid, args.shard_chars)
    print(
        f"wrote {writer.n_records} records ({writer.n_chars:,} residues) into {len(writer.shard_paths)} shard(s);"
        f" skipped {n_skipped} invalid record(s)"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
