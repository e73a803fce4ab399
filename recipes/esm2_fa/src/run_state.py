"""What a run writes: checkpoints on the shared contract (biorecipes_shared.checkpoint): complete or absent, verified, resumed
exactly, rotated without losing the best one.

A checkpoint `checkpoints/step_N/` (N zero-padded to 8 digits) holds model.safetensors (the bare EsmForMaskedLM's
keys), training_state.pt (optimizer, LR schedule, grad scaler, `Progress`: step, best metric, early stopping's
patience, and the data-stream layout), rank_R.pt per rank (RNG states, batches this rank consumed, its loss window)
and manifest.json, written last. Everything is read back with safetensors or torch.load(weights_only=True); a file
that fails that (a tampered or foreign pickle) is refused in one line. Also the final export and the metrics
writer with TensorBoard.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from biorecipes_shared.checkpoint import (
    MANIFEST,
    STEP_PREFIX,
    TRASH_PREFIX,
    CheckpointError,
    clean_incomplete,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from biorecipes_shared.distributed import barrier, is_main_process
from biorecipes_shared.files import TMP_PREFIX, WriteError, describe_write_error, fsync_dir, swap_into_place
from biorecipes_shared.logging_utils import MetricsWriter
from model import ModelConfigError, export_config, export_state_dict, load_weights, save_tokenizer
from trainer import Progress, Window

log = logging.getLogger("esm2_fa")
_REBUILT = ("position_ids", "inv_freq")  # buffers a model rebuilds itself (and that differ across transformers)


def step_dir(checkpoints: Path, step: int) -> Path:
    """`checkpoints/step_{step:08d}` (the shared naming, so the shared resume code finds it)."""
    return Path(checkpoints) / f"{STEP_PREFIX}{step:08d}"


def stream_layout(world_size: int, num_workers: int, seed: int) -> dict[str, int]:
    """What the data-stream position depends on: a resume must read the stream with the same layout."""
    return {"world_size": world_size, "num_workers": max(1, num_workers), "seed": seed}


def save(
    checkpoints: Path,
    model,
    optimizer,
    scheduler,
    scaler,
    progress: Progress,
    rank_state: dict,
    extra: dict,
    keep_last: int,
) -> Path:
    """Write `step_{progress.step}` atomically (every rank calls it); keep the newest `keep_last` and the best one.

    Raises CheckpointWriteError (one line: path and cause, e.g. a full disk) after removing the temp dir.
    """
    path = save_checkpoint(
        checkpoints,
        progress.step,
        model,
        optimizer,
        scheduler,
        scaler,
        data_state=rank_state,
        extra={"progress": asdict(progress), **extra},
        keep_last_k=0,  # rotation below, which keeps the best checkpoint too
    )
    if is_main_process():
        keep = {path} | ({step_dir(checkpoints, progress.best_step)} if progress.best_step else set())
        rotate(Path(checkpoints), keep_last, keep)
    barrier()
    return path


def rotate(checkpoints: Path, keep_last: int, keep: set[Path]) -> None:
    """Keep the newest `keep_last` complete checkpoints plus `keep`; 0 keeps all.

    Old ones are renamed to `.trash-step_N` before removal, so a kill mid-delete never leaves a half `step_N`.
    """
    if keep_last > 0:
        complete = sorted(p for p in checkpoints.glob(f"{STEP_PREFIX}*") if (p / MANIFEST).is_file())
        for path in complete[:-keep_last]:
            if path not in keep:
                path.rename(checkpoints / (TRASH_PREFIX + path.name[len(STEP_PREFIX) :]))
    fsync_dir(checkpoints)
    clean_incomplete(checkpoints)


def _check_weight_names(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's tensor names must be the model's (rebuilt buffers aside): another config is refused."""
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
            saved = {k for k in handle.keys() if not k.endswith(_REBUILT)}  # noqa: SIM118  (safe_open is no dict)
    except Exception as err:
        raise CheckpointError(f"{path / 'model.safetensors'}: cannot be read ({str(err).splitlines()[0]})") from err
    expected = {k for k in model.state_dict() if not k.endswith(_REBUILT)}
    if saved != expected:
        raise CheckpointError(
            f"{path}: weights do not fit the model (missing {sorted(expected - saved)[:3]}, unexpected "
            f"{sorted(saved - expected)[:3]}); the model config differs from the run that saved it"
        )


