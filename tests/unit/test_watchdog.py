"""The stall watchdog on its own: limits, grace, allowances, messages, and that stop() stops it."""

import os
import threading
import time

import pytest

from mpirl import watchdog
from mpirl.config import Config, ConfigError, parse_args


class FakeBackstop:
    def __init__(self):
        self.armed = []
        self.disarmed = False

    def arm(self, seconds):
        self.armed.append(seconds)

    def disarm(self):
        self.disarmed = True


@pytest.fixture
def heart():
    """The process heartbeat, fresh for the test and left as it was found."""
    h = watchdog.HEART
    saved = (h.phase, h.since, h.collective, h.extra, h.stop_at, h.loop_exit, h.loop_span)
    watchdog.begin("start-up")
    h.stop_at = None
    yield h
    h.phase, h.since, h.collective, h.extra, h.stop_at, h.loop_exit, h.loop_span = saved


def make(timeout=10.0, **kw):
    """A Watchdog on a fake clock: ``clock.t`` seconds after the heartbeat's last progress."""

    class Clock:
        t = 0.0

        def __call__(self):
            return watchdog.HEART.since + self.t

    clock = Clock()
    ended = []
    dog = watchdog.Watchdog(timeout, 1, ended.append, lambda: "iteration 7, 112 global env steps", clock=clock, **kw)
    return dog, clock, ended


def test_local_stall_names_rank_and_phase_after_confirmation(heart):
    dog, clock, _ = make(timeout=10.0)
    watchdog.beat("env step")
    clock.t = 9.9
    assert dog.check() is None
    clock.t = 10.5
    assert dog.check() is None  # seen once: confirmed on the next check
    clock.t = 10.6
    msg = dog.check()
    assert msg == (
        "mpirl: error: rank 1 made no progress for 11 s in phase 'env step' (iteration 7, 112 global env steps); "
        "ending the job (--stall-timeout 10)"
    )


def test_progress_between_checks_clears_the_suspicion(heart):
    dog, clock, _ = make(timeout=10.0)
    watchdog.beat("env step")
    clock.t = 11.0
    assert dog.check() is None
    watchdog.beat("env step")  # progress: a new `since`, so the old stall is not confirmed
    assert dog.check() is None  # (the fake clock stays 11 s after the latest beat)
    assert dog.check() is not None  # the new stall, seen twice


def test_a_rank_in_a_collective_waits_the_grace_then_says_where(heart):
    dog, clock, _ = make(timeout=10.0)
    assert watchdog.grace_seconds(10.0) == 30.0 and watchdog.grace_seconds(600.0) == 150.0
    with watchdog.waiting("mpirl.metrics"):
        clock.t = 39.0  # a local phase would have ended long ago
        assert dog.check() is None and dog.check() is None
        clock.t = 40.5
        dog.check()
        msg = dog.check()
    assert msg is not None
    assert msg.startswith("mpirl: error: rank 1 waited 40 s in collective 'mpirl.metrics' for a rank that did not")
    assert "(--stall-timeout 10, + 30 s for it to name itself)" in msg


def test_after_a_stop_signal_a_loop_collective_that_waits_long_has_lost_a_peer(heart):
    """SLURM's teardown after a rank died elsewhere: SIGTERM, while this rank waits for the dead
    one in the gradient allreduce. It ends the job once the wait passes STOP_GRACE_S (the loop's
    stretches are short), not at the stall limit; without a signal it keeps waiting."""
    dog, clock, _ = make(timeout=600.0)
    with watchdog.waiting("gradient allreduce"):
        clock.t = 30.0
        assert dog.check() is None  # no stop signal: a stall is the stall limit's business
    with watchdog.waiting("gradient allreduce"):
        clock.t = 2.0
        watchdog.stop_signalled()
        assert heart.stop_at is not None
        heart.stop_at = heart.since + 2.0  # the signal 2 s into the wait, on the fake clock's time base
        clock.t = 4.9
        assert dog.check() is None  # 4.9 s in the collective
        clock.t = 5.6
        msg = dog.check()
    assert msg is not None and msg.startswith("mpirl: error: rank 1 was asked to stop and has waited 6 s in")
    assert "collective 'gradient allreduce'" in msg and "a peer is gone" in msg


def test_a_lost_nodes_survivor_ends_at_the_first_check_after_slurms_signal(heart):
    """A lost node: the survivor has waited in the allreduce since the node died, and SLURM's
    SIGTERM comes only once it has declared the node down (about 25 s here). No stalled peer can
    have reached its 600 s limit, so nothing is left to wait for: the next check ends the job."""
    dog, clock, _ = make(timeout=600.0)
    with watchdog.waiting("gradient allreduce"):
        clock.t = 25.0
        assert dog.check() is None
        heart.stop_at = heart.since + 25.0
        clock.t = 25.5
        msg = dog.check()
    assert msg is not None and "has waited 26 s in collective 'gradient allreduce'" in msg


