"""One live run per output folder: an OS advisory lock (`flock`) on `<output_dir>/.run.lock`.

A requeued job whose predecessor still runs, or workers that outlived a killed `torchrun` launcher (they run in their
own session), would otherwise write into the same folder as the new run. The kernel drops an `flock` when its holder
dies, however it dies, so a lock left by a dead process never blocks the next run (a pid file could go stale).
The holder's pid, host and start time are written into the file for the refusal message.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
import warnings
from pathlib import Path

from .distributed import all_reduce_max, is_main_process

LOCK_NAME = ".run.lock"
_held: dict[Path, int] = {}  # folder -> open descriptor holding its lock, for the life of this process
_created: dict[Path, list[Path]] = {}  # folder -> the folders taking its lock created (innermost first)


class RunFolderBusy(RuntimeError):
    """Another live process holds the output folder."""


def hold_run_folder(output_dir: str | Path) -> None:
    """Take the one-live-run lock on `output_dir` for the rest of this process; every rank calls it (collective).

    Rank 0 takes the lock; the others learn the outcome through an all-reduce. Raises RunFolderBusy, naming the
    holder's pid and host, when another live process holds the folder. Re-entrant within one process.
    """
    folder = Path(output_dir).resolve()
    problem = None
    if is_main_process() and folder not in _held:
        try:
            _held[folder] = _acquire(folder)
        except RunFolderBusy as err:
            problem = str(err)
    if all_reduce_max(1.0 if problem else 0.0) > 0:
        raise RunFolderBusy(problem or f"{folder} is in use by another live run (see rank 0's message)")


def release_run_folders() -> None:
    """Drop every lock this process holds (the end of a run; the kernel also drops them when the process ends).

    A run refused during set-up leaves nothing behind: a folder that taking the lock created and that holds nothing
    but the lock file is removed again (with the parents it created), while the lock is still held."""
    for folder, descriptor in _held.items():
        created = _created.get(folder, [])
        if created and _only_the_lock_in(folder):
            (folder / LOCK_NAME).unlink(missing_ok=True)
            for made in created:  # innermost first; rmdir refuses a folder that holds anything
                with contextlib.suppress(OSError):
                    made.rmdir()
        os.close(descriptor)
    _held.clear()
    _created.clear()


def _only_the_lock_in(folder: Path) -> bool:
    try:
        return [entry.name for entry in os.scandir(folder)] == [LOCK_NAME]
    except OSError:
        return False


def _acquire(folder: Path) -> int:
    missing, parent = [], folder
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    folder.mkdir(parents=True, exist_ok=True)
    _created[folder] = missing
    path = folder / LOCK_NAME
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_holder(descriptor)
        os.close(descriptor)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderBusy(
                f"{folder} is in use by another live run ({holder}); wait for it to end, stop it, or choose "
                "another output directory"
            ) from None
        # A file system without flock (some network mounts): run unguarded rather than not at all.
        warnings.warn(f"{path}: cannot lock the run folder ({err.strerror}); one live run per folder is not enforced",
                      stacklevel=3)  # fmt: skip
        return os.open(os.devnull, os.O_RDONLY)
    holder = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (holder + "\n").encode(), 0)
    return descriptor


def _read_holder(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
