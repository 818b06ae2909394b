"""The run directory: where it is, whether it may be written, and the files rank 0 writes
into it besides checkpoints and metrics (``config.json``, ``summary.json``).

Rank 0 alone calls these; the trainer agrees on their outcome with ``dist.rank0_decides``, so
every rank learns the path, or raises the same ConfigError, before anything else happens.

    <run_dir>/config.json      the run's options (Config.to_dict()), written at start
    <run_dir>/metrics.jsonl    every record (mpirl.metrics)
    <run_dir>/progress.csv     progress rows
    <run_dir>/checkpoints/     step-<global env steps>.h5 and ``latest`` (mpirl.checkpoint)
    <run_dir>/summary.json     the run's Summary, written at the end
    <run_dir>/.mpirl-lock      the job that holds the directory (host, pid, SLURM job), while it runs

A run directory belongs to one job at a time: ``create`` takes the lock (an exclusive create,
which NFS v3+ and Lustre honour) or refuses, naming the holder; the lock is released at the end
of the run. A lock left by a job that died is taken over when its holder is provably gone: the
same host and no such process (pid and start time, so a reused pid does not count), or the same
SLURM job (a requeued job resumes on any node). Otherwise the message says which file to remove
once that job is known to be gone.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import shutil
import socket
import sys
from typing import Any

from mpirl import fsutil, procfs
from mpirl.config import Config, ConfigError

PROBE_BYTES = 1 << 20
LOCK = ".mpirl-lock"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" if unknown): with the pid, it names
    one process, even after the pid is reused."""
    fields = procfs.stat_fields(f"/proc/{pid}/stat")
    return fields[19] if len(fields) > 19 else ""


def _me() -> dict[str, Any]:
    pid = os.getpid()
    since = _dt.datetime.now().isoformat(timespec="seconds")
    job = os.environ.get("SLURM_JOB_ID", "")
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid), "job": job, "since": since}


def _gone(holder: dict[str, Any]) -> bool:
    """Is the lock's holder provably no longer running, or this very process or SLURM job?"""
    me = _me()
    if (holder.get("host"), holder.get("pid"), holder.get("start")) == (me["host"], me["pid"], me["start"]):
        return True  # this process (fit() called again in one script)
    if holder.get("job") and holder.get("job") == me["job"]:
        return True  # the same SLURM job: requeued after a preemption or a node failure
    if holder.get("host") != me["host"]:
        return False  # another host's process: cannot tell from here
    pid = int(holder.get("pid", -1))
    return pid <= 0 or _start_time(pid) != str(holder.get("start", ""))


def lock(path: str) -> None:
    """Take the run directory for this job; ConfigError naming the holder when another job has it."""
    target = os.path.join(path, LOCK)
    for _ in range(2):
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(target, encoding="utf-8") as fh:
                    holder = json.load(fh)
            except (OSError, ValueError):
                holder = {}
            if not isinstance(holder, dict) or not _gone(holder):
                who = ", ".join(f"{k} {holder.get(k)}" for k in ("host", "pid", "job", "since") if holder.get(k))
                raise ConfigError(
                    f"run directory {path} is in use by another job ({who or 'unreadable lock'}); wait for it, or "
                    f"remove {target} once that job is gone"
                ) from None
            os.remove(target)  # the holder is gone: take over
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_me(), fh)
        # Released at the end of the run (write_summary), or at any interpreter exit (an agreed
        # error's exit 2, 3 or 4); an abort leaves it, and the next run takes it over (_gone).
        atexit.register(unlock, path)
        return
    raise ConfigError(f"run directory {path}: another job took {target} at the same moment")


def unlock(path: str) -> None:
    """Release the run directory, if this process holds it."""
    target = os.path.join(path, LOCK)
    try:
        with open(target, encoding="utf-8") as fh:
            holder = json.load(fh)
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.remove(target)
    except (OSError, ValueError, AttributeError):
        pass


