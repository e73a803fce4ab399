import random

import numpy as np
import pytest
import torch

from biorecipes_shared.distributed import (
    _first_slurm_host,
    all_reduce_mean,
    read_launch_env,
    seed_everything,
    setup_distributed,
)


def test_torchrun_env_wins():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert read_launch_env(env) == (3, 1, 8)


def test_slurm_env_fills_rendezvous():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08],cpu1"}
    assert read_launch_env(env) == (5, 1, 8)
    assert env["MASTER_ADDR"] == "gpu07"
    assert env["MASTER_PORT"] == "29500"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")


def test_plain_python_is_single_process():
    assert read_launch_env({}) == (0, 0, 1)


@pytest.mark.parametrize(
    "nodelist, host",
    [("node[01-04,07],gpu2", "node01"), ("gpu2,node1", "gpu2"), ("nid00[12-13]", "nid0012"), ("host", "host")],
)
def test_first_slurm_host(nodelist, host):
    assert _first_slurm_host(nodelist) == host


def test_seed_everything_repeats_all_generators():
    seed_everything(11)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(11)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_single_process_context(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    ctx = setup_distributed(seed=5)
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed, ctx.backend) == (0, 1, True, False, None)
    assert ctx.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert all_reduce_mean(2.5) == 2.5
