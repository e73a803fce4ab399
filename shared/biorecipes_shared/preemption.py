"""Turn SLURM's warning signals (SIGTERM, SIGUSR1) into a flag the training loop polls, to save and exit cleanly.

Signal the training processes themselves: under SLURM launch them with `srun` (one task per GPU) and ask for
`--signal=USR1@120`; a `torchrun` launcher that receives SIGTERM forwards it but then exits 1 itself, so a scheduler
records a preempted job as failed even though every worker saved and exited 0.
"""

from __future__ import annotations

import signal
import sys

from .distributed import all_reduce_max


class PreemptionHandler:
    """Context manager: while active, SIGTERM/SIGUSR1 set `requested` instead of killing the process."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.signals = signals
        self.requested = False
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.received = signum
        print(f"received {signal.Signals(signum).name}: will save a checkpoint and stop", file=sys.stderr, flush=True)

    def __enter__(self) -> PreemptionHandler:
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def should_stop(self) -> bool:
        """True on every rank as soon as any rank was signalled (an all-reduce when distributed)."""
        return all_reduce_max(1.0 if self.requested else 0.0) > 0
