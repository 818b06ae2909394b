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


def _cfg(tmp_path, **kw):
    from mpirl.config import Config

    return Config(run_dir=str(tmp_path / "run"), **kw)


def test_a_folder_of_someone_elses_files_is_refused_without_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")  # the user's own file, not a run
    with pytest.raises(ConfigError, match=r"holds files that are not an mpirl run's \(summary.json\)"):
        rundir.choose(_cfg(tmp_path))
    assert rundir.choose(_cfg(tmp_path, overwrite=True)) == str(run)
    (run / "summary.json").unlink()
    (run / rundir.LOCK).write_text("{}")  # only a lock: an empty run directory
    assert rundir.choose(_cfg(tmp_path)) == str(run)


def test_overwrite_moves_the_old_run_aside_and_stale_temporaries_go(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl", "progress.csv", "summary.json"):
        (run / name).write_text("old")
    (run / "checkpoints" / "step-000000099000.h5").write_text("old run's checkpoint")
    (run / "checkpoints" / "latest").write_text("step-000000099000.h5\n")
    (run / "checkpoints" / "step-000000100000.h5.tmp").write_text("an interrupted write")
    (run / "notes.txt").write_text("the user's")
    rundir.create(_cfg(tmp_path, overwrite=True), str(run), checkpoint_bytes=0)
    try:
        aside = [p for p in run.iterdir() if p.name.startswith(".overwritten-")]
        assert len(aside) == 1
        moved = aside[0]
        assert (moved / "checkpoints" / "step-000000099000.h5").read_text() == "old run's checkpoint"
        assert not (moved / "checkpoints" / "step-000000100000.h5.tmp").exists()  # removed, not kept
        assert (moved / "metrics.jsonl").read_text() == "old" and not (run / "metrics.jsonl").exists()
        assert not (run / "checkpoints").exists() and (run / "notes.txt").read_text() == "the user's"
        assert json.loads((run / "config.json").read_text())["overwrite"] is True  # the new run's
    finally:
        rundir.unlock(str(run))


def test_resume_keeps_the_run_and_only_drops_temporaries(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoints" / "step-000000001000.h5").write_text("ckpt")
    (run / "checkpoints" / "latest.tmp").write_text("half")
    rundir.create(_cfg(tmp_path, resume="auto", overwrite=True), str(run), checkpoint_bytes=0)
    try:
        assert (run / "checkpoints" / "step-000000001000.h5").exists()
        assert not (run / "checkpoints" / "latest.tmp").exists()
        assert not [p for p in run.iterdir() if p.name.startswith(".overwritten-")]
    finally:
        rundir.unlock(str(run))
