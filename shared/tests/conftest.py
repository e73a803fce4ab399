"""Helpers for running the toy training script as a fresh process (plain python or torchrun)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TOY = Path(__file__).with_name("toy_train.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toy_command(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(TOY), *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        str(TOY),
        *args,
    ]


def run_toy(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(toy_command(*args, nproc=nproc), capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def toy():
    return run_toy
