"""SIGTERM and SIGUSR1 set a flag from the moment a training script starts; they never kill it.

Import this module first in a training entry point, before torch:

    # isort: off
    import biorecipes_shared.stop_signals  # noqa: F401  (first: a SIGTERM during the imports below sets a flag)
    # isort: on

Importing it installs the handler (this module imports nothing heavy, so the window in which the default action
could still kill the process is the interpreter's own start-up). The training loop polls the flag through
`PreemptionHandler.should_stop()`: a signal during imports or set-up stops the run cleanly at its first check, and
a second signal during the preemption save, or one after the loop ended, changes nothing, so the process exits 0
however often the scheduler signals it.
"""

from __future__ import annotations

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _handle(signum, frame) -> None:
    first = not _received
    _received.append(signum)
    if first:
        # os.write, not print: a handler may run while another print holds stderr's buffer lock.
        name = signal.Signals(signum).name
        os.write(2, f"received {name}: will save a checkpoint and stop\n".encode())


def install() -> None:
    """Route STOP_SIGNALS to the flag (idempotent; only the main thread may install handlers)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not _handle:
            signal.signal(signum, _handle)


def requested() -> bool:
    """True once any stop signal has arrived in this process."""
    return bool(_received)


def received() -> int | None:
    """The first stop signal this process received, or None."""
    return _received[0] if _received else None


def ignore_from_now() -> None:
    """The run is over: ignore stop signals until the process ends.

    Interpreter shutdown puts back the default action (death by signal, exit -15) of every signal that has a Python
    handler while it unloads torch; an ignored signal it leaves alone. Blocking the signals would not do: torch's
    own threads would still take them. `run_cli` calls this when the entry point returns."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def forget() -> None:
    """Clear the flag (tests that run several loops in one process)."""
    _received.clear()


install()
