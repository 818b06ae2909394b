"""The stall watchdog: a rank that makes no progress for ``--stall-timeout`` seconds ends the job.

Without it, an env whose ``step()`` never returns on one rank hangs the whole job forever:
the other ranks wait in the next collective and nothing reaches stderr (issue 18).

Each rank keeps a heartbeat, a phase name and the time of its last progress:

- ``beat(phase)`` marks progress in local work ("env step", "evaluation", ...): two attribute
  stores, cheap enough for every env step (no lock: one writer, and the checker confirms a
  stall on two checks in a row, so a half-updated heartbeat never fires);
- ``waiting(name)`` wraps a collective: the rank waits for its peers, not for itself;
- ``allowance(phase, extra_s)`` scales the limit of a long phase (a checkpoint grows with
  its bytes: ``io_seconds``), on every rank alike, so the ranks that wait for it wait longer.

A daemon thread checks the heartbeat. A rank stuck in local work past the timeout names itself
(``mpirl: error: rank 1 made no progress for 61 s in phase 'env step' (...)``) with its main
thread's stack, and ends the job through ``end`` (``dist.abort``: MPI_Abort) with exit code
``EXIT_STALL``. A rank waiting in a collective gives the stalled peer a grace
(``grace_seconds``) to name itself first, then ends the job saying where it waited.

A rank told to stop (SIGTERM, SIGUSR1, SIGINT: ``stop_signalled``) that waits in one of the
training loop's collectives (``LOOP_COLLECTIVES``: every rank reaches them within an iteration) for
longer than a healthy peer could keep it waiting has lost a peer: a rank killed, or its node gone.
The wait before the signal counts too, unless a stalled peer may have reached its own limit by
then (its MPI_Abort is what made mpirun signal, and the stalled rank's line is the one to print).
That wait is ``stop_grace``: ``STOP_GRACE_S``, or ``STOP_SPANS`` times the longest stretch of this
rank's own work between two loop collectives seen lately (``Heart.loop_span``; a peer's stretch
is as long, give or take), so a job whose iterations take seconds (local SGD, a slow env, a
checkpoint just before) is not ended by a healthy but slower peer. The collectives of a
checkpoint (inside its ``allowance``) are watched too, their grace grown by that allowance: a
rank killed while the ranks checkpoint is also caught. Open MPI only warns
that the peer disconnected and the collective never returns, and SLURM's step teardown sends
SIGTERM, which asks for a checkpoint that cannot happen; without this the rank waited for the
SIGKILL ``KillWait`` later (30 s) or for the stall timeout. It ends the job at once instead.

A call that never returns and holds the GIL (a C extension) stops the checking thread too. So
each check also re-arms a kernel timer (SIGALRM) past the local limit: if the thread cannot run
for that long, faulthandler prints every thread's stack (no GIL needed) and the signal ends the
process; mpirun then names the rank ("process rank 1 ... exited on signal 14 (Alarm clock)") and
returns 142. It is armed only while SIGALRM is unused (a host program's handler wins). Horovod's
and Gloo's waits release the GIL (checked), so a waiting rank's own thread keeps checking.

Stdlib only: dist, the collector and the learner import it; it knows nothing of them.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, Iterator, Optional, TypeVar

EXIT_STALL = 5  # the job's exit code when a rank stalled (mpirun returns MPI_Abort's code)
IO_BYTES_PER_S = 20e6  # slowest disk or network file system a checkpoint is allowed, bytes/s
ABORT_GRACE_S = 10.0  # after the message: the backstop ends a rank whose abort itself hangs
START_UP_S = 120.0  # extra seconds for the start-up stage (lazy imports: torch._dynamo took 5 s)
STOP_GRACE_S = 5.0  # after a stop signal, the shortest wait in a loop collective before a peer counts as gone
STOP_SPANS = 3.0  # ... or this many times the longest recent stretch of work between loop collectives
SPAN_DECAY = 0.99  # per loop collective: a long stretch (a checkpoint) is forgotten over some hundred
LOOP_COLLECTIVES = ("gradient allreduce", "mpirl.preempt", "mpirl.metrics")

R = TypeVar("R")
_now = time.monotonic


class Heart:
    """One rank's heartbeat: what it does and since when (monotonic seconds). Written by the
    rank's main thread only, read by its watchdog."""

    __slots__ = ("phase", "since", "collective", "extra", "stop_at", "loop_exit", "loop_span")

    def __init__(self) -> None:
        self.phase = "start-up"
        self.since = _now()
        self.collective = False  # waiting for peers in a collective (gets the grace)
        self.extra = 0.0  # seconds added to the limit by the current allowance()
        self.stop_at: Optional[float] = None  # when the first stop signal arrived
        self.loop_exit: Optional[float] = None  # when this rank last left a loop collective
        self.loop_span = 0.0  # seconds: the longest stretch between loop collectives, decaying


