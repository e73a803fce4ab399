"""The training-run contract every recipe follows, so one command serves the first run and every requeue.

- Run folder: `<output_dir>/checkpoints/step_N/`, `<output_dir>/final_model/` (safetensors + config.json),
  `metrics.jsonl`, `loss_curve.png`, and `run_finished.json` once the run is over (`RunLayout`).
- Resume (`resolve_resume`): "auto" (the default) takes the newest *valid* checkpoint, else starts fresh; "none"
  starts fresh and refuses a folder that already holds checkpoints; a path resumes exactly that checkpoint.
  Leftovers of killed saves are removed first, with a warning.
- A finished run stays finished (`finished_run`, `mark_finished`): rerunning it trains nothing and exits 0.
- User errors, bad settings and write errors become one `error: …` line and exit code 1 (`run_cli`);
  check settings with `check_settings` before any output folder exists.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import stop_signals
from .checkpoint_files import CheckpointError, clean_incomplete, latest_checkpoint, verify_checkpoint
from .distributed import barrier, exit_process, is_main_process, process_group_was_used
from .files import WriteError, atomic_write_json
from .run_lock import RunFolderBusy, hold_run_folder, release_run_folders

__all__ = [
    "ConfigError",
    "RunError",
    "RunLayout",
    "check_settings",
    "recorded_differences",
    "finished_run",
    "mark_finished",
    "resolve_resume",
    "run_cli",
    "RunFolderBusy",
    "hold_run_folder",
]

RESUME_CHOICES = ("auto", "none")


class RunError(RuntimeError):
    """A problem the user can fix (input, settings, folder); printed as one line by `run_cli`."""


class ConfigError(RunError, ValueError):
    """A setting that cannot work as given."""


@dataclass(frozen=True)
class RunLayout:
    """Where one training run keeps its outputs (the same in every recipe)."""

    output_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def final_model(self) -> Path:
        return self.output_dir / "final_model"

    @property
    def metrics(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def loss_curve(self) -> Path:
        return self.output_dir / "loss_curve.png"

    @property
    def finished_marker(self) -> Path:
        return self.output_dir / "run_finished.json"


def normalise_resume(resume: Any) -> str:
    """Accept the originals' spellings: True/"true"/"auto"/"latest"/None → "auto", False/"false"/"none" → "none"."""
    if resume is None or resume is True:
        return "auto"
    if resume is False:
        return "none"
    text = str(resume).strip()
    lowered = text.lower()
    if lowered in ("auto", "true", "latest", "yes", ""):
        return "auto"
    if lowered in ("none", "false", "no", "never"):
        return "none"
    return text  # a checkpoint path


