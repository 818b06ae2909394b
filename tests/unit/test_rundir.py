"""The run directory's lock: one job at a time, a dead holder taken over, the holder named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mpirl import rundir
from mpirl.config import ConfigError


def _write_lock(path, **holder):
    (path / rundir.LOCK).write_text(json.dumps(holder))


def test_lock_is_taken_released_and_reentrant(tmp_path):
    rundir.lock(str(tmp_path))
    held = json.loads((tmp_path / rundir.LOCK).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["start"]
    rundir.lock(str(tmp_path))  # this process again (fit() called twice in one script)
    rundir.unlock(str(tmp_path))
    assert not (tmp_path / rundir.LOCK).exists()


def test_a_live_holder_on_this_host_is_refused_and_named(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, host=socket.gethostname(), pid=sleeper.pid, start=rundir._start_time(sleeper.pid),
                    job="4242", since="2026-11-29T01:00:00")  # fmt: skip
        who = rf"host {socket.gethostname()}, pid {sleeper.pid}, job 4242, since 2026-11-29T01:00:00"
        with pytest.raises(ConfigError, match=rf"in use by another job \({who}\)"):
            rundir.lock(str(tmp_path))
        rundir.unlock(str(tmp_path))  # not ours: left alone
        assert (tmp_path / rundir.LOCK).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_holder_or_a_reused_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, host=socket.gethostname(), pid=dead.pid, start="1")
    rundir.lock(str(tmp_path))
    assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    rundir.unlock(str(tmp_path))
    # A live pid with another start time: the holder's pid was reused by another process.
    _write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), start="1")
    rundir.lock(str(tmp_path))
    rundir.unlock(str(tmp_path))


def test_another_host_is_refused_unless_it_is_this_slurm_job(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="node17", pid=123, start="9", job="777")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="host node17, pid 123, job 777"):
        rundir.lock(str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued onto another node
    rundir.lock(str(tmp_path))
    assert json.loads((tmp_path / rundir.LOCK).read_text())["job"] == "777"
    rundir.unlock(str(tmp_path))


def test_an_unreadable_lock_is_refused(tmp_path):
    (tmp_path / rundir.LOCK).write_text("")
    with pytest.raises(ConfigError, match="unreadable lock"):
        rundir.lock(str(tmp_path))