def stop_grace(heart: Heart) -> float:
    """Seconds a rank told to stop waits in a loop collective, or one inside an allowance (a
    checkpoint's), before it counts a peer as gone: a healthy peer arrives within them."""
    return max(STOP_GRACE_S, STOP_SPANS * heart.loop_span) + heart.extra


def stop_signalled() -> None:
    """A stop signal arrived (called from the signal handler): from now on a loop collective
    that waits past ``stop_grace`` ends the job."""
    if HEART.stop_at is None:
        HEART.stop_at = _now()


HEART = Heart()  # this process's heartbeat


def beat(phase: str) -> None:
    """Progress in local work ``phase`` (call it as often as every env step)."""
    h = HEART
    h.phase = phase
    h.since = _now()


def begin(stage: str, extra_s: float = 0.0) -> None:
    """A new stage of the run (start-up, training), whose phases get ``extra_s`` more seconds."""
    HEART.collective, HEART.extra = False, extra_s
    HEART.loop_exit, HEART.loop_span = None, 0.0  # the stretches of the loop are measured anew
    beat(stage)


@contextlib.contextmanager
def waiting(name: str) -> Iterator[None]:
    """Around a collective ``name``: this rank waits for its peers (the limit gains the grace);
    its return is progress, and the local phase before it resumes."""
    h = HEART
    before = h.phase
    h.collective, h.phase, h.since = True, name, _now()
    loop = name in LOOP_COLLECTIVES
    if loop and h.loop_exit is not None:  # this rank's work since the last loop collective
        h.loop_span = max(h.since - h.loop_exit, h.loop_span * SPAN_DECAY)
    try:
        yield
    finally:
        h.since = _now()
        h.collective, h.phase = False, before
        if loop:
            h.loop_exit = h.since


@contextlib.contextmanager
def allowance(phase: str, extra_s: float) -> Iterator[None]:
    """A long phase (a checkpoint, a restore) whose limit grows by ``extra_s`` seconds, for its
    local work and its collectives alike. Give every rank the same ``extra_s``."""
    h = HEART
    before = h.extra
    h.extra = before + extra_s
    beat(phase)
    try:
        yield
    finally:
        h.since = _now()
        h.extra = before


def io_seconds(nbytes: float) -> float:
    """Seconds to allow for writing or streaming ``nbytes`` at ``IO_BYTES_PER_S``."""
    return nbytes / IO_BYTES_PER_S


def beating(phase: str, fn: Callable[..., R]) -> Callable[..., R]:
    """``fn`` that beats ``phase`` before each call: a heartbeat for a loop that only calls back
    (an evaluation's policy is called once per env step)."""

    def call(*args: object) -> R:
        beat(phase)
        return fn(*args)

    return call


def grace_seconds(timeout_s: float) -> float:
    """Extra wait of a rank in a collective, so that a stalled peer names itself first."""
    return max(30.0, 0.25 * timeout_s)


