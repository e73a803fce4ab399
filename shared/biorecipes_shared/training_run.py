"""`TrainingRun`: the run contract in one object, so a recipe's loop only registers its parts and asks when to save.

In the manner of torchtitan's CheckpointManager: the recipe registers its model, optimizer, scheduler, data
position and generators once; `resume()` is one call; `should_save(step)` owns the interval, the last step and
preemption (a collective: every rank calls it at every step); `save(step)` owns rotation; `finish(export)` owns the
export, the loss curve, `run_finished.json` and the message a rerun prints.

    run = TrainingRun(output_dir, max_steps=1000, save_every=100)
    if run.finished_message():                         # before building anything: a finished run stays finished
        print(run.finished_message()); return
    run.register(model, optimizer, scheduler, data_state=lambda: loader_state, generators={"shuffle": g})
    state = run.resume()                                 # None for a fresh start; takes the run-folder lock
    with run:                                            # stop signals set a flag from here on (see stop_signals)
        for step in range(run.step + 1, run.max_steps + 1):
            loss = train_step(...)
            if run.should_save(step):
                run.save(step)
            if run.stopped:
                break
    run.finish(export=lambda folder: export_safetensors(model, config, folder))
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointState, load_checkpoint, peek_checkpoint, save_checkpoint
from .distributed import barrier, is_main_process, read_launch_env
from .logging_utils import plot_loss_curve
from .preemption import PreemptionHandler
from .run import RunLayout, finished_message, finished_run, mark_finished, resolve_resume


@dataclass
class _Parts:
    model: torch.nn.Module | None = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    data_state: Callable[[], Any] | None = None
    extra: Callable[[], dict] | None = None
    keep: Callable[[], list[int]] | None = None
    generators: dict[str, torch.Generator] = field(default_factory=dict)


class TrainingRun:
    """One training run in `output_dir` (the shared `RunLayout`), from the first start through every requeue.

    max_steps: the step the run ends at; save_every: checkpoint interval in steps (0: only at the end and on a stop
    signal); keep_last: checkpoints kept; resume: "auto" | "none" | a checkpoint path; data_position: "global" (the
    data state is a job-wide position: another world size continues) or "per_rank" (refused in one line);
    sharded: FSDP2 checkpoints through torch.distributed.checkpoint; strict=False: resume tolerates weights the
    model lacks or does not hold (buffers a model rebuilds itself), never a shape mismatch.
    """

    def __init__(
        self,
        output_dir: str | Path,
        max_steps: int,
        save_every: int = 0,
        keep_last: int = 2,
        resume: Any = "auto",
        data_position: str = "global",
        sharded: bool = False,
        strict: bool = True,
    ) -> None:
        self.layout = RunLayout(output_dir)
        self.max_steps, self.save_every, self.keep_last = int(max_steps), int(save_every), int(keep_last)
        self.resume_choice, self.data_position, self.sharded, self.strict = resume, data_position, sharded, strict
        self._chosen = False  # whether checkpoint_to_resume() has chosen (None is a valid choice: a fresh start)
        self._checkpoint: Path | None = None
        self.step = 0
        self.stopped = False  # a stop signal reached every rank: the run saved and ends without finishing
        self.preemption = PreemptionHandler()
        self._parts = _Parts()

    def finished_message(self) -> str | None:
        """The one line a rerun of a finished run prints, or None when there is training left to do."""
        record = finished_run(self.layout, self.max_steps)
        return finished_message(self.layout, record) if record else None

    def report_finished(self) -> bool:
        """True when the run is already finished; rank 0 of the launch (known before any process group exists)
        has then printed the rerun line, so a rerun under torchrun prints it once."""
        message = self.finished_message()
        if message and read_launch_env()[0] == 0:
            print(message, flush=True)
        return message is not None

    def register(
        self,
        model: torch.nn.Module,
        optimizer=None,
        scheduler=None,
        scaler=None,
        *,
        data_state: Callable[[], Any] | None = None,
        extra: Callable[[], dict] | None = None,
        generators: dict[str, torch.Generator] | None = None,
        keep: Callable[[], list[int]] | None = None,
    ) -> None:
        """What a checkpoint holds. `data_state()` / `extra()` are called at each save, so they see the loop's
        current position; generators are saved and restored in place (the sampler's, the loader's, the model's).
        `keep()` names steps rotation must not remove (e.g. the best checkpoint so far)."""
        self._parts = _Parts(model, optimizer, scheduler, scaler, data_state, extra, keep, dict(generators or {}))

    def checkpoint_to_resume(self) -> Path | None:
        """The checkpoint `resume()` will load (None: a fresh start), chosen once: takes the run folder, removes
        leftovers of killed saves, picks the newest valid checkpoint or the one `resume` names."""
        if not self._chosen:
            self._checkpoint, self._chosen = resolve_resume(self.resume_choice, self.layout.checkpoints), True
        return self._checkpoint

    def peek(self) -> CheckpointState | None:
        """The checkpoint `resume()` will load (taking the run folder first), read without restoring anything, so a
        recipe can check it against its settings before building the model; None for a fresh start."""
        path = self.checkpoint_to_resume()
        return None if path is None else peek_checkpoint(path)

    def resume(self, map_location: str | torch.device = "cpu") -> CheckpointState | None:
        """Take the run folder (one live run per folder), then restore the newest valid checkpoint into the
        registered parts; None for a fresh start. Raises CheckpointError / RunFolderBusy as one line."""
        path = self.checkpoint_to_resume()
        if path is None:
            return None
        parts = self._parts
        state = load_checkpoint(
            path, parts.model, parts.optimizer, parts.scheduler, parts.scaler, generators=parts.generators,
            map_location=map_location, data_position=self.data_position, strict=self.strict,
        )  # fmt: skip
        self.step = state.step
        return state

    def __enter__(self) -> TrainingRun:
        self.preemption.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.preemption.__exit__(*exc_info)

    def stop_requested(self) -> bool:
        """Whether a stop signal arrived on any rank (a collective: every rank calls it), e.g. during imports or
        set-up, before the first step; once true, `finish()` does nothing and the checkpoint is the state."""
        self.stopped = self.stopped or self.preemption.should_stop()
        return self.stopped

    def should_save(self, step: int) -> bool:
        """True at the interval, at the last step, and (on every rank alike) once a stop signal arrived anywhere."""
        self.step = step
        self.stop_requested()
        on_interval = self.save_every > 0 and step % self.save_every == 0
        return self.stopped or step >= self.max_steps or on_interval

    def save(self, step: int | None = None) -> Path:
        """Write `checkpoints/step_N/` atomically (every rank calls it); keeps the newest `keep_last`."""
        step = self.step if step is None else step
        parts = self._parts
        return save_checkpoint(
            self.layout.checkpoints, step, parts.model, parts.optimizer, parts.scheduler, parts.scaler,
            data_state=parts.data_state() if parts.data_state else None, generators=parts.generators,
            extra=parts.extra() if parts.extra else None, keep_last=self.keep_last, sharded=self.sharded,
            keep_steps=parts.keep() if parts.keep else (),
        )  # fmt: skip

    def finish(self, export: Callable[[Path], Any] | None = None, reason: str = "max steps reached", **record) -> bool:
        """End the run: after a stop signal nothing more (the checkpoint is the state); otherwise `export(folder)`
        on rank 0 (write `final_model/`), the loss curve from metrics.jsonl, then `run_finished.json`. Every rank
        calls it; returns True when the run is now finished."""
        if self.stopped:
            return False
        if export is not None and is_main_process():
            export(self.layout.final_model)
        if is_main_process() and self.layout.metrics.is_file():
            with contextlib.suppress(ValueError):  # no numeric loss logged (zero steps): nothing to plot
                plot_loss_curve(self.layout.metrics, self.layout.loss_curve)
        barrier()
        mark_finished(self.layout, self.step, reason, **record)
        return True
