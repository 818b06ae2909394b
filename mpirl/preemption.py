"""Stop signals: SIGTERM and SIGUSR1 (what SLURM sends before a time limit or a preemption,
``scancel --signal=USR1``) set a flag on the rank that got them. The ranks agree on the flags
with a collective vote in the training loop (the trainer's ``dist.allreduce_sum`` every
``CHECK_EVERY`` iterations), then checkpoint and stop together.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

CHECK_EVERY = 16  # iterations between votes: a vote is an allreduce, a stop can wait this long


class StopFlag:
    """Installs the handlers (main thread only) and remembers the first stop signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal received on this rank, 0 if none
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum  # a second signal changes nothing: the stop is under way

    @staticmethod
    def vote_due(iteration: int) -> bool:
        """Is ``iteration`` one where the ranks vote? (The same iterations on every rank.)"""
        return iteration % CHECK_EVERY == 0

    def restore(self) -> None:
        """Put the previous handlers back (the run ended without a stop)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def ignore_further(self) -> None:
        """Once a stop is agreed, ignore repeats at the OS level: Python resets its own handlers
        to the default (terminate) at interpreter exit, when a late repeat would still kill us."""
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
