"""Stop signals: SIGTERM, SIGINT and SIGUSR1 set a flag on the rank that got them. The ranks
agree on the flags with a collective vote in the training loop (the trainer's
``dist.allreduce_sum`` every ``CHECK_EVERY`` iterations), then checkpoint and stop together.

What to send, and why it matters: a launcher that forwards SIGTERM (Open MPI's ``mpirun``
also turns SIGINT into SIGTERM for the ranks) sends SIGKILL soon after. ``mpirun`` waits
about 2 s (``odls_base_sigkill_timeout`` 1, measured 2.0 s) and itself exits 1 whatever the
ranks do; SLURM waits ``KillWait`` (30 s by default). A stop checkpoint that takes longer is
cut off: the previous checkpoint stays intact, progress since then is lost. SIGUSR1 is
forwarded by ``mpirun`` and sent by ``scancel --signal=USR1`` / ``sbatch --signal=B:USR1@120``
with no SIGKILL behind it: the job checkpoints and exits 0 however long that takes.
"""

from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any

from mpirl import watchdog

CHECK_EVERY = 16  # iterations between votes: a vote is an allreduce, a stop can wait this long


class StopFlag:
    """Installs the handlers (main thread only) and remembers the first stop signal. A second
    SIGINT (Ctrl-C twice) interrupts at once, as a user pressing it again expects."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal received on this rank, 0 if none
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int] = (-1, -1)  # (read end, the wakeup fd it replaced)
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._watch_wakeup()

    def _watch_wakeup(self) -> None:
        """Tell the watchdog of a stop signal at once, from a thread. Python runs ``_handle`` in
        the main thread only when it next executes bytecode, never while that thread is blocked
        in a collective whose peer is dead; the C-level handler still writes the signal's number
        to the wakeup fd, which this thread reads."""
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            replaced = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread after all
            os.close(r)
            os.close(w)
            return
        self._wakeup = (r, replaced)
        stops = {int(s) for s in self.SIGNALS}

        def read() -> None:
            try:
                while data := os.read(r, 64):  # empty: restore() closed the write end
                    if stops.intersection(data):
                        watchdog.stop_signalled()
            finally:
                os.close(r)

        threading.Thread(target=read, name="mpirl-stop-signals", daemon=True).start()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum:
            raise KeyboardInterrupt  # the second Ctrl-C: stop waiting for the checkpoint
        self.signum = self.signum or signum  # a repeat changes nothing: the stop is under way
        watchdog.stop_signalled()  # a loop collective that now waits long has lost a peer

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @staticmethod
    def vote_due(iteration: int) -> bool:
        """Is ``iteration`` one where the ranks vote? (The same iterations on every rank.)"""
        return iteration % CHECK_EVERY == 0

    def restore(self) -> None:
        """Put the previous handlers back (the run ended without a stop)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        r, replaced = self._wakeup
        if r >= 0:
            os.close(signal.set_wakeup_fd(replaced))  # the reader sees the pipe end, closes r, returns
            self._wakeup = (-1, -1)

    def ignore_further(self) -> None:
        """Once a stop is agreed, ignore repeated SIGTERM/SIGUSR1 at the OS level: Python resets
        its own handlers to the default (terminate) at interpreter exit, when a late repeat
        would still kill us. SIGINT keeps its handler (a second Ctrl-C interrupts)."""
        for sig in self._previous:
            if sig != signal.SIGINT:
                signal.signal(sig, signal.SIG_IGN)


def launcher_grace() -> tuple[float, str]:
    """Seconds this rank has between a launcher's SIGTERM and its SIGKILL, and whose rule that
    is; (inf, "") when no launcher is known to follow with SIGKILL."""
    if "OMPI_MCA_orte_hnp_uri" in os.environ:  # started by Open MPI's mpirun
        timeout = int(os.environ.get("OMPI_MCA_odls_base_sigkill_timeout", "1") or 1)
        return timeout + 1.0, f"mpirun sends SIGKILL about {timeout + 1} s after SIGTERM"
    if "SLURM_STEP_ID" in os.environ:
        return 30.0, "SLURM sends SIGKILL KillWait after SIGTERM (30 s by default)"
    return math.inf, ""


def stop_note(signame: str, checkpoint_s: float, grace_s: float, grace_rule: str) -> str:
    """The log line of an agreed stop: whether the stop checkpoint (``checkpoint_s``, this
    run's estimate) fits the launcher's grace, and what to send instead when it does not."""
    if signame in ("SIGUSR1", "") or checkpoint_s < 0.5 * grace_s:
        return ""
    return (
        f"mpirl: warning: {signame}: the stop checkpoint may take about {checkpoint_s:.1f} s and {grace_rule}: "
        "if it is cut off, the previous checkpoint stays intact and the progress since is lost. Stop with SIGUSR1 "
        "instead (kill -USR1 <mpirun pid>, scancel --signal=USR1), or give mpirun a longer grace "
        "(mpirun --mca odls_base_sigkill_timeout 60)"
    )
