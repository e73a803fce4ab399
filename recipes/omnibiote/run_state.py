"""The run state a checkpoint carries, and the global data position that lets another world size continue exactly.

Data position: the run counts the sequences it has drawn, summed over ranks (`samples_seen`, the same on every rank).
The k-th mini-batch of the whole run is drawn from a generator seeded by (seed, k) alone, and each optimizer step
takes a fixed number of these mini-batches (the step plan is computed for one process), spread over the ranks. So
the data of a step does not depend on how many processes share it: a run saved by 2 processes continues with 1 (or
the other way round) on exactly the mini-batches an uninterrupted run would have used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import torch

from biorecipes_shared.checkpoint import load_checkpoint, save_checkpoint
from biorecipes_shared.run import ConfigError

# Architecture fields a resumed (or --init_from) run must share with its source.
ARCHITECTURE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd")


@dataclasses.dataclass
class RunState:
    """Where the run is: optimizer steps taken, sequences drawn over all ranks, and the step last checkpointed."""

    step: int = 0
    samples_seen: int = 0
    saved_step: int = -1
    resumed_from: Path | None = None

    def tokens_seen(self, ctx_len: int) -> int:
        return self.samples_seen * ctx_len


def stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit generator seed for mini-batch `index` of `stream` ("train"/"val"); independent of the world size."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_batch(batcher, seed: int, stream: str, index: int) -> dict[str, torch.Tensor]:
    """Mini-batch `index` of a stream: (mini_batch_size, ctx_len) input_ids / doc_ids / labels, always the same."""
    batcher.generator = torch.Generator().manual_seed(stream_seed(seed, stream, index))
    return batcher.next_batch()


def micro_batches(units: int, world_size: int, rank: int, first_unit: int) -> list[tuple[int, float]]:
    """(global mini-batch index, loss weight) of this rank's micro-batches in a step of `units` mini-batches.

    Unit k of the step goes to rank k % world_size. DDP averages gradients over ranks, so a weight of
    world_size / units makes the step's gradient the mean over its units whatever the world size. A rank left
    without a unit (during the batch ramp, when units is not a multiple of world_size) runs a weight-0 copy of the
    step's first unit, because every rank must join each gradient all-reduce.
    """
    per_rank = math.ceil(units / world_size)
    plan = []
    for micro in range(per_rank):
        k = micro * world_size + rank
        plan.append((first_unit + k, world_size / units) if k < units else (first_unit, 0.0))
    return plan


def save_run(checkpoint_dir: Path, state: RunState, model, optimizer, scheduler, extra: dict, keep_last_k: int) -> None:
    """Checkpoint the run (every rank calls it); a no-op when this step is already saved."""
    if state.saved_step == state.step:
        return
    save_checkpoint(
        checkpoint_dir,
        state.step,
        model,
        optimizer,
        scheduler,
        data_state={"samples_seen": state.samples_seen},
        extra=extra,
        keep_last_k=keep_last_k,
    )
    state.saved_step = state.step


def check_same(saved: dict, current: dict, source: Path, fields, hint: str) -> None:
    """A checkpoint or export continues only a run with the same settings in `fields`: one line naming the first."""
    for field in fields:
        if field in saved and saved[field] != current[field]:
            raise ConfigError(f"{source}: was trained with {field}={saved[field]}, not {current[field]}; {hint}")


def load_run(path: Path, model, optimizer, scheduler, model_config: dict, plan: dict) -> RunState:
    """Restore a checkpoint into model/optimizer/scheduler and RNG; the data position is global (any world size)."""
    hint = "use another --save_name or the same flags"
    try:
        state = load_checkpoint(path, model, optimizer, scheduler, data_position="global")
    except RuntimeError as exc:  # CheckpointError, or weights of another architecture
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{path}: cannot resume this run from it ({detail})") from None
    check_same(state.extra.get("config", {}), model_config, path, (*ARCHITECTURE_FIELDS, "ctx_len"), hint)
    check_same(state.extra.get("plan", {}), plan, path, tuple(plan), hint)
    return RunState(
        step=state.step,
        samples_seen=int(state.data_state["samples_seen"]),
        saved_step=state.step,
        resumed_from=path,
    )
