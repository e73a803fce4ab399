"""Streaming protein FASTA reader (plain or gzip) that cuts the input into blocks of whole records.

The blocks are the unit of parallel preprocessing: the main process only finds record starts (a C-level byte
search), workers decode, parse and validate their block. The same code path serves one process, so the records,
their normalisation and the errors are identical at any process count.

The FASTA contract (`biorecipes_shared/fasta_contract.json`, one for every recipe): blank lines before the header
are skipped; any other text before the first '>' is an error, as is a file without records, a record without
residues and any character outside VALID_RESIDUES. Normalised on purpose: lower case -> upper case, CRLF line ends,
spaces inside sequence lines, one trailing '*' (stop codon). Headers are UTF-8 and kept as written.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Residue letters accepted in input (after upper-casing). Gap symbols '.' and '-' are not protein residues.
VALID_RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"
_VALID_BYTES = VALID_RESIDUES.encode("ascii")
_READ_SIZE = 1 << 22  # bytes per read of the (decompressed) input: large reads keep the byte search in C


class FastaError(ValueError):
    """The input FASTA cannot be used; the message names the file, the record and the problem."""


def _open_binary(path: Path):
    """A binary handle of the decompressed content; gzip is detected by its magic bytes, not the name."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")  # noqa: SIM115 (caller closes)


@dataclass(frozen=True)
class Span:
    """Bytes [start, end) of an uncompressed FASTA file: a block a worker reads itself (`read_span`), so the main
    process need not copy and send it."""

    start: int
    end: int


def read_span(path: str | Path, span: Span) -> bytes:
    """The bytes of `span` in the file at `path`."""
    with open(path, "rb") as handle:
        handle.seek(span.start)
        return handle.read(span.end - span.start)


def record_blocks(path: str | Path, records_per_block: int, spans: bool = False) -> Iterator[tuple[int, bytes | Span]]:
    """Yield (records before this block, bytes of the next `records_per_block` whole records), streaming; with
    spans=True and an uncompressed file, a `Span` of the file instead of the bytes (gzip input always gives bytes).

    Memory: one block plus one read (4 MiB). Errors (FastaError): missing file, text before the first '>',
    no records, truncated or corrupt gzip.
    """
    path = Path(path)
    if not path.is_file():
        raise FastaError(f"{path}: no such file")
    if records_per_block < 1:
        raise FastaError("records per block must be positive")
    done = 0
    try:
        with _open_binary(path) as handle:
            as_spans = spans and not isinstance(handle, gzip.GzipFile)
            # A bytearray: appending and dropping the front do not copy what stays (CPython moves its start).
            buf = bytearray(_skip_to_first_header(path, handle))
            base = handle.tell() - len(buf) if as_spans else 0  # file offset of buf[0]
            starts, scanned = _record_starts(buf, 0), len(buf) - 1  # record starts after buf's first record
            while True:
                if len(starts) >= records_per_block:
                    cut = int(starts[records_per_block - 1])
                    if as_spans:
                        block = Span(base, base + cut)
                        base += cut
                    else:
                        with memoryview(buf) as view:
                            block = bytes(view[:cut])  # one copy (slicing the bytearray first would make two)
                    yield done, block
                    done += records_per_block
                    del buf[:cut]
                    starts, scanned = starts[records_per_block:] - cut, scanned - cut
                    continue
                data = handle.read(_READ_SIZE)
                if not data:
                    break
                buf += data
                starts = np.concatenate([starts, _record_starts(buf, scanned)])
                scanned = len(buf) - 1  # a '\n' at the very end may precede the '>' of the next read
            if buf:
                yield done, Span(base, base + len(buf)) if as_spans else bytes(buf)
    except (EOFError, OSError, zlib.error) as err:
        raise FastaError(f"{path}: truncated or corrupt gzip after record {done} ({err})") from err


def _record_starts(buf: bytes | bytearray, start: int) -> np.ndarray:
    """Offsets p > start with buf[p - 1 : p + 1] == b"\\n>": a vectorised search instead of a find() per record."""
    view = np.frombuffer(buf, np.uint8, offset=start)
    return np.flatnonzero((view[:-1] == 10) & (view[1:] == 62)) + start + 1


def _skip_to_first_header(path: Path, handle) -> bytes:
    """The input from its first '>' on (leading blank lines dropped); FastaError for other leading text."""
    data = handle.read(_READ_SIZE)
    while data and not data.lstrip():
        data = handle.read(_READ_SIZE)
    data = data.lstrip()
    if not data:
        raise FastaError(f"{path}: no records (empty file)")
    if not data.startswith(b">"):
        line = data.split(b"\n", 1)[0][:40].decode("utf-8", errors="replace").strip()
        raise FastaError(f"{path}: text before the first '>' ({line!r}); not a FASTA file?")
    return data


def parse_block(path: str | Path, first_record: int, data: bytes) -> list[tuple[str, str]]:
    """(header incl. '>', normalised residues) of every record in one block from record_blocks.

    `first_record` is the number of records before the block, so errors carry the record's number in the file.
    Hand-written rather than Bio.SeqIO: one split per block instead of Python work per line, and the contract's
    checks (which Biopython does not make) on the joined residues of the whole block at once.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FastaError(f"{path}: not UTF-8 text after record {first_record} ({err.reason})") from err
    records = []
    for entry in text[1:].split("\n>"):
        title, _, body = entry.partition("\n")
        residues = body.replace("\n", "").replace("\r", "").replace(" ", "")
        # Non-ASCII letters stay as written so the check names them ('ß'.upper() would become a valid "SS").
        residues = residues.upper() if residues.isascii() else residues
        records.append((">" + title.rstrip(), residues[:-1] if residues.endswith("*") else residues))
    joined = "".join(seq for _, seq in records).encode("utf-8")
    if joined.translate(None, _VALID_BYTES) or not all(seq for _, seq in records):
        for number, (header, seq) in enumerate(records, start=first_record + 1):
            _check_record(path, number, header, seq)
    return records


def _check_record(path, number: int, header: str, seq: str) -> None:
    where = f"{path}: record {number} ({header[:60]})"
    if not seq:
        raise FastaError(f"{where}: empty record, no residues")
    bad = seq.encode("utf-8").translate(None, _VALID_BYTES)
    if bad:
        char = bad.decode("utf-8", errors="replace")[0]
        pos = seq.index(char) + 1
        what = "stop codon '*' inside the sequence" if char == "*" else f"invalid residue {char!r}"
        raise FastaError(f"{where}: {what} at position {pos}")


def read_fasta(path: str | Path, records_per_block: int = 10_000) -> Iterator[tuple[str, str]]:
    """Yield (header incl. '>', normalised residues) per record, streaming; raise FastaError on bad input."""
    for first_record, block in record_blocks(path, records_per_block):
        yield from parse_block(path, first_record, block)
