"""HF Trainer checkpoints on the run contract: complete or absent, verified, rotated safely, resumed exactly.

HF Trainer writes `checkpoint-N/` in place, so a kill during a save leaves a folder that its own resume picks up
and fails on. Here every checkpoint is written into `checkpoints/.tmp-step_N/` (HF's files: model.safetensors,
config.json, optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json, plus ours: stream_state.json and
loss_window_<rank>.json), gets a `manifest.json` (sizes + sha256, biorecipes_shared.checkpoint) and is renamed to
`checkpoints/step_N/` (N zero-padded to 8 digits) only when every rank has finished writing. Resume and cleanup of
leftovers are the shared `resolve_resume`'s.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from transformers.trainer_callback import ExportableState

from biorecipes_shared.checkpoint import (
    MANIFEST,
    STEP_PREFIX,
    TMP_PREFIX,
    TRASH_PREFIX,
    CheckpointError,
    CheckpointWriteError,
    clean_incomplete,
    publish,
    write_manifest,
)
from biorecipes_shared.distributed import all_reduce_max, barrier
from biorecipes_shared.files import describe_write_error, fsync_dir

STREAM_STATE_FILE = "stream_state.json"
LOSS_WINDOW_FILE = "loss_window_{rank}.json"
TRAINER_STATE_FILE = "trainer_state.json"
log = logging.getLogger("esm2_fa")


def step_dir(checkpoints: Path, step: int) -> Path:
    """`checkpoints/step_{step:08d}` (the shared naming, so the shared resume code finds it)."""
    return Path(checkpoints) / f"{STEP_PREFIX}{step:08d}"


def _fail_together(error: BaseException | None, tmp: Path, final: Path, is_main: bool) -> None:
    """Every rank learns whether any rank failed; the temp dir goes and every rank raises the same one line."""
    if all_reduce_max(1.0 if error is not None else 0.0) == 0:
        return
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise CheckpointWriteError(f"cannot write checkpoint {final}: another process failed to write its part")
    raise CheckpointWriteError(f"checkpoint {final}: {describe_write_error(error, tmp)}") from error


def _record_callback_states(trainer) -> None:
    """Put the stateful callbacks' (early stopping's patience counter) and TrainerControl's state into the state."""
    for callback in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(callback, ExportableState):
            trainer.state.stateful_callbacks[callback.__class__.__name__] = callback.state()


def _write_parts(trainer, tmp: Path, stream_state: dict[str, Any], loss_window: dict[str, Any]) -> None:
    """HF's files plus ours into `tmp`; every rank calls it (each writes its RNG and loss-window file)."""
    args, state = trainer.args, trainer.state
    trainer.store_flos()
    trainer.save_model(str(tmp), _internal_call=True)
    if state.best_global_step:  # HF would point this at `checkpoint-N`; ours are `step_N`
        state.best_model_checkpoint = str(step_dir(Path(args.output_dir), state.best_global_step))
    trainer._save_optimizer_and_scheduler(str(tmp))
    trainer._save_scaler(str(tmp))
    trainer._save_rng_state(str(tmp))
    (tmp / LOSS_WINDOW_FILE.format(rank=args.process_index)).write_text(json.dumps(loss_window))
    if args.should_save:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle that resuming never reads
        _record_callback_states(trainer)
        state.save_to_json(str(tmp / TRAINER_STATE_FILE))
        (tmp / STREAM_STATE_FILE).write_text(json.dumps(stream_state, indent=1))


