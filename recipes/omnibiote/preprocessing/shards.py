"""Record shards: the text format between the parsers (GenBank, UniProt) and the tokenizer/encoder.

One gzip-compressed UTF-8 TSV line per record: `modality<TAB>record_id<TAB>SEQUENCE`, modality one of MODALITIES.
A shard is a series of gzip members, one per block of records, each compressed by the worker that parsed the block
(gzip readers read concatenated members as one stream), so the main process only appends bytes.
A ShardWriter writes into a hidden temp folder and moves the shards into place only when the whole input
was read without error, so a failed run never leaves partial shards behind. A cut or corrupt gzip input is a
PreprocessError naming the file, not a zlib/EOF traceback.
"""

import gzip
import io
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from errors import PreprocessError

MODALITIES = ("dna", "rna", "protein")
GZIP_MAGIC = b"\x1f\x8b"


class _CheckedGzipFile(gzip.GzipFile):
    """GzipFile whose reads raise PreprocessError on a cut or damaged stream; the errors only show up mid-read
    (EOFError at a missing end, BadGzipFile on a CRC/length mismatch, zlib.error on bad deflate data)."""

    def _checked(self, method, *args):
        try:
            return method(*args)
        except (EOFError, gzip.BadGzipFile, zlib.error):
            raise PreprocessError(f"{self.name}: truncated or corrupt gzip") from None

    def read(self, size=-1):
        return self._checked(super().read, size)

    def read1(self, size=-1):
        return self._checked(super().read1, size)

    def readline(self, size=-1):
        return self._checked(super().readline, size)

    def peek(self, n):
        return self._checked(super().peek, n)

    def seek(self, offset, whence=io.SEEK_SET):
        return self._checked(super().seek, offset, whence)


def open_text(path: str | Path, errors: str = "strict") -> io.TextIOBase:
    """Open a plain or gzip UTF-8 text file for reading; gzip is detected from the magic bytes, not the name.

    errors="strict" raises UnicodeDecodeError on bytes that are not UTF-8 (the caller names the file);
    "replace" suits formats whose free text may hold stray Latin-1 (GenBank annotations)."""
    path = Path(path)
    if not path.is_file():
        raise PreprocessError(f"{path}: no such file")
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == GZIP_MAGIC:
        return io.TextIOWrapper(_CheckedGzipFile(path, "rb"), encoding="utf-8", errors=errors, newline=None)
    return open(path, encoding="utf-8", errors=errors, newline=None)


def encode_member(records: Iterable[tuple[str, str, str]]) -> tuple[bytes, int, int]:
    """(one gzip member of shard lines, records, residues) for (modality, record_id, sequence) records.

    mtime=0 keeps the bytes independent of when they were written (identical output at any process count)."""
    lines, n_records, n_chars = [], 0, 0
    for modality, record_id, sequence in records:
        if modality not in MODALITIES:
            raise PreprocessError(f"record {record_id}: unknown modality '{modality}'")
        lines.append(f"{modality}\t{record_id.replace(chr(9), ' ')}\t{sequence}\n")
        n_records += 1
        n_chars += len(sequence)
    return gzip.compress("".join(lines).encode("utf-8"), compresslevel=3, mtime=0), n_records, n_chars


class ShardWriter:
    """Writes records into `<out_dir>/<prefix>_NNNNN.tsv.gz` shards of about `max_chars` residues each."""

    def __init__(self, out_dir: str | Path, prefix: str, max_chars: int = 100_000_000):
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.max_chars = max_chars
        self.n_records = 0
        self.n_chars = 0
        self.shard_paths: list[Path] = []
        self._file = None
        self._chars_in_shard = 0

    def __enter__(self) -> "ShardWriter":
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise PreprocessError(f"{self.out_dir}: exists and is not a folder; choose another --out_dir")
        existing = sorted(self.out_dir.glob(f"{self.prefix}_*.tsv.gz"))
        if existing:  # never overwrite what the user already has
            raise PreprocessError(
                f"{existing[0]}: shards with prefix '{self.prefix}' already exist; use a new --out_dir"
            )
        self._made_dirs = [p for p in (self.out_dir, *self.out_dir.parents) if not p.exists()]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{self.prefix}-", dir=self.out_dir))
        return self

    def add_member(self, member: bytes, n_records: int, n_chars: int) -> None:
        """Append one gzip member from encode_member; a new shard starts when the current one is full."""
        if not n_records:
            return
        if self._file is None or self._chars_in_shard >= self.max_chars:
            self._open_next_shard()
        self._file.write(member)
        self._chars_in_shard += n_chars
        self.n_records += n_records
        self.n_chars += n_chars

    def add(self, modality: str, record_id: str, sequence: str) -> None:
        """Append one record (as its own gzip member: for small inputs and tests; blocks use add_member)."""
        self.add_member(*encode_member([(modality, record_id, sequence)]))

    def _open_next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        path = self._tmp_dir / f"{self.prefix}_{len(self.shard_paths):05d}.tsv.gz"
        self.shard_paths.append(path)
        self._file = open(path, "wb")  # noqa: SIM115 (closed in __exit__)
        self._chars_in_shard = 0

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._file is not None:
            self._file.close()
        try:
            if exc_type is None and self.n_records == 0:
                raise PreprocessError("no records were written: the input held no usable sequences")
            if exc_type is None:
                final_paths = []
                for path in self.shard_paths:
                    final = self.out_dir / path.name
                    os.replace(path, final)
                    final_paths.append(final)
                self.shard_paths = final_paths
        except BaseException:
            exc_type = exc_type or PreprocessError
            raise
        finally:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            if exc_type is not None:
                remove_empty_dirs(self._made_dirs)
        return False


def remove_empty_dirs(made: list[Path]) -> None:
    """Remove the folders a failed run created (deepest first), so an error leaves no empty output folder."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (the user put something there meanwhile) or already gone
            return


def iter_shard_records(paths: Iterable[str | Path]) -> Iterator[tuple[str, str, str]]:
    """Yield (modality, record_id, sequence) from record shards, checking each line's shape."""
    for path in paths:
        line_number = 0
        try:
            with open_text(path) as handle:
                for line_number, line in enumerate(handle, start=1):
                    yield parse_shard_line(line, path, line_number)
        except UnicodeDecodeError:
            raise PreprocessError(f"{path}: line {line_number + 1} is not UTF-8 text; not a record shard") from None


def parse_shard_line(line: str, path, line_number: int) -> tuple[str, str, str]:
    """(modality, record_id, sequence) of one shard line; PreprocessError naming file and line otherwise."""
    fields = line.rstrip("\n").split("\t")
    if len(fields) != 3 or fields[0] not in MODALITIES or not fields[2]:
        raise PreprocessError(f"{path}:{line_number}: not a record shard line (modality, id, sequence)")
    return fields[0], fields[1], fields[2]
