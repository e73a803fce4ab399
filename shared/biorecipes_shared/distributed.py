"""One call to set up a training process under torchrun, SLURM srun or plain python.

torch is imported inside the functions that build things: the queries (`is_main_process`, `barrier`, …) answer
from `sys.modules`, because a process that never imported torch has no process group. So tools that only use the
run contract (preprocessing, the run-folder lock) start without torch's seconds of import.
"""

from __future__ import annotations

import atexit
import datetime
import os
import random
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job, and the device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as `node[01-04,07],gpu2` -> `node01` (no scontrol needed)."""
    depth = 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            nodelist = nodelist[:i]
            break
    match = re.fullmatch(r"([^\[]*)(?:\[([^\]]*)\])?(.*)", nodelist)
    prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
    if not ranges:
        return prefix + suffix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def read_launch_env(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """Return (rank, local_rank, world_size) from torchrun's or SLURM's variables; (0, 0, 1) for plain python.

    Also fills MASTER_ADDR/MASTER_PORT under SLURM when they are not set.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local_rank = int(env.get("SLURM_LOCALID", 0))
        if world_size > 1:
            env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
            env.setdefault("MASTER_PORT", "29500")
            # init_process_group's env:// rendezvous reads these names.
            env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world_size), str(local_rank)
        return rank, local_rank, world_size
    return 0, 0, 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with one value."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def setup_distributed(
    seed: int | None = 0, backend: str | None = None, timeout_minutes: int = 30
) -> DistributedContext:
    """Initialise the process group when launched on several processes, pick the device and seed per rank."""
    import torch
    import torch.distributed as dist

    rank, local_rank, world_size = read_launch_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    chosen_backend = None
    if world_size > 1:
        chosen_backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(
                backend=chosen_backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(minutes=timeout_minutes),
                device_id=device if device.type == "cuda" else None,
            )
    if seed is not None:
        seed_everything(seed + rank)
    return DistributedContext(rank, local_rank, world_size, device, chosen_backend)


def _process_group():
    """torch.distributed when this process has a live process group, else None (without importing torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    """True on rank 0, and in a process that is not part of a process group."""
    dist = _process_group()
    return dist is None or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    dist = _process_group()
    if dist is not None:
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor) -> float | torch.Tensor:
    """Mean of a number or tensor over all ranks (returned as the same kind); identity without a process group."""
    dist = _process_group()
    if dist is None:
        return value
    import torch

    is_tensor = isinstance(value, torch.Tensor)
    # gloo reduces CPU tensors, nccl CUDA ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = (value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)).to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= dist.get_world_size()
    if is_tensor:
        return tensor.to(value.device)
    return tensor.item()


def all_reduce_max(value: float) -> float:
    """Max of a number over all ranks; identity without a process group."""
    dist = _process_group()
    if dist is None:
        return value
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


_process_group_used = False  # set by teardown_distributed; read by process_group_was_used


def teardown_distributed() -> None:
    """Destroy the process group if one exists (safe to call twice)."""
    global _process_group_used
    dist = _process_group()
    if dist is not None:
        _process_group_used = True
        dist.barrier()
        dist.destroy_process_group()


def process_group_was_used() -> bool:
    """True once this process has run a process group (torn down or not)."""
    return _process_group_used or _process_group() is not None


def exit_process(code: int) -> NoReturn:
    """End the process with `code` after running the atexit handlers and flushing stdout/stderr, skipping the
    interpreter's finalization.

    Why: gloo's worker threads drop finished collectives (and the Python tensors they hold) a moment after the
    collective returns. When that lands after Python has begun finalizing, the thread is killed mid-destructor and a
    run that finished cleanly aborts with SIGABRT ("terminate called without an active exception"); seen 1 run in 20
    on a loaded CPU machine. The gloo threads are only joined when the last reference to the process group dies, which
    DDP/FSDP keep alive until finalization, so there is no earlier point to wait for them.
    """
    atexit._run_exitfuncs()  # logging.shutdown and every library's own handlers still run
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
