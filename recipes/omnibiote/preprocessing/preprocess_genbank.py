"""GenBank flat files (plain or .gz) -> record shards of DNA and RNA sequences.

    python -m preprocessing.preprocess_genbank gbvrl1.seq.gz gbvrl2.seq.gz --out_dir data/records

Each record is streamed with Biopython, labelled DNA or RNA from its source feature's /mol_type (LOCUS molecule
type as fallback), upper-cased, written with T for DNA and U for RNA, and cut at long runs of ambiguous bases
(assembly gaps such as NNNN... carry no signal). A truncated record, a record without sequence (no ORIGIN),
a non-nucleotide character or an empty file stops the run with the file and record named; no shard is left behind.
The input is cut into blocks of whole records (at `LOCUS` lines) that `--num_proc` workers parse, normalise and
compress; blocks are written in input order, so the shards are byte-identical for any process count.
"""

import argparse
import io
import re
import sys
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from Bio import BiopythonParserWarning
from Bio.GenBank.Scanner import GenBankScanner
from Bio.Seq import UndefinedSequenceError
from tqdm import tqdm

from errors import PreprocessError, run_cli
from preprocessing.parallel import default_num_proc, ordered_map, record_blocks
from preprocessing.shards import ShardWriter, encode_member

IUPAC_NUCLEOTIDES = frozenset("ACGTURYSWKMBDHVN")
UNAMBIGUOUS = {"dna": "ACGT", "rna": "ACGU"}
# Biopython only warns about these; for us they mean the file was cut short or its LOCUS length is wrong.
TRUNCATION_WARNINGS = ("Premature end", "Expected sequence length")
# What Biopython's GenBank scanner raises on malformed text (fuzzing the sample record: ValueError with the quoted
# text on its second line, bare AssertionError, IndexError).
PARSER_FAILURES = (ValueError, AssertionError, IndexError, KeyError, TypeError, AttributeError)
LOCUS_START = GenBankScanner.RECORD_START  # "LOCUS" + 7 spaces: anything else is skipped by Biopython


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


class LineTracker:
    """A text handle that remembers where the parser is: lines read, the last one, and the current LOCUS line.

    Biopython's errors name neither the record nor (mostly) the line; this lets ours name both."""

    def __init__(self, handle, first_line: int = 0):
        self.handle, self.line_no, self.line = handle, first_line, ""
        self.n_locus, self.locus, self.locus_line_no, self.foreign_locus = 0, "", 0, None

    def readline(self) -> str:
        line = self.handle.readline()
        if line:
            self.line_no, self.line = self.line_no + 1, line
            if line.startswith("LOCUS"):  # where record_blocks starts a record
                self.n_locus, self.locus, self.locus_line_no = self.n_locus + 1, line.rstrip("\r\n"), self.line_no
                if not line.startswith(LOCUS_START) and self.foreign_locus is None:
                    self.foreign_locus = (self.n_locus, self.line_no, self.locus)
        return line


def _record_error(path, first_record: int, where: LineTracker, problem: str, line: str | None = None):
    """PreprocessError (one line) naming file, record (number in the file and LOCUS name), line and problem."""
    words = where.locus.split()
    name = f" ({words[1]})" if len(words) > 1 else ""
    shown = (where.line if line is None else line).rstrip("\r\n")
    shown = f": {shown if len(shown) <= 160 else shown[:160] + '...'!r}" if shown else ""
    number = first_record + max(where.n_locus, 1)
    return PreprocessError(f"{path}: record {number}{name}, near line {where.line_no}: {problem}{shown}")


def _biopython_error(path, first_record: int, where: LineTracker, exc: Exception) -> PreprocessError:
    """Biopython's message as problem (its first line) and quoted text (its other lines, else the line being read;
    nothing more where the first line already quotes it)."""
    head, _, quoted = str(exc).partition("\n")
    problem = head.strip().rstrip(":") or f"the parser failed ({type(exc).__name__})"
    line = " / ".join(part.strip() for part in quoted.splitlines() if part.strip()) if quoted else None
    if where.line.startswith("LOCUS") and line is None:
        problem = f"bad LOCUS line ({problem})"
    elif line is None and where.line.strip() and where.line.strip() in problem:
        line = ""
    return _record_error(path, first_record, where, problem, line)