def test_a_signal_after_a_peer_may_have_named_its_stall_counts_from_the_signal(heart):
    """--stall-timeout 20: a peer stalled in local work names itself and calls MPI_Abort once it
    has made no progress for 20 s, and mpirun then SIGTERMs this rank (SIGKILL ~2 s later). This
    rank has waited as long, so it gives STOP_GRACE_S from the signal: the stalled rank's line is
    the job's one error, not a second 'peer is gone' beside it."""
    dog, clock, _ = make(timeout=20.0)
    with watchdog.waiting("gradient allreduce"):
        heart.stop_at = heart.since + 16.0  # 16 s + the 5 s grace reach the peer's 20 s limit
        clock.t = 20.9
        assert dog.check() is None  # 4.9 s since the signal
        clock.t = 21.5
        msg = dog.check()
    assert msg is not None and "has waited 22 s in collective 'gradient allreduce'" in msg


def test_the_stop_grace_grows_with_the_loops_longest_recent_stretch_of_work(heart, monkeypatch):
    """Local SGD or a slow env: seconds of work between loop collectives. A peer as slow as this
    rank is healthy: the grace is STOP_SPANS such stretches, and a long one (a checkpoint) fades."""
    t = [100.0]
    monkeypatch.setattr(watchdog, "_now", lambda: t[0])
    watchdog.begin("training")
    for work in (0.01, 4.0, 0.01):  # seconds of local work before each vote
        t[0] += work
        with watchdog.waiting("mpirl.preempt"):
            t[0] += 0.001
    with watchdog.waiting("mpirl.sync"):  # not a loop collective: it ends no stretch
        t[0] += 0.001
    assert heart.loop_span == pytest.approx(4.0 * watchdog.SPAN_DECAY)
    assert watchdog.stop_grace(heart) == pytest.approx(watchdog.STOP_SPANS * 4.0 * watchdog.SPAN_DECAY)
    dog, clock, _ = make(timeout=600.0)
    with watchdog.waiting("mpirl.preempt"):
        heart.stop_at = heart.since
        clock.t = 10.0  # past STOP_GRACE_S, within three stretches of 4 s (3.9 s, decayed twice)
        assert dog.check() is None
        clock.t = 12.5
        msg = dog.check()
    assert msg is not None and "a peer is gone" in msg and "a healthy peer arrives within 12 s" in msg
    for _ in range(400):  # the 4 s stretch fades; the grace returns to STOP_GRACE_S
        with watchdog.waiting("mpirl.preempt"):
            t[0] += 0.01
    assert watchdog.stop_grace(heart) == watchdog.STOP_GRACE_S
    watchdog.begin("training")  # a new run measures anew
    assert heart.loop_exit is None and heart.loop_span == 0.0


def test_after_a_stop_signal_a_checkpoint_collective_waits_its_allowance_then_ends_the_job(heart):
    """A peer killed while the ranks checkpoint: the survivor waits in a checkpoint collective.
    Told to stop, it gives the peer STOP_GRACE_S plus the checkpoint's allowance, then ends the job."""
    dog, clock, _ = make(timeout=600.0)
    with watchdog.allowance("checkpoint write", 20.0):
        with watchdog.waiting("mpirl.checkpoint.status"):
            heart.stop_at = heart.since
            clock.t = 24.0
            assert dog.check() is None  # a healthy writer may still take its allowance
            clock.t = 25.5
            msg = dog.check()
    assert msg is not None and "collective 'mpirl.checkpoint.status'" in msg and "a peer is gone" in msg


def test_a_stop_signal_does_not_shorten_other_collectives_or_local_work(heart):
    dog, clock, _ = make(timeout=600.0)
    heart.stop_at = heart.since
    with watchdog.waiting("mpirl.eval"):  # a peer may play long evaluation episodes
        clock.t = 300.0
        assert dog.check() is None and dog.check() is None
    watchdog.beat("checkpoint write")
    heart.stop_at = heart.since
    clock.t = 300.0
    assert dog.check() is None and dog.check() is None


def test_leaving_a_collective_is_progress_and_resumes_the_local_phase(heart):
    watchdog.beat("env step")
    with watchdog.waiting("gradient allreduce"):
        assert heart.phase == "gradient allreduce" and heart.collective
        before = heart.since
    assert heart.phase == "env step" and not heart.collective and heart.since >= before


