"""Turn SLURM's warning signals (SIGTERM, SIGUSR1) into a flag the training loop polls, to save and exit cleanly.

Signal the training processes themselves: under SLURM launch them with `srun` (one task per GPU) and ask for
`--signal=USR1@120`; a `torchrun` launcher that receives SIGTERM forwards it but then exits 1 itself, so a scheduler
records a preempted job as failed even though every worker saved and exited 0.

The flag lives in `stop_signals` (imported first by every training entry point, so a signal during the imports is
caught too); this wrapper adds the all-ranks agreement.
"""

from __future__ import annotations

import signal

from . import stop_signals
from .distributed import all_reduce_max


class PreemptionHandler:
    """Context manager over the process-wide stop flag.

    Entering installs the flag handler if the entry point has not already done so, and keeps a signal that arrived
    earlier (during imports or set-up), so the loop's first `should_stop()` is True. Leaving does not restore the
    default action: a second SIGTERM during the preemption save, or one during the export after the loop, must not
    kill a run that is stopping cleanly. A stop the loop acted on (`should_stop()` returned True) is consumed on
    leaving, so a later loop in the same process (tests, notebooks) starts unflagged.
    """

    def __init__(self) -> None:
        self.signals = stop_signals.STOP_SIGNALS
        self._acted = False

    @property
    def requested(self) -> bool:
        return stop_signals.requested()

    @property
    def received(self) -> int | None:
        return stop_signals.received()

    def __enter__(self) -> PreemptionHandler:
        stop_signals.install()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._acted:
            stop_signals.forget()

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank was signalled (an all-reduce when distributed)."""
        stop = all_reduce_max(1.0 if self.requested else 0.0) > 0
        self._acted = self._acted or stop
        return stop

    def signal_name(self) -> str | None:
        """`SIGTERM` / `SIGUSR1` once a signal arrived, for the log line."""
        return signal.Signals(self.received).name if self.received is not None else None
