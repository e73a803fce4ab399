"""Protein FASTA reader under the repo's FASTA contract (`biorecipes_shared/fasta_contract.json`).

Blank lines before the first header are skipped; other text before the first '>' is an error, as is a file without
records, a record without residues and a character outside AMINO_ACIDS. Normalised on purpose: lower -> upper case,
CRLF line ends, spaces in sequence lines, one trailing '*' (stop). Headers are UTF-8 and kept as written.
Hand-written rather than Bio.SeqIO: Biopython checks none of this, and one split per block of records is faster
than its per-line loop.
"""

from collections.abc import Iterator
from pathlib import Path

from errors import PreprocessError
from preprocessing.parallel import record_blocks

# The 20 standard residues plus IUPAC/UniProt codes: B, Z ambiguity, J (I/L), U selenocysteine, O pyrrolysine, X unknown.
AMINO_ACIDS = frozenset("ACDEFGHIKLMNPQRSTVWYBJOUXZ")
_AMINO_BYTES = "".join(sorted(AMINO_ACIDS)).encode("ascii")


def parse_fasta_block(
    path: str | Path, first_record: int, block: bytes, skip_invalid: bool = False
) -> tuple[list[tuple[str, str, str]], int]:
    """([(record_id, title, sequence)], records skipped) for one block from fasta_blocks.

    PreprocessError names the file and the record; with skip_invalid, records with bad residues or none at all
    are counted and left out instead (text before the first '>' and undecodable bytes still stop the run).
    """
    if first_record == 0:
        block = block.lstrip()
        if not block:
            raise PreprocessError(f"{path}: no records (empty file)")
        if not block.startswith(b">"):
            line = block.split(b"\n", 1)[0][:40].decode("utf-8", errors="replace").strip()
            raise PreprocessError(f"{path}: text before the first '>' ({line!r}); not a FASTA file?")
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PreprocessError(f"{path}: not UTF-8 text after record {first_record} ({exc.reason})") from None
    records, skipped = [], 0
    for number, entry in enumerate(text[1:].split("\n>"), start=first_record + 1):
        title, _, body = entry.partition("\n")
        title = title.strip()
        record_id = title.split(maxsplit=1)[0] if title else f"record#{number}"
        sequence = body.replace("\n", "").replace("\r", "").replace(" ", "")
        problem = _problem(sequence)
        if problem is None:
            # non-ASCII letters are refused above, so upper() cannot turn one into valid letters (e.g. 'ß' -> 'SS')
            sequence = sequence.upper()
            records.append((record_id, title, sequence[:-1] if sequence.endswith("*") else sequence))
        elif skip_invalid:
            skipped += 1
        else:
            raise PreprocessError(f"{path}: record {record_id}: {problem}")
    return records, skipped


def _problem(sequence: str) -> str | None:
    """What is wrong with a raw sequence (before upper-casing), or None."""
    core = sequence[:-1] if sequence.endswith("*") else sequence
    if not core:
        return "empty record (no residues)"
    if core.isascii():
        letters = sorted(set(core.upper().encode("ascii").translate(None, _AMINO_BYTES).decode("ascii")))
    else:
        letters = sorted({c for c in core if not (c.isascii() and c.upper() in AMINO_ACIDS)})
    if letters:
        return f"invalid amino-acid character(s) {''.join(letters)!r}"
    return None


def fasta_blocks(path: str | Path, block_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Blocks of whole FASTA records (see preprocessing.parallel.record_blocks); an empty file is an error."""
    blocks = record_blocks(path, b">", block_bytes)
    first = next(blocks, None)
    if first is None:
        raise PreprocessError(f"{path}: no records (empty file)")
    yield first
    yield from blocks


def read_fasta(path: str | Path, skip_invalid: bool = False) -> Iterator[tuple[str, str, str]]:
    """(record_id, title, normalised sequence) of each record, streaming; PreprocessError on bad input."""
    for first_record, block in fasta_blocks(path):
        yield from parse_fasta_block(path, first_record, block, skip_invalid)[0]