def iter_genbank_records(handle, path, first_record: int = 0, first_line: int = 0) -> Iterator[tuple[str, str, str]]:
    """Yield (modality, record_id, raw_sequence) for each record read from handle; PreprocessError (one line naming
    file, record, line and problem) on a malformed one. first_record/first_line: records/lines before the handle."""
    where = LineTracker(handle, first_line)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BiopythonParserWarning)
        records = GenBankScanner(debug=0).parse_records(where)
        while True:
            try:
                record = next(records)
            except StopIteration:
                record = None
            except PARSER_FAILURES as exc:  # what Biopython raises on broken text (incl. bare asserts, indexing)
                raise _biopython_error(path, first_record, where, exc) from None
            if where.foreign_locus:  # Biopython skips such a record as "header" text, silently
                where.n_locus, where.line_no, where.locus = where.foreign_locus
                problem = "LOCUS line not in GenBank layout ('LOCUS' and 7 spaces; Biopython would skip the record)"
                raise _record_error(path, first_record, where, problem, where.locus)
            if record is None:
                break
            truncated = [str(w.message) for w in caught if str(w.message).startswith(TRUNCATION_WARNINGS)]
            caught.clear()
            if truncated:
                premature = [w for w in truncated if w.startswith("Premature end")]  # a cut file also mismatches
                problem = (premature or truncated)[-1].splitlines()[0].rstrip(". ")
                if not premature:  # only the length differs from what the LOCUS line states
                    where.line_no = where.locus_line_no
                    raise _record_error(
                        path, first_record, where, f"length differs from LOCUS ({problem})", where.locus
                    )
                raise _record_error(path, first_record, where, f"truncated ({problem})")
            try:
                sequence = str(record.seq)
            except UndefinedSequenceError:
                raise _record_error(path, first_record, where, "no sequence (missing ORIGIN section)") from None
            if not sequence:
                raise _record_error(path, first_record, where, "empty sequence")
            yield molecule_modality(record), record.id, sequence


def encode_genbank_block(
    path, first_record: int, first_line: int, block: bytes, settings: dict
) -> tuple[str, bytes, int, int, int]:
    """(path, gzip member of shard lines, pieces, bases, input records) of one block of whole GenBank records."""
    # errors="replace": free-text annotations may hold stray Latin-1 bytes; ids and sequence are ASCII
    handle = io.StringIO(block.decode("utf-8", errors="replace"))
    pieces, n_input = [], 0
    for modality, record_id, raw in iter_genbank_records(handle, path, first_record, first_line):
        n_input += 1
        sequence = normalise_nucleotides(raw, modality, f"{path}: record {record_id}")
        split = split_at_ambiguous_runs(sequence, modality, **settings)
        pieces += [(modality, record_id if len(split) == 1 else f"{record_id}/{i}", p) for i, p in enumerate(split)]
    member, _, n_chars = encode_member(pieces)
    return str(path), member, len(pieces), n_chars, n_input


def _units(inputs):
    """(path, records before, lines before, block): line counts let errors name a line of the file."""
    for path in inputs:
        lines = 0
        for first_record, block in record_blocks(path, b"LOCUS"):
            yield path, first_record, lines, block
            lines += block.count(b"\n")


def preprocess_genbank(
    inputs: list[str | Path],
    out_dir: str | Path,
    max_ambiguous_run: int = 10,
    min_length: int = 32,
    split_length: int = 0,
    shard_chars: int = 100_000_000,
    num_proc: int = 1,
) -> ShardWriter:
    """Parse every GenBank input into `genbank_NNNNN.tsv.gz` record shards under out_dir; returns the writer."""
    settings = dict(max_run=max_ambiguous_run, min_length=min_length, split_length=split_length)
    work = partial(encode_genbank_block, settings=settings)
    per_file = dict.fromkeys(map(str, inputs), 0)
    bar = tqdm(desc="genbank blocks", unit=" block", disable=None)
    with ShardWriter(out_dir, "genbank", max_chars=shard_chars) as writer, bar:
        for path, member, n_pieces, n_chars, n_input in ordered_map(work, _units(inputs), num_proc):
            writer.add_member(member, n_pieces, n_chars)
            per_file[path] += n_input
            bar.update()
        empty = [path for path, count in per_file.items() if count == 0]
        if empty:
            raise PreprocessError(f"{empty[0]}: no GenBank records found (expected LOCUS ... // entries)")
    return writer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="GenBank flat files, plain or gzip")
    parser.add_argument("--out_dir", required=True, help="folder for genbank_NNNNN.tsv.gz record shards")
    parser.add_argument("--max_ambiguous_run", type=int, default=10, help="cut at runs of this many ambiguous bases")
    parser.add_argument("--min_length", type=int, default=32, help="drop pieces shorter than this")
    parser.add_argument("--split_length", type=int, default=0, help="cut pieces into windows this long (0: off)")
    parser.add_argument("--shard_chars", type=int, default=100_000_000, help="bases per shard (about)")
    parser.add_argument("--num_proc", type=int, default=default_num_proc(), help="worker processes (default: all)")
    args = parser.parse_args(argv)
    writer = preprocess_genbank(
        args.inputs, args.out_dir, args.max_ambiguous_run, args.min_length, args.split_length, args.shard_chars,
        args.num_proc,
    )  # fmt: skip
    print(f"wrote {writer.n_records} records ({writer.n_chars:,} bases) into {len(writer.shard_paths)} shard(s)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