def default_path(cfg: Config) -> str:
    """runs/<env>-s<seed>-<local time stamp>, relative to the working directory."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{cfg.env_id.replace('/', '_')}-s{cfg.seed}-{stamp}")


# What a run writes into its directory (with --overwrite, an old run's are moved aside).
RUN_FILES = ("config.json", "metrics.jsonl", "progress.csv", "episodes.csv", "summary.json", "tb", "checkpoints")


def choose(cfg: Config) -> str:
    """The run directory's absolute path (nothing is created yet). ConfigError when it already
    holds a run and neither --overwrite nor --resume says to reuse it, or when it holds files
    that are not a run's and --overwrite does not say to write among them."""
    path = os.path.abspath(cfg.run_dir or default_path(cfg))
    if os.path.exists(os.path.join(path, "config.json")) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(
            f"run directory {path} already holds a run; pass --overwrite, --resume auto or another --run-dir"
        )
    try:
        entries = sorted(e for e in os.listdir(path) if e != LOCK and not e.startswith(".overwritten-"))
    except OSError:  # none yet (or not a folder: create says so)
        entries = []
    if entries and "config.json" not in entries and not cfg.overwrite:
        raise ConfigError(
            f"run directory {path} holds files that are not an mpirl run's ({', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}); pass --overwrite to write among them, or another --run-dir"
        )
    return path


def _start_clean(cfg: Config, path: str) -> None:
    """After the lock: remove temporaries an interrupted write left (only this job writes here
    now), and with --overwrite (not --resume) move an old run's files aside, so that its
    checkpoints, metrics and ``latest`` never mix with the new run's; nothing is deleted."""
    folder = os.path.join(path, "checkpoints")
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
    old = [e for e in RUN_FILES if os.path.exists(os.path.join(path, e))]
    if cfg.overwrite and not cfg.resume and old:
        aside = os.path.join(path, f".overwritten-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
        os.makedirs(aside)
        for name in old:
            os.replace(os.path.join(path, name), os.path.join(aside, name))
        print(f"mpirl: --overwrite: the previous run's files were moved to {aside}", file=sys.stderr, flush=True)


def probe_writable(path: str) -> None:
    """Write, fsync and remove a 1 MiB file: a read-only or full file system fails here, at
    start-up, rather than at the first checkpoint hours later."""
    probe = os.path.join(path, f".mpirl-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def create(cfg: Config, path: str, checkpoint_bytes: int) -> None:
    """Create, lock and probe the run directory and write config.json; warn (stderr) when the
    file system has less room than one checkpoint of ``checkpoint_bytes`` (an upper bound with
    full replay buffers). ConfigError when the directory cannot be used or another job holds it."""
    try:
        os.makedirs(path, exist_ok=True)
        lock(path)  # before anything is written into it
        _start_clean(cfg, path)
        probe_writable(path)
        fsutil.write_text_atomic(os.path.join(path, "config.json"), json.dumps(cfg.to_dict(), indent=2))
        free = shutil.disk_usage(path).free
    except OSError as exc:
        raise ConfigError(f"run directory {path} is not usable: {exc.strerror or exc}") from None
    if checkpoint_bytes > free:
        print(
            f"mpirl: warning: {path} has {free / 2**30:.1f} GiB free; full replay buffers make checkpoints "
            f"of up to {checkpoint_bytes / 2**30:.1f} GiB before compression",
            file=sys.stderr,
            flush=True,
        )


def write_summary(path: str, summary: dict[str, Any]) -> None:
    """summary.json, then release the run directory; a full disk only warns: it must not turn a
    finished run into a crash."""
    try:
        fsutil.write_text_atomic(os.path.join(path, "summary.json"), json.dumps(summary, indent=2))
    except OSError as exc:
        print(f"mpirl: warning: summary.json not written: {exc}", file=sys.stderr, flush=True)
    unlock(path)
