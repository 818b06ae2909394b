"""The run directory: where it is, whether it may be written, and the files rank 0 writes
into it besides checkpoints and metrics (``config.json``, ``summary.json``).

Rank 0 alone calls these; the trainer agrees on their outcome with ``dist.rank0_decides``, so
every rank learns the path, or raises the same ConfigError, before anything else happens.

    <run_dir>/config.json      the run's options (Config.to_dict()), written at start
    <run_dir>/metrics.jsonl    every record (mpirl.metrics)
    <run_dir>/progress.csv     progress rows
    <run_dir>/checkpoints/     step-<global env steps>.h5 and ``latest`` (mpirl.checkpoint)
    <run_dir>/summary.json     the run's Summary, written at the end
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
from typing import Any

from mpirl import fsutil
from mpirl.config import Config, ConfigError

PROBE_BYTES = 1 << 20


def default_path(cfg: Config) -> str:
    """runs/<env>-s<seed>-<local time stamp>, relative to the working directory."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{cfg.env_id.replace('/', '_')}-s{cfg.seed}-{stamp}")


def choose(cfg: Config) -> str:
    """The run directory's absolute path (nothing is created yet). ConfigError when it already
    holds a run and neither --overwrite nor --resume says to reuse it."""
    path = os.path.abspath(cfg.run_dir or default_path(cfg))
    if os.path.exists(os.path.join(path, "config.json")) and not (cfg.overwrite or cfg.resume):
        raise ConfigError(
            f"run directory {path} already holds a run; pass --overwrite, --resume auto or another --run-dir"
        )
    return path


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
    """Create and probe the run directory and write config.json; warn (stderr) when the file
    system has less room than one checkpoint of ``checkpoint_bytes`` (an upper bound with full
    replay buffers). ConfigError when the directory cannot be used."""
    try:
        os.makedirs(path, exist_ok=True)
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
    """summary.json; a full disk only warns: it must not turn a finished run into a crash."""
    try:
        fsutil.write_text_atomic(os.path.join(path, "summary.json"), json.dumps(summary, indent=2))
    except OSError as exc:
        print(f"mpirl: warning: summary.json not written: {exc}", file=sys.stderr, flush=True)
