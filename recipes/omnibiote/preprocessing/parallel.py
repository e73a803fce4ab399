"""Work split into deterministic units, run on every core, results taken in input order.

A unit is a block of whole records cut from the decompressed input by a byte search in the main process (cheap);
workers parse, check and encode their block (the expensive part). Because units do not depend on the process
count and results are consumed in unit order, the output is byte-identical for any --num_proc.
"""

import gzip
import multiprocessing
import os
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from errors import PreprocessError

GZIP_MAGIC = b"\x1f\x8b"
READ_SIZE = 1 << 22  # bytes per read of the decompressed input
BLOCK_BYTES = 1 << 23  # a unit of work: whole records, cut at the first record start after this many bytes


def default_num_proc() -> int:
    """The cores this process may use (honours taskset / cgroup CPU sets, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def open_binary(path: str | Path):
    """Binary handle on the decompressed content (gzip detected by its magic bytes); PreprocessError if missing."""
    path = Path(path)
    if not path.is_file():
        raise PreprocessError(f"{path}: no such file")
    with open(path, "rb") as probe:
        magic = probe.read(2)
    return gzip.open(path, "rb") if magic == GZIP_MAGIC else open(path, "rb")  # noqa: SIM115 (caller closes)


def record_blocks(path: str | Path, record_start: bytes, block_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(records before the block, block) for blocks of whole records of about block_bytes; a record begins where
    `record_start` starts a line (b"": blocks of whole lines, counted in lines). Text before the first record stays at the head of the first block (the parser
    judges it). Memory: one block plus one read. A cut or corrupt gzip is a PreprocessError naming the file.
    """
    separator = b"\n" + record_start
    block_bytes = block_bytes or BLOCK_BYTES
    done = 0
    try:
        with open_binary(path) as handle:
            buf = b""
            while True:
                data = handle.read(READ_SIZE)
                buf += data
                while buf and (len(buf) > block_bytes or not data):
                    cut = buf.find(separator, block_bytes) if len(buf) > block_bytes else -1
                    if cut < 0 and data:
                        break  # the next record start is not read yet
                    block, buf = (buf[: cut + 1], buf[cut + 1 :]) if cut >= 0 else (buf, b"")
                    yield done, block
                    done += block.count(separator) + (bool(record_start) and block.startswith(record_start))
                if not data:
                    return
    except (EOFError, OSError, zlib.error):
        raise PreprocessError(f"{path}: truncated or corrupt gzip") from None


def ordered_map(work: Callable, units: Iterable, num_proc: int) -> Iterator:
    """work(*unit) for each unit, yielded in unit order; num_proc > 1 runs them in a process pool.

    At most num_proc + 1 units are in flight, so memory stays bounded. An error raised while producing units (the
    reader) surfaces only after the units before it, so the first problem in the input is the one reported, as in
    one process.
    """
    if num_proc < 1:
        raise PreprocessError(f"--num_proc must be at least 1, got {num_proc}")
    units = iter(units)
    if num_proc == 1:
        for unit in units:
            yield work(*unit)
        return
    # fork: workers inherit the loaded modules and tokenizer; spawn would re-import them in every worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(method)) as pool:
        pending = deque()
        try:
            while True:
                try:
                    unit = next(units)
                except StopIteration:
                    break
                except PreprocessError:
                    while pending:
                        yield pending.popleft().result()
                    raise
                pending.append(pool.submit(work, *unit))
                if len(pending) > num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
