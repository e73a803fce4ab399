"""UniProt / UniRef FASTA (plain or .gz) -> record shards of peptides, on every core.

    python -m preprocessing.preprocess_uniprot uniref100.fasta.gz --out_dir data/records --num_proc 32

Reading follows the repo's FASTA contract (preprocessing/fasta.py): sequences are upper-cased and a trailing stop
`*` is dropped; UTF-8 headers are kept (the record id is the header's first word). A character outside the
amino-acid alphabet, an empty record, text before the first `>` or an empty file stops the run with the file and
record named (or, with --skip_invalid, bad records are counted and skipped); no shard or folder is left behind
on error. The input is cut into blocks of whole records that `--num_proc` workers parse and compress; blocks are
written in input order, so the shards are byte-identical for any process count.
"""

import argparse
import sys
from functools import partial
from pathlib import Path

from tqdm import tqdm

from errors import run_cli
from preprocessing.fasta import AMINO_ACIDS, fasta_blocks, parse_fasta_block, read_fasta
from preprocessing.parallel import default_num_proc, ordered_map
from preprocessing.shards import ShardWriter, encode_member

__all__ = ["AMINO_ACIDS", "preprocess_uniprot", "read_fasta"]


def encode_fasta_block(path, first_record: int, block: bytes, skip_invalid: bool) -> tuple[bytes, int, int, int]:
    """(gzip member of shard lines, records, residues, skipped) of one block: one worker's unit of work."""
    records, skipped = parse_fasta_block(path, first_record, block, skip_invalid)
    member, n_records, n_chars = encode_member(("protein", record_id, seq) for record_id, _, seq in records)
    return member, n_records, n_chars, skipped


def _units(inputs):
    for path in inputs:
        for first_record, block in fasta_blocks(path):
            yield path, first_record, block


def preprocess_uniprot(
    inputs: list[str | Path],
    out_dir: str | Path,
    skip_invalid: bool = False,
    shard_chars: int = 100_000_000,
    num_proc: int = 1,
) -> tuple[ShardWriter, int]:
    """Parse FASTA inputs into `uniprot_NNNNN.tsv.gz` shards; returns the writer and the number of skipped records."""
    n_skipped = 0
    work = partial(encode_fasta_block, skip_invalid=skip_invalid)
    bar = tqdm(desc="proteins", unit=" rec", mininterval=5, disable=None)
    with ShardWriter(out_dir, "uniprot", max_chars=shard_chars) as writer, bar:
        for member, n_records, n_chars, skipped in ordered_map(work, _units(inputs), num_proc):
            writer.add_member(member, n_records, n_chars)
            n_skipped += skipped
            bar.update(n_records + skipped)
    return writer, n_skipped


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="protein FASTA files, plain or gzip")
    parser.add_argument("--out_dir", required=True, help="folder for uniprot_NNNNN.tsv.gz record shards")
    parser.add_argument(
        "--skip_invalid", action="store_true", help="skip (and count) invalid records instead of failing"
    )
    parser.add_argument("--shard_chars", type=int, default=100_000_000, help="residues per shard (about)")
    parser.add_argument("--num_proc", type=int, default=default_num_proc(), help="worker processes (default: all)")
    args = parser.parse_args(argv)
    writer, n_skipped = preprocess_uniprot(
        args.inputs, args.out_dir, args.skip_invalid, args.shard_chars, args.num_proc
    )
    print(
        f"wrote {writer.n_records} records ({writer.n_chars:,} residues) into {len(writer.shard_paths)} shard(s);"
        f" skipped {n_skipped} invalid record(s)"
    )


if __name__ == "__main__":
    sys.exit(run_cli(main))