def save_trainer_checkpoint(trainer, stream_state: dict[str, Any], loss_window: dict[str, Any]) -> Path:
    """Write the Trainer's checkpoint for `trainer.state.global_step` atomically; every rank calls it.

    Raises CheckpointWriteError (one line: path and cause, e.g. a full disk) after removing the temp dir; earlier
    checkpoints stay valid.
    """
    args, step = trainer.args, trainer.state.global_step
    checkpoints, is_main = Path(args.output_dir), args.should_save
    tmp, final = checkpoints / f"{TMP_PREFIX}{step:08d}", step_dir(checkpoints, step)
    error = None
    if is_main:
        try:
            checkpoints.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as err:
            error = err
    _fail_together(error, tmp, final, is_main)  # also the barrier: tmp exists before any rank writes
    try:
        _write_parts(trainer, tmp, stream_state, loss_window)
    except (OSError, RuntimeError, SafetensorError) as err:  # torch and safetensors raise their own on a full disk
        error = err
    _fail_together(error, tmp, final, is_main)
    if is_main:
        try:
            write_manifest(tmp, step, world_size=args.world_size)
            publish(tmp, final)
        except OSError as err:
            error = err
    _fail_together(error, tmp, final, is_main)
    if is_main:
        best = trainer.state.best_global_step
        rotate(checkpoints, args.save_total_limit or 0, keep={final, step_dir(checkpoints, best) if best else final})
    barrier()
    return final


def rotate(checkpoints: Path, keep_last: int, keep: set[Path]) -> None:
    """Keep the newest `keep_last` complete checkpoints plus `keep` (the best one); 0 keeps all.

    Old ones are renamed to `.trash-step_N` before removal, so a kill mid-delete never leaves a half `step_N`.
    """
    if keep_last > 0:
        complete = sorted(p for p in checkpoints.glob(f"{STEP_PREFIX}*") if (p / MANIFEST).is_file())
        for path in complete[:-keep_last]:
            if path not in keep:
                path.rename(checkpoints / (TRASH_PREFIX + path.name[len(STEP_PREFIX) :]))
    fsync_dir(checkpoints)
    clean_incomplete(checkpoints)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a checkpoint, or CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from err


def checkpoint_step(checkpoint: Path) -> int:
    """The global step a checkpoint was saved at (from its trainer_state.json)."""
    return int(read_json(checkpoint / TRAINER_STATE_FILE)["global_step"])


def check_stream_state(checkpoint: Path, world_size: int, num_workers: int) -> int:
    """Batches each rank already consumed; refuses (one line) another world size or worker count.

    The data-stream position is per rank (each rank reads its own shards: dataset.ShardStream), so another number
    of processes or workers would read a different stream: a silent replay or skip. That is refused, naming both.
    """
    state = read_json(checkpoint / STREAM_STATE_FILE)
    saved_world, saved_workers = int(state["world_size"]), int(state["num_workers"])
    if saved_world != world_size:
        raise CheckpointError(
            f"{checkpoint} was saved by {saved_world} process(es) and this run has {world_size}: relaunch with "
            f"{saved_world} process(es) (each process's data-stream position is saved separately), "
            "or start a new output directory"
        )
    if saved_workers != max(1, num_workers):
        raise CheckpointError(
            f"{checkpoint} was saved with data.num_workers={saved_workers} and this run has {max(1, num_workers)}: "
            f"set data.num_workers={saved_workers} to continue the same data stream"
        )
    return int(state["batches_consumed_per_rank"])


def read_loss_window(checkpoint: Path, rank: int) -> tuple[float, int] | None:
    """(loss summed since the last log, step of the last log) of this rank at the checkpoint, if recorded."""
    path = checkpoint / LOSS_WINDOW_FILE.format(rank=rank)
    if not path.is_file():
        return None
    window = read_json(path)
    return float(window["loss_sum"]), int(window["last_logged_step"])


def run_was_over(checkpoint: Path, max_steps: int, patience: int | None) -> bool:
    """Whether the run had nothing left to do when it saved `checkpoint`: max_steps reached, or early stopping's
    patience used up (patience None: early stopping off). A kill between that last save and `run_finished.json`
    leaves such a checkpoint; HF's loop would train one step past it, so the caller only exports."""
    state = read_json(checkpoint / TRAINER_STATE_FILE)
    if int(state["global_step"]) >= max_steps:
        return True
    early = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback") or {}
    counter = (early.get("attributes") or {}).get("early_stopping_patience_counter", 0)
    return patience is not None and counter >= patience
