"""Atomic writes: an output exists under its real name only when it is complete.

Every recipe writes files the next stage (or the next requeue of the same job) trusts: shards, metadata, checkpoints,
exported models. A crash, a kill -9 or a full disk must never leave a half-written file under the real name. So
everything is written under a temporary name in the same directory, fsynced, and renamed (atomic on POSIX); on any
error the temporary file is removed and the error becomes one `WriteError` line naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "WriteError",
    "atomic_dir",
    "atomic_write",
    "atomic_write_json",
    "describe_write_error",
    "fsync_dir",
    "write_failure_reason",
]

TMP_PREFIX = ".tmp-"

# Phrases torch's C++ writer (PytorchStreamWriter) uses when the disk fills up: it raises RuntimeError, not OSError.
_TORCH_WRITE_FAILURES = ("file write failed", "unexpected pos", "iostream error", "PytorchStreamWriter failed")


_NO_SPACE = "no space left on device (free some space or choose another output directory)"


class WriteError(RuntimeError):
    """An output could not be written (full disk, no permission, read-only file system); one line, path and cause."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def write_failure_reason(err: BaseException, path: str | Path) -> str:
    """Why `path` could not be written, without the path: the OS's reason, or 'no space left on device'."""
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            return _NO_SPACE
        return os.strerror(err.errno)
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "No space left on device" in str(err) or "os error 28" in str(err):  # safetensors' wording of ENOSPC
        return _NO_SPACE
    if any(phrase in str(err) for phrase in _TORCH_WRITE_FAILURES) or type(err).__name__ == "SafetensorError":
        free = _free_bytes(Path(path))
        if free is not None and free < 64 * 2**20:
            return f"no space left on device ({free // 2**20} MiB free)"
    return message


def describe_write_error(err: BaseException, path: str | Path) -> str:
    """One line: `cannot write <path>: <reason>` (the OS's reason, or 'no space left on device')."""
    where = err.filename if isinstance(err, OSError) and err.filename else path
    return f"cannot write {where}: {write_failure_reason(err, path)}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open `.tmp-<name>` beside `path` for writing; on success fsync + rename to `path`, on error remove it.

    Raises WriteError (one line, path and cause) for OS-level write failures; other exceptions pass through
    unchanged after the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    binary = "b" in mode
    with _removed_on_error(tmp, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


@contextlib.contextmanager
def _removed_on_error(tmp: Path, path: Path) -> Iterator[None]:
    """On any error remove `tmp`; OS errors become one WriteError line about `path`."""
    try:
        yield
    except OSError as err:
        _remove(tmp)
        raise WriteError(describe_write_error(err, path)) from err
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented, key-sorted JSON to `path` atomically."""
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty `.tmp-<name>/` beside `path`; on success it becomes `path`, on error it is removed.

    With replace=False an existing `path` is refused (FileExistsError) before anything is written; with
    replace=True the old directory is swapped out only after the new one is complete.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; nothing was written (remove it or choose another path)")
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with _removed_on_error(tmp, path):
        _remove(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        swap_into_place(tmp, path)


def swap_into_place(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a finished `tmp_dir` to `final_dir`; an existing `final_dir` is replaced only after, never lost first."""
    if final_dir.exists():
        old = final_dir.with_name(f"{TMP_PREFIX}old-{final_dir.name}")
        _remove(old)
        final_dir.rename(old)
        tmp_dir.rename(final_dir)
        _remove(old)
    else:
        tmp_dir.rename(final_dir)
    fsync_dir(final_dir.parent)