def resolve_resume(resume: Any, checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start (every rank calls it, after setup).

    First takes the one-live-run lock on the run folder (`checkpoint_dir`'s parent; `hold_run_folder`), so that no
    other live run can be writing there while leftovers are cleaned up and checkpoints are chosen.
    Raises RunFolderBusy when another live process holds the folder; raises CheckpointError when an explicit path is not a valid checkpoint, when "none" is asked of a folder that
    already holds checkpoints (nothing is overwritten), or when checkpoints exist but every one fails its check.
    """
    choice = normalise_resume(resume)
    checkpoint_dir = Path(checkpoint_dir)
    hold_run_folder(checkpoint_dir.parent)
    if choice not in RESUME_CHOICES:
        path = Path(choice)
        if not path.exists():
            raise CheckpointError(f"resume checkpoint {path} does not exist")
        if not path.is_dir():
            raise CheckpointError(f"resume checkpoint {path} is a file; give a checkpoint folder (step_N/)")
        verify_checkpoint(path, check_hashes=True)
        return path
    if is_main_process() and checkpoint_dir.is_dir():
        removed = clean_incomplete(checkpoint_dir)
        if removed:
            warnings.warn(
                f"{checkpoint_dir}: removed {len(removed)} incomplete checkpoint(s) left by an interrupted save: "
                + ", ".join(sorted(p.name for p in removed)),
                stacklevel=2,
            )
    barrier()
    existing = sorted(checkpoint_dir.glob("step_*")) if checkpoint_dir.is_dir() else []
    if not existing:
        return None
    if choice == "none":
        raise CheckpointError(
            f"{checkpoint_dir} already holds checkpoints and resume is 'none': choose another output directory "
            "or resume with 'auto' (nothing was overwritten)"
        )
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        raise CheckpointError(f"{checkpoint_dir}: {[p.name for p in existing]} all fail their manifest check")
    return latest


def finished_run(layout: RunLayout, target_step: int | None = None) -> dict | None:
    """The record of a finished run in `layout`, if this run asks for nothing more (else None).

    A run is finished when it early-stopped, or when it reached at least `target_step` (a larger target continues
    the run from its newest checkpoint).
    """
    import json

    marker = layout.finished_marker
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except ValueError:
        return None
    if record.get("early_stopped") or target_step is None or int(record.get("step", -1)) >= target_step:
        return record
    return None


def mark_finished(layout: RunLayout, step: int, reason: str, early_stopped: bool = False, **extra: Any) -> Path:
    """Record (atomically, rank 0 only) that the run is over: `run_finished.json`."""
    if is_main_process():
        record = {"step": step, "reason": reason, "early_stopped": early_stopped, "time": time.time(), **extra}
        atomic_write_json(layout.finished_marker, record)
    release_run_folders()  # a rerun now finds the run finished; an in-process caller may start another run here
    return layout.finished_marker


def finished_message(layout: RunLayout, record: dict) -> str:
    """The one line a rerun of a finished run prints."""
    return (
        f"run in {layout.output_dir} already finished at step {record.get('step')} ({record.get('reason')}); "
        f"final model: {layout.final_model}. Nothing to do (use a new output directory or more steps to train further)"
    )


def recorded_differences(record: str | Path, current: dict[str, Any], error: type[Exception] = RunError) -> str:
    """What changed since a run recorded its settings or data fingerprint in the JSON file `record`:
    "key: checkpoint A vs now B; …" for each key that differs, "" when none. A resumed run refuses a non-empty
    answer in its own words. Raises `error` (one line) when `record` cannot be read."""
    try:
        recorded = json.loads(Path(record).read_text())
    except (OSError, ValueError) as err:
        raise error(f"{record}: unreadable data fingerprint ({err})") from None
    differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    return "; ".join(f"{k}: checkpoint {recorded.get(k)!r} vs now {current.get(k)!r}" for k in differ)


def check_settings(checks: Iterable[tuple[str, Any, str]]) -> None:
    """Validate settings in one place; each check is (name, value, rule). Raises ConfigError naming the first bad one.

    Rules: "finite", "positive" (finite, > 0), "non_negative" (finite, >= 0), "fraction" ([0, 1]),
    "open_fraction" ((0, 1)), "unit_interval_right_open" ([0, 1)), "count" (integer >= 1), "count0" (integer >= 0).
    """
    for name, value, rule in checks:
        problem = _setting_problem(value, rule)
        if problem:
            raise ConfigError(f"{name}={value!r} {problem}")


def _setting_problem(value: Any, rule: str) -> str | None:
    integer_rules = {"count": 1, "count0": 0}
    if rule in integer_rules:
        if isinstance(value, bool) or not isinstance(value, int) or value < integer_rules[rule]:
            return f"must be an integer >= {integer_rules[rule]}"
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "must be a number"
    if not math.isfinite(number):
        return "must be a finite number"
    bounds = {
        "finite": (-math.inf, math.inf, "", False),
        "positive": (0.0, math.inf, "must be > 0", True),
        "non_negative": (0.0, math.inf, "must be >= 0", False),
        "fraction": (0.0, 1.0, "must be in [0, 1]", False),
        "open_fraction": (0.0, 1.0, "must be in (0, 1)", True),
        "unit_interval_right_open": (0.0, 1.0, "must be in [0, 1)", False),
    }
    if rule not in bounds:
        raise ValueError(f"unknown rule {rule!r}")
    low, high, message, open_low = bounds[rule]
    below = number <= low if open_low else number < low
    above = number >= high if rule in ("open_fraction", "unit_interval_right_open") else number > high
    return message if (below or above) else None


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and text.startswith("'"):
        text = text.strip("'")
    first = text.splitlines()[0] if text else type(err).__name__
    return first


def run_cli(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a recipe's entry point; its user errors and write errors become `error: <one line>` and exit code 1.

    Always caught: RunError (ConfigError), RunFolderBusy, CheckpointError, WriteError, and OSErrors of the file
    system (full disk, permission, missing file). `main` returns None/0 for success or an int exit code. Under a
    launcher, only rank 0 prints the errors every rank raises alike (settings, checkpoints, the run folder), so a
    refusal is one line, not one per process. A process that ran a process group ends here through `exit_process`
    (see there why), so its exit code is the run's, never a SIGABRT at exit.
    """
    try:
        code = _run_main(main, user_errors)
    finally:
        release_run_folders()
        if threading.current_thread() is threading.main_thread():
            stop_signals.ignore_from_now()  # a late SIGTERM must not turn the run's exit code into -15
    if process_group_was_used():
        exit_process(code)
    return code


COLLECTIVE_ERRORS = (RunError, RunFolderBusy, CheckpointError, WriteError)  # raised alike on every rank


def _run_main(main: Callable[[], Any], user_errors: tuple[type[BaseException], ...]) -> int:
    try:
        result = main()
    except (*COLLECTIVE_ERRORS, *user_errors) as err:
        _report(_one_line(err), collective=isinstance(err, COLLECTIVE_ERRORS))
        return 1
    except OSError as err:
        _report(describe_os_error(err), collective=False)
        return 1
    except KeyboardInterrupt:
        _report("interrupted", collective=True)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _report(message: str, collective: bool) -> None:
    """Write `error: message` as one write (lines of several processes must not run together); other ranks stay
    quiet about collective errors, or prefix their rank. Under torchrun every rank also writes the line to the
    launcher's error file, so its failure summary names the cause instead of a link."""
    rank = int(os.environ.get("RANK", "0") or 0)
    line = f"error: {message}" if rank == 0 or collective else f"error (rank {rank}): {message}"
    if rank == 0 or not collective:
        sys.stderr.write(line + "\n")  # one write, then flushed: a line never mixes with another process's
        sys.stderr.flush()
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not os.path.exists(error_file):
        with contextlib.suppress(OSError):
            stamp = str(int(time.time()))
            Path(error_file).write_text(json.dumps({"message": {"message": line, "extraInfo": {"timestamp": stamp}}}))


def describe_os_error(err: OSError) -> str:
    """`<path>: <reason>` for a file-system error, naming a full disk as such."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device (free some space or choose another output directory)"
    else:
        reason = err.strerror or _one_line(err)
    return f"{err.filename}: {reason}" if err.filename else reason
