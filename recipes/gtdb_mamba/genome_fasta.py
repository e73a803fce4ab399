"""Genome FASTA -> uint8 base codes: this recipe's side of the one FASTA contract (biorecipes_shared's table).

Codes: A=0, T=1, C=2, G=3, N=4 (IUPAC ambiguity letters count as N). Normalisation: CR/LF dropped, lowercase
upper-cased. Refused, naming file and record: text before the first '>', a file without records, an empty record or
header, `U` (RNA), digits, protein letters. A genome is small (bacteria: ~5 Mbp), so it is decoded whole;
whole-buffer byte operations make a one-line genome cost the same as a wrapped one. `ordered_map` decodes many
genomes on worker processes and hands them back in order (the index builder in `preprocess.py` writes them).
Written by hand because Biopython checks no alphabet and drops text before the first header silently.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

BASE_CODES = {"A": 0, "T": 1, "C": 2, "G": 3}
N_CODE = 4
INVALID_CODE = 255
CODE_LETTERS = "ATCGN"  # code -> letter, for reading the codes back


class GtdbDataError(Exception):
    """A problem with the user's GTDB inputs that stops the run (missing column, no genomes left, ...)."""


class GenomeSkipped(Exception):
    """One genome file cannot be used (message: file, record and problem); the index builder logs it and goes on."""


def _base_lookup_table() -> np.ndarray:
    """ASCII byte -> base code; IUPAC ambiguity letters become N, anything else is invalid."""
    table = np.full(256, INVALID_CODE, dtype=np.uint8)
    for letter in "NRYKMSWBDHV":
        table[ord(letter)] = table[ord(letter.lower())] = N_CODE
    for letter, code in BASE_CODES.items():
        table[ord(letter)] = table[ord(letter.lower())] = code
    return table


BASE_LOOKUP = _base_lookup_table()
_TRANSLATE = BASE_LOOKUP.tobytes()  # bytes.translate runs ~15x faster than numpy fancy indexing with the same table


def read_fasta_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic. Raises GenomeSkipped for a damaged gzip."""
    if not path.is_file():
        raise GenomeSkipped(f"{path}: file not found")
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (gzip.BadGzipFile, zlib.error):
        raise GenomeSkipped(f"{path}: not a gzip file (damaged)") from None
    except EOFError:
        raise GenomeSkipped(f"{path}: truncated gzip file") from None


def _bad_letters(sequence: bytes, codes: np.ndarray) -> str:
    raw = np.frombuffer(sequence, dtype=np.uint8)[codes == INVALID_CODE]
    _, first = np.unique(raw, return_index=True)
    letters = [chr(raw[i]) for i in sorted(first)][:8]  # in order of appearance
    rna = " (U: RNA, not DNA; write T for U)" if "U" in letters else ""
    return ", ".join(map(repr, letters)) + f" not DNA{rna}"


def fasta_records(path: str | Path) -> list[tuple[str, str, np.ndarray]]:
    """(record id, header, codes uint8 (length,)) per record, in file order. Raises GenomeSkipped (one line)."""
    path = Path(path)
    text = read_fasta_bytes(path)
    body = text.lstrip(b"\r\n")
    if not body:
        raise GenomeSkipped(f"{path}: no records (empty file)")
    if not body.startswith(b">"):
        raise GenomeSkipped(f"{path}: text before the first '>' header")
    records = []
    # A record starts at a '>' that begins a line; '>' elsewhere is a bad sequence letter, caught below.
    for number, chunk in enumerate(body[1:].split(b"\n>"), start=1):
        header_bytes, _, sequence = chunk.partition(b"\n")
        header = header_bytes.rstrip(b"\r").decode("utf-8", errors="replace")
        if not header.split():  # a nameless record means a malformed or spliced file: distrust the genome
            raise GenomeSkipped(f"{path}: record {number}: empty FASTA header")
        name = header.split()[0]
        codes = np.frombuffer(sequence.translate(_TRANSLATE, b"\r\n"), dtype=np.uint8)  # one pass: drop CR/LF, code
        if not codes.size:
            raise GenomeSkipped(f"{path}: record {name}: empty (no sequence)")
        if (codes == INVALID_CODE).any():
            letters = sequence.translate(None, b"\r\n")
            raise GenomeSkipped(f"{path}: record {name}: {_bad_letters(letters, codes)}")
        records.append((name, header, codes))
    return records


def read_genome_contigs(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """(contig name, uint8 codes) of a genome FASTA; all-N contigs are dropped. Raises GenomeSkipped (one line)."""
    records = fasta_records(path)
    contigs = [(name, codes) for name, _, codes in records if (codes < N_CODE).any()]
    if not contigs:
        raise GenomeSkipped(f"{path}: no usable sequence: all {len(records)} contig(s) are only N")
    return contigs


# ------------------------------------------------------------------------------------ parallel decoding
def default_index_workers() -> int:
    """Processes for the index build: the usable cores divided among this node's ranks (LOCAL_WORLD_SIZE), >= 1."""
    ranks_on_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, len(os.sched_getaffinity(0)) // ranks_on_node)


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` on `workers` processes, results in item order, at most 2 x workers results held at once.

    The bound keeps memory flat however many genomes there are (`Executor.map` would submit them all up front).
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers) as pool:  # fork: workers only decode bytes and touch no CUDA/torch state
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def decode_genome(path: str) -> tuple[list[int], bytes] | str:
    """Worker: (contig lengths, their codes back to back), or the reason the genome is skipped."""
    try:
        contigs = read_genome_contigs(path)
    except GenomeSkipped as reason:
        return str(reason)
    return [codes.size for _, codes in contigs], b"".join(codes.tobytes() for _, codes in contigs)


def check_genomes_root(genomes_root: str | Path, genome_paths: list[str], probe: int = 20) -> None:
    """Raise GtdbDataError (one line) when `genomes_root` is not a folder or holds none of the first `probe` genome
    files: that is the wrong folder, said once, rather than a warning per genome (a few missing files stay warnings:
    GTDB mirrors are often incomplete)."""
    if not Path(genomes_root).is_dir():
        raise GtdbDataError(f"data.genomes_root={genomes_root}: folder not found")
    paths = genome_paths[:probe]
    if paths and not any(Path(path).is_file() for path in paths):
        raise GtdbDataError(
            f"data.genomes_root={genomes_root}: none of the first {len(paths)} genomes of the split is there "
            f"(e.g. {paths[0]} not found); it should be the `database` folder of gtdb_genomes_reps_rXXX"
        )
