"""Bounded-memory DNA FASTA reader: this recipe's side of the one FASTA contract (biorecipes_shared's table).

The file is read in fixed-size blocks, never line by line, so a chromosome written as one line costs the same memory
as one wrapped at 60 bp, and the chunks it yields are cut at the same bases whatever the line length.
Normalisation: CR and LF are dropped, lowercase (soft-masked) bases are upper-cased. Legal letters are A, C, G, T
and the IUPAC ambiguity codes; alignment gaps (`-`, `.`), `U` (RNA), digits, protein letters and anything else are
refused, and so is a record with an empty header: the same DNA contract as gtdb_mamba's `genome_fasta.py`.
Written by hand because Biopython's parsers hold a whole record (a chromosome) in memory and check no alphabet.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BLOCK_BYTES = 1 << 20  # bytes read per call; bounds memory together with chunk_size
MAX_HEADER_BYTES = 1 << 20  # a longer "header" means a file that is not FASTA (or lost its line ends)
# IUPAC nucleotide codes: legal in a genome FASTA, but not tokens. U is left out on purpose (RNA); gaps ('-', '.')
# too: an assembly has none, so a file with gaps is an alignment, and its columns are not genome positions.
DNA_LETTERS = b"ACGTNRYKMSWBDHV"


class PlantDataError(ValueError):
    """A data directory, FASTA file or sampling setting that cannot be used (message names file and problem)."""


def _upper_table() -> bytes:
    table = bytearray(range(256))
    for letter in range(ord("a"), ord("z") + 1):
        table[letter] = letter - 32
    return bytes(table)


_UPPER = _upper_table()
_LEGAL = np.zeros(256, dtype=bool)
_LEGAL[list(DNA_LETTERS)] = True


def open_fasta(path: Path):
    """Binary handle, gunzipping when the file starts with the gzip magic (whatever its suffix)."""
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _pieces(handle, path: Path) -> Iterator[tuple[bool, bytes]]:
    """(is_header, bytes): whole header lines (without '>' and line end) and raw sequence pieces (with newlines).

    A sequence piece ends at a block end or just before a line that starts with '>', so no piece exceeds one block.
    """
    at_line_start, header = True, None  # header: the bytes of an unfinished header line, else None
    while block := handle.read(BLOCK_BYTES):
        pos = 0
        while pos < len(block):
            if header is not None:
                end = block.find(b"\n", pos)
                header += block[pos : len(block) if end < 0 else end]
                if len(header) > MAX_HEADER_BYTES:
                    raise PlantDataError(f"{path}: a header line longer than {MAX_HEADER_BYTES} bytes: not FASTA")
                if end < 0:
                    break
                yield True, header.rstrip(b"\r")
                header, pos, at_line_start = None, end + 1, True
            elif at_line_start and block[pos] == ord(">"):
                header, pos = b"", pos + 1
            else:
                end = block.find(b"\n>", pos)
                stop = len(block) if end < 0 else end + 1
                yield False, block[pos:stop]
                pos, at_line_start = stop, block[stop - 1] == ord("\n")
    if header is not None:  # last line without a line end
        yield True, header.rstrip(b"\r")


def _check(path: Path, record_id: str, chunk: bytes) -> bytes:
    codes = np.frombuffer(chunk, dtype=np.uint8)
    bad = codes[~_LEGAL[codes]]
    if len(bad):
        _, first = np.unique(bad, return_index=True)
        letters = [int(bad[i]) for i in sorted(first)][:8]  # in order of appearance
        shown = ", ".join(repr(chr(letter)) for letter in letters)
        rna = " (U: RNA, not DNA; write T for U)" if ord("U") in letters else ""
        raise PlantDataError(f"{path}: record {record_id}: {shown} not DNA (A C G T or IUPAC codes){rna}")
    return chunk


def _record_id(path: Path, header: str, number: int) -> str:
    words = header.split(maxsplit=1)
    if not words:  # a nameless record means a spliced or damaged file, and no later message could name it
        raise PlantDataError(f"{path}: record {number}: empty FASTA header")
    return words[0]


def read_fasta(path: str | Path, chunk_size: int) -> Iterator[tuple[str, str, bytes]]:
    """Yield (record id, header, chunk): id = first word of the header line (UTF-8, without '>') and the
    upper-cased DNA of the record in chunks.

    Every chunk of a record holds exactly `chunk_size` bases except its last, so chunk boundaries depend only on
    the sequence, not on how the file is wrapped. Peak memory ~ chunk_size + BLOCK_BYTES, whatever the line length.
    Raises PlantDataError (one line naming the file, and the record where there is one) for: text before the first
    '>', no record, an empty header (`record <n>`, 1-based), an empty record, a non-DNA letter (gaps, U, digits,
    protein letters), a damaged gzip.
    """
    path = Path(path)
    header, record_id, number, buffer, seen = None, "", 0, bytearray(), False

    def finish() -> Iterator[tuple[str, str, bytes]]:
        if header is not None and not seen:
            raise PlantDataError(f"{path}: record {record_id} is empty (no sequence)")
        if buffer:
            yield record_id, header, _check(path, record_id, bytes(buffer))

    try:
        with open_fasta(path) as handle:
            for is_header, piece in _pieces(handle, path):
                if is_header:
                    yield from finish()
                    header, number = piece.decode("utf-8", errors="replace"), number + 1
                    record_id, buffer, seen = _record_id(path, header, number), bytearray(), False
                    continue
                piece = piece.translate(_UPPER, b"\r\n")
                if not piece:
                    continue
                if header is None:
                    raise PlantDataError(f"{path}: text before the first '>' header")
                buffer += piece
                seen = True
                while len(buffer) >= chunk_size:
                    yield record_id, header, _check(path, record_id, bytes(buffer[:chunk_size]))
                    del buffer[:chunk_size]
            yield from finish()
    except (EOFError, OSError, zlib.error) as err:  # truncated or corrupt gzip
        raise PlantDataError(f"{path}: unreadable after record {number}: {' '.join(str(err).split())}") from err
    if number == 0:
        raise PlantDataError(f"{path}: no records (no line starting with '>')")


def stream_chunks(path: str | Path, chunk_size: int) -> Iterator[tuple[str, bytes]]:
    """(record id, chunk) pairs of `read_fasta`."""
    for record_id, _, chunk in read_fasta(path, chunk_size):
        yield record_id, chunk
