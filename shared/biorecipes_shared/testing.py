"""Helpers for the recipes' tests and measurement scripts: launch a training command as a fresh process, under
torchrun, and kill it around its checkpoint saves (the run contract's "kill -9 at any moment" check).

Lives in shared/ because every recipe's tests start distributed runs the same way; it imports nothing heavy.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KillReport",
    "check_fasta_case",
    "child_env",
    "fasta_contract_cases",
    "free_port",
    "kill_around_saves",
    "longest_function",
    "run_command",
    "small_disk",
    "torchrun_command",
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for torchrun's --master_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(script: str | Path, args: Sequence[str] = (), nproc: int = 2) -> list[str]:
    """`python -m torch.distributed.run --nproc_per_node=N --master_port=P script args…` (standalone, one node)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]


def child_env(**extra: str) -> dict[str, str]:
    """The current environment with one thread per process (the test machines have 2 cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_command(
    command: Sequence[str], cwd: str | Path | None = None, check: bool = True, timeout: float = 900, **env: str
) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing output; with check=True a non-zero exit fails with its output."""
    result = subprocess.run(
        list(command), cwd=cwd, capture_output=True, text=True, env=child_env(**env), timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


@dataclass
class KillReport:
    """What `kill_around_saves` saw: kills sent, reruns that resumed cleanly, and the ones that failed."""

    kills: int = 0
    clean_resumes: int = 0
    failures: list[str] | None = None


def _names(checkpoint_dir: Path) -> set[str]:
    try:
        return {p.name for p in checkpoint_dir.iterdir()}
    except OSError:
        return set()


def _wait_for_save(checkpoint_dir: Path, proc: subprocess.Popen, deadline: float) -> bool:
    """Poll until a directory appears in `checkpoint_dir` (a save began, or a rotation renamed one)."""
    previous = _names(checkpoint_dir)
    while time.time() < deadline and proc.poll() is None:
        names = _names(checkpoint_dir)
        if names - previous:
            return True
        previous = names
        time.sleep(0.002)
    return False


def kill_around_saves(
    command: Sequence[str],
    checkpoint_dir: str | Path,
    kills: int = 15,
    cwd: str | Path | None = None,
    seed: int = 0,
    max_delay_s: float = 0.05,
    timeout: float = 900,
) -> KillReport:
    """Start `command`, SIGKILL it at a random moment (0–max_delay_s) after a save begins, rerun the same command;
    `kills` times, then let the last run finish. A rerun that exits non-zero counts as a failure."""
    rng = random.Random(seed)
    report = KillReport(failures=[])
    checkpoint_dir = Path(checkpoint_dir)
    deadline = time.time() + timeout
    while True:
        proc = subprocess.Popen(
            list(command), cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if report.kills < kills and _wait_for_save(checkpoint_dir, proc, deadline):
            time.sleep(rng.uniform(0, max_delay_s))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                report.kills += 1
                continue
        out, err = proc.communicate(timeout=max(deadline - time.time(), 1))
        if proc.returncode == 0:
            report.clean_resumes += 1
            if report.kills >= kills or "already finished" in out + err:
                return report
        else:
            last_line = (err or out).strip().splitlines()[-1] if (err or out).strip() else "no output"
            report.failures.append(f"exit {proc.returncode}: {last_line}")
            if len(report.failures) > 3 or time.time() > deadline:
                return report


# One FASTA contract for every recipe that reads FASTA: each case's text and what a protein reader and a DNA reader
# must make of it. Kept here, beside the other test helpers, so the four readers cannot drift apart.
FASTA_CONTRACT = Path(__file__).with_name("fasta_contract.json")


def fasta_contract_cases(kind: str) -> list[dict]:
    """The contract's cases that apply to a `kind` ("protein" or "dna") reader, each with its name, text and the
    expected outcome under `case[kind]`."""
    cases = json.loads(FASTA_CONTRACT.read_text(encoding="utf-8"))["cases"]
    return [case for case in cases if case[kind]["verdict"] != "not_applicable"]


def check_fasta_case(case: dict, kind: str, path: Path, compressed: bool, read_records, error_type) -> None:
    """Write the case's text to `path` (gzipped when `compressed`) and check the recipe's reader against it.

    read_records(path) -> [(record_id, description, sequence), ...]; a refused file must raise `error_type` with one
    line that names the file and every mention the case lists."""
    import pytest

    data = case["text"].encode("utf-8")
    path.write_bytes(gzip.compress(data) if compressed else data)
    expected = case[kind]
    if expected["verdict"] == "ok":
        records = read_records(path)
        assert [[record_id, sequence] for record_id, _, sequence in records] == expected["records"]
        if "description" in expected:
            assert records[0][1] == expected["description"]
        return
    with pytest.raises(error_type) as caught:
        read_records(path)
    message = str(caught.value)
    assert "\n" not in message and path.name in message
    for mention in expected["error_mentions"]:
        assert mention in message, message


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "4M") mounted at `path`, to measure what a run does when its disk fills up; needs root
    on Linux. Unmounted on the way out, whatever happened."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def longest_function(paths: Iterable[Path]) -> str:
    """ "file:function (N lines)" for the longest function in `paths`: the style limit is about 60 lines."""
    found = [(0, "none")]
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.name}"))
    lines, where = max(found)
    return f"{where} ({lines} lines)"
