"""Stop signals in one process: the flag, a second Ctrl-C, and the launcher-grace warning."""

from __future__ import annotations

import math
import os
import signal

import pytest

from mpirl import preemption


def test_first_signal_sets_the_flag_a_second_ctrl_c_interrupts():
    stop = preemption.StopFlag()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR1)  # a repeat changes nothing
        assert stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while a stop is under way: out now
    finally:
        stop.restore()


def test_ignore_further_keeps_ctrl_c(monkeypatch):
    stop = preemption.StopFlag()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        stop.ignore_further()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == stop._handle
    finally:
        stop.restore()


def test_launcher_grace(monkeypatch):
    for var in ("OMPI_MCA_orte_hnp_uri", "OMPI_MCA_odls_base_sigkill_timeout", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    assert preemption.launcher_grace() == (math.inf, "")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert preemption.launcher_grace()[0] == 30.0
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1.0;tcp://10.0.0.1:1")  # mpirun inside an allocation
    assert preemption.launcher_grace() == (2.0, "mpirun sends SIGKILL about 2 s after SIGTERM")
    monkeypatch.setenv("OMPI_MCA_odls_base_sigkill_timeout", "60")
    assert preemption.launcher_grace()[0] == 61.0


def test_stop_note_warns_only_when_the_checkpoint_may_not_fit():
    grace, rule = 2.0, "mpirun sends SIGKILL about 2 s after SIGTERM"
    assert preemption.stop_note("SIGTERM/SIGINT", 0.3, grace, rule) == ""
    note = preemption.stop_note("SIGTERM/SIGINT", 5.0, grace, rule)
    assert note.startswith("mpirl: warning: SIGTERM/SIGINT: the stop checkpoint may take about 5.0 s")
    assert "SIGUSR1" in note and "odls_base_sigkill_timeout" in note and "\n" not in note
    assert preemption.stop_note("SIGUSR1", 500.0, grace, rule) == ""  # nothing follows USR1 with SIGKILL
    assert preemption.stop_note("SIGTERM/SIGINT", 500.0, math.inf, "") == ""


def test_a_stop_signal_reaches_the_watchdog_while_the_main_thread_is_blocked():
    """The C-level handler writes the signal's number to the wakeup fd even while the main thread
    sits in a C call that never returns (a collective with a dead peer), when Python cannot run
    the handler; a thread reads it and tells the watchdog. Simulated by writing that byte."""
    import time

    from mpirl import watchdog

    saved = watchdog.HEART.stop_at
    watchdog.HEART.stop_at = None
    flag = preemption.StopFlag()
    try:
        wakeup = signal.set_wakeup_fd(-1)  # the fd StopFlag installed; put it straight back
        signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
        os.write(wakeup, bytes([signal.SIGTERM]))
        deadline = time.monotonic() + 5
        while watchdog.HEART.stop_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watchdog.HEART.stop_at is not None
        assert flag.signum == 0  # the Python handler did not run: only the thread saw it
    finally:
        flag.restore()
        watchdog.HEART.stop_at = saved
    assert signal.set_wakeup_fd(-1) == -1  # restore() put the previous wakeup fd (none) back