def test_an_allowance_scales_the_limit_for_its_phase_only(heart):
    dog, clock, _ = make(timeout=10.0)
    assert watchdog.io_seconds(200e6) == pytest.approx(10.0)  # 20 MB/s
    with watchdog.allowance("checkpoint write", 50.0):
        assert heart.phase == "checkpoint write"
        clock.t = 59.0
        assert dog.check() is None and dog.check() is None
        clock.t = 61.0
        dog.check()
        msg = dog.check()
        assert "in phase 'checkpoint write'" in msg and "--stall-timeout 10 + 50 s for its size" in msg
        with watchdog.waiting("replay shard stream (to rank 0)"):  # its collectives get it too
            clock.t = 89.0
            assert dog.check() is None and dog.check() is None
    assert heart.extra == 0.0
    clock.t = 11.0
    dog.check()
    assert dog.check() is not None  # the plain limit again


def test_a_new_stage_replaces_the_start_up_allowance(heart):
    watchdog.begin("start-up", watchdog.START_UP_S)
    assert heart.extra == watchdog.START_UP_S
    watchdog.begin("training")
    assert heart.extra == 0.0 and heart.phase == "training" and not heart.collective


def test_each_check_rearms_the_backstop_past_the_local_limit(heart):
    backstop = FakeBackstop()
    dog, clock, _ = make(timeout=10.0, backstop=backstop)
    dog.check()
    with watchdog.allowance("checkpoint write", 5.0):
        dog.check()
    assert backstop.armed == [10.0 + dog.margin_s, 15.0 + dog.margin_s]
    # Below the grace, with two polls to spare: a rank stuck holding the GIL ends before a
    # waiting peer gives up on it, and after the Python check of a stall that leaves the GIL free.
    for timeout in (1.0, 5.0, 60.0, 120.0, 600.0, 3600.0):
        d = watchdog.Watchdog(timeout, 0, print)
        assert 2 * d.poll_s < d.margin_s < d.grace_s - 2 * d.poll_s


def test_beating_wraps_a_callback_with_a_heartbeat(heart):
    policy = watchdog.beating("evaluation", lambda obs: obs * 2)
    heart.since -= 100.0
    assert policy(21) == 42
    assert heart.phase == "evaluation" and time.monotonic() - heart.since < 1.0


def _read_all(fd):
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 16).decode()
    except BlockingIOError:
        return ""


def test_the_thread_ends_the_job_with_exit_code_5_and_the_main_threads_stack(heart):
    r, w = os.pipe()
    ended = []
    dog = watchdog.Watchdog(0.2, 3, ended.append, err_fd=w)
    watchdog.beat("env step")
    dog.start()
    deadline = time.monotonic() + 5.0
    while not ended and time.monotonic() < deadline:
        time.sleep(0.02)
    dog.stop()
    out = _read_all(r)
    os.close(r)
    os.close(w)
    assert ended == [watchdog.EXIT_STALL] == [5]
    assert out.startswith("mpirl: error: rank 3 made no progress for 0 s in phase 'env step'; ending the job")
    assert "mpirl: rank 3's main thread was here:" in out and "test_watchdog.py" in out


def test_stop_really_stops_it(heart):
    r, w = os.pipe()
    ended = []
    backstop = FakeBackstop()
    dog = watchdog.Watchdog(1.0, 0, ended.append, backstop=backstop, err_fd=w).start()
    time.sleep(0.06)
    dog.stop()
    assert not dog._thread.is_alive() and backstop.disarmed
    heart.since -= 100.0  # long stalled now: nothing may fire any more
    time.sleep(0.5)
    out = _read_all(r)
    os.close(r)
    os.close(w)
    assert ended == [] and out == ""


def test_running_stops_on_an_exception_and_zero_turns_it_off(heart):
    threads = threading.active_count()
    with watchdog.running(0, 0, print) as dog:
        assert dog is None and threading.active_count() == threads
    with pytest.raises(RuntimeError):
        with watchdog.running(600.0, 0, print) as dog:
            assert dog is not None and dog._thread.is_alive()
            assert heart.phase == "start-up" and heart.extra == watchdog.START_UP_S
            raise RuntimeError("boom")
    assert not dog._thread.is_alive()


def test_stall_timeout_option():
    assert Config().stall_timeout == 600.0
    assert parse_args(["--stall-timeout", "0"]).stall_timeout == 0.0
    assert parse_args(["--stall-timeout", "2.5"]).stall_timeout == 2.5
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="--stall-timeout"):
            parse_args(["--stall-timeout", bad])
