"""Helpers for running the toy training script as a fresh process (plain python or torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from biorecipes_shared.testing import run_command, torchrun_command

TOY = Path(__file__).with_name("toy_train.py")


def toy_command(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(TOY), *args]
    return torchrun_command(TOY, args, nproc=nproc)


def run_toy(*args: str, nproc: int = 1):
    return run_command(toy_command(*args, nproc=nproc), timeout=600)


@pytest.fixture
def toy():
    return run_toy
