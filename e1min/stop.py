"""Graceful stop: what schedulers send before they kill a job (SIGTERM; SLURM's ``--signal`` SIGUSR1; Ctrl-C).

The first signal only raises a flag; the trainer, at its next optimiser-step boundary, agrees with the other
ranks to stop, saves ``last/`` there and raises ``StopRequested``. A second signal ends the process at once
(the kernel releases the run lock; ``--resume`` continues from the last saved state), unless it comes within
``REPEAT_WINDOW_S`` of the first: under SLURM + torchrun a worker gets the scheduler's SIGTERM twice, from
SLURM and forwarded by torchrun, milliseconds apart, and that is one request.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
REPEAT_WINDOW_S = 3.0


class StopRequested(Exception):
    """A run stopped on a signal after saving a resumable state. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Context manager: while active, the first stop signal sets ``signum``; a second one ends the process.

    Handlers are installed only from the main thread (Python's rule); elsewhere this is inert.
    ``request(signum)`` sets the flag as a signal would (tests, embedding code).
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def request(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                return  # the same request delivered twice (scheduler and launcher)
            # Second signal: the default action now (terminate), without running Python cleanup.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self._first_at = signum, time.monotonic()
        msg = f"e1min: {signal.Signals(signum).name} received: stopping after the current step (send it again to exit at once)\n"
        try:
            os.write(2, msg.encode())  # no logging inside a signal handler: it may interrupt a logging call
        except OSError:
            pass

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.signum is not None:
            # A stop is under way and the process is winding down: keep handling, so the launcher's copy of the
            # same signal (arriving after the stop was saved) is still ignored rather than killing the process.
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