def restore(path: Path, model, optimizer, scheduler, scaler, layout: dict[str, int]) -> tuple[Progress, dict]:
    """Load `path` into model/optimizer/scheduler/scaler and the RNGs; (Progress, this rank's state).

    Raises CheckpointError (one line) for a file that is missing, corrupt, tampered with (manifest re-hashed or
    not) or of another shape, and for a checkpoint written with another world size or worker count.
    """
    _check_weight_names(path, model)
    try:
        saved = load_checkpoint(path, model, optimizer, scheduler, scaler, strict=False, data_position="per_rank")
        progress = Progress(**saved.extra["progress"])
        stream, rank_state = saved.extra["stream"], saved.data_state
        consumed, window = int(rank_state["batches_consumed"]), Window(**rank_state["window"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a weights-only pickle of the wrong shape
        raise CheckpointError(f"{path}: training state is not this recipe's ({type(err).__name__}: {err})") from err
    if stream["world_size"] != layout["world_size"]:  # load_checkpoint checks it too: kept for a clear message
        raise CheckpointError(
            f"{path} was saved by {stream['world_size']} process(es) and this run has {layout['world_size']}"
        )
    if stream["num_workers"] != layout["num_workers"]:
        raise CheckpointError(
            f"{path} was saved with data.num_workers={stream['num_workers']} and this run has "
            f"{layout['num_workers']}: set data.num_workers={stream['num_workers']} to continue the same data stream"
        )
    return progress, {"batches_consumed": consumed, "window": window}


def load_best_weights(model: torch.nn.Module, checkpoints: Path, best_step: int | None) -> None:
    """Put the best checkpoint's weights into `model` (load_best_model_at_end); a warning when it is gone."""
    path = step_dir(checkpoints, best_step) if best_step else None
    if path is None or not (path / MANIFEST).is_file():
        log.warning("best checkpoint (step %s) is not on disk: keeping the last weights", best_step)
        return
    verify_checkpoint(path)  # its files as they were saved
    try:
        load_weights(model, path / "model.safetensors")
    except ModelConfigError as err:
        raise CheckpointError(str(err)) from err
    log.info("loaded the best weights (step %d)", best_step)


def export_final_model(model: torch.nn.Module, out_dir: Path) -> None:
    """final_model/: model.safetensors + config.json (transformers' EsmForMaskedLM layout) + tokenizer files,
    written under a temp name and swapped in (rank 0 only).

    Raises WriteError (one line) when the disk is full or the folder unwritable; the temp dir is removed and an
    earlier export stays as it was.
    """
    tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Copies: safetensors refuses the tied decoder/embedding pair that shares one storage.
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in export_state_dict(model).items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(export_config(model), indent=2, sort_keys=True) + "\n")
        save_tokenizer(tmp)
        swap_into_place(tmp, out_dir)
    except Exception as err:  # OSError, and safetensors' own error on a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(describe_write_error(err, out_dir)) from err


class TensorBoardWriter(MetricsWriter):
    """metrics.jsonl plus the same scalars in `<output_dir>/tensorboard/` (rank 0; needs the tensorboard package)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._board = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # optional: only with report_to=tensorboard

            self._board = SummaryWriter(str(self.out_dir / "tensorboard"))

    def log(self, step: int, **metrics) -> None:
        super().log(step, **metrics)
        if self._board is not None:
            for key, value in metrics.items():
                self._board.add_scalar(key, value, step)

    def close(self) -> None:
        super().close()
        if self._board is not None:
            self._board.close()
            self._board = None