class AlarmBackstop:
    """A kernel timer (SIGALRM) that ends the process when the watchdog thread cannot run:
    faulthandler prints every thread's stack, then the signal's default action ends it."""

    def __init__(self) -> None:
        faulthandler.register(signal.SIGALRM, file=sys.stderr, all_threads=True, chain=True)

    @staticmethod
    def usable() -> bool:
        """Is SIGALRM free (no handler of a host program, such as pytest-timeout)?"""
        return hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL

    def arm(self, seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.unregister(signal.SIGALRM)


class Watchdog:
    """Checks ``heart`` every ``poll_s`` seconds in a daemon thread; past the limit, writes one
    line naming ``rank`` and its phase (``where()`` adds the run's progress), then ``end(5)``."""

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        end: Callable[[int], object],
        where: Callable[[], str] = lambda: "",
        heart: Heart = HEART,
        clock: Callable[[], float] = _now,
        backstop: Optional[AlarmBackstop] = None,
        err_fd: int = 2,
    ) -> None:
        self.timeout_s, self.rank, self.end, self.where = timeout_s, rank, end, where
        self.heart, self.clock, self.backstop, self.err_fd = heart, clock, backstop, err_fd
        self.grace_s = grace_seconds(timeout_s)
        self.poll_s = min(5.0, max(0.05, timeout_s / 20))
        # The backstop waits past the Python check (two polls: a stall is confirmed twice) and
        # stays below the grace, so a rank stuck holding the GIL still ends before a waiting peer.
        self.margin_s = max(10.0, 0.1 * timeout_s)
        self._suspect: Optional[float] = None  # heart.since of a stall seen once, to confirm
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._main = threading.main_thread()
        self._thread = threading.Thread(target=self._loop, name="mpirl-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop checking and disarm the backstop; no message or abort can follow."""
        with self._lock:  # waits for a firing check: stop never races a message
            self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
        if self.backstop is not None:
            self.backstop.disarm()

    def check(self) -> Optional[str]:
        """One check: the message to end the job with, or None. Re-arms the backstop."""
        h = self.heart
        phase, collective, extra, since = h.phase, h.collective, h.extra, h.since
        if self.backstop is not None:
            self.backstop.arm(self.timeout_s + extra + self.margin_s)
        idle = self.clock() - since
        stop_at = h.stop_at
        # A loop collective, or one inside a checkpoint's allowance (a peer killed while the
        # ranks checkpoint); other collectives (evaluation) may wait long for healthy peers.
        if collective and stop_at is not None and (phase in LOOP_COLLECTIVES or extra > 0):
            grace = stop_grace(h)
            # The whole wait counts when no stalled peer can have named itself by the signal: its
            # limit is timeout + extra, and it stopped beating at most a stretch (< grace) before
            # this rank began to wait. Then the signal came from elsewhere (SLURM, once it has
            # declared a lost node down) and the peer has been missing since; waiting more only
            # delays the end. Otherwise it counts from the signal: after a stalled peer's
            # MPI_Abort, mpirun sends this rank SIGTERM and SIGKILL ~2 s later, and ending at
            # once would add a second, wrong "peer is gone" error beside the stalled rank's own.
            peer_may_have_named = stop_at - since + grace >= self.timeout_s + extra
            waited = idle - max(0.0, stop_at - since) if peer_may_have_named else idle
            if waited > grace:
                return (
                    f"mpirl: error: rank {self.rank} was asked to stop and has waited {idle:,.0f} s "
                    f"in collective '{phase}' for a rank that did not arrive: a peer is gone (it failed, was "
                    f"killed, or its node was lost); ending the job (a healthy peer arrives within {grace:,.0f} s)"
                )
        if idle <= self.timeout_s + extra + (self.grace_s if collective else 0.0):
            self._suspect = None
            return None
        if self._suspect != since:  # confirm on the next check (a torn read cannot repeat)
            self._suspect = since
            return None
        where = self.where()
        where = f" ({where})" if where else ""
        limit = f"--stall-timeout {self.timeout_s:g}" + (f" + {extra:,.0f} s for its size" if extra else "")
        if collective:
            return (
                f"mpirl: error: rank {self.rank} waited {idle:,.0f} s in collective '{phase}' for a rank that "
                f"did not arrive{where}; ending the job ({limit}, + {self.grace_s:g} s for it to name itself)"
            )
        return (
            f"mpirl: error: rank {self.rank} made no progress for {idle:,.0f} s in phase '{phase}'{where}; "
            f"ending the job ({limit})"
        )

    def _loop(self) -> None:
        # Once a stop was signalled, check every second: the launcher's SIGKILL may follow.
        while not self._stopped.wait(self.poll_s if self.heart.stop_at is None else min(self.poll_s, 1.0)):
            message = self.check()
            if message is not None:
                self._fire(message)
                return

    def _fire(self, message: str) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            frame = sys._current_frames().get(self._main.ident or -1)
            stack = "".join(traceback.format_stack(frame, limit=12)) if frame is not None else ""  # innermost
            text = f"{message}\nmpirl: rank {self.rank}'s main thread was here:\n{stack}"
            try:
                os.write(self.err_fd, text.encode("utf-8", "replace"))  # one write: lines stay whole
            except OSError:
                pass
            if self.backstop is not None:
                self.backstop.arm(ABORT_GRACE_S)
            self.end(EXIT_STALL)


@contextlib.contextmanager
def running(
    timeout_s: float, rank: int, end: Callable[[int], object], where: Callable[[], str] = lambda: ""
) -> Iterator[Optional[Watchdog]]:
    """Watch this rank for the block's duration (``timeout_s`` 0: not at all); stopped on every
    way out, so a finished or failed run leaves no thread that could end the job later."""
    if timeout_s <= 0:
        yield None
        return
    begin("start-up", START_UP_S)
    backstop = AlarmBackstop() if AlarmBackstop.usable() else None
    dog = Watchdog(timeout_s, rank, end, where, backstop=backstop).start()
    try:
        yield dog
    finally:
        dog.stop()
