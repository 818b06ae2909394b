"""Rank 0's run-directory writers: JSONL (every record), CSV (progress rows only), the episode
log (``episodes.csv``: every episode of every rank), TensorBoard.

Only rank 0 constructs a ``MetricsWriter``; other ranks never open files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import IO, Any, Optional

from mpirl import fsutil


class MetricsWriter:
    """Appends records to ``metrics.jsonl``, progress rows to ``progress.csv`` and, when
    tensorboard is installed and enabled, scalars to ``tb/``. Flushes each record, so a
    killed run keeps every line it logged."""

    CSV_FIELDS = (
        "global_env_steps", "updates", "episodes", "wall_time_s", "sps", "updates_per_s",
        "mean_return", "mean_length", "loss", "epsilon", "eval_mean_return",
    )  # fmt: skip

    EPISODE_FIELDS = ("global_env_steps", "rank", "env", "return", "length")

    def __init__(self, run_dir: str, tensorboard: bool = True, resumed_at: Optional[int] = None) -> None:
        """``resumed_at``: the global env steps of the checkpoint a run resumed from; episode log
        rows after it (logged before a crash, redone now) are dropped, so each is there once."""
        self.run_dir = run_dir
        self._failed = False
        episodes = os.path.join(run_dir, "episodes.csv")
        if resumed_at is not None and os.path.exists(episodes):
            _truncate_episode_log(episodes, resumed_at)
        new_log = not os.path.exists(episodes) or os.path.getsize(episodes) == 0
        self._episodes: IO[str] = open(episodes, "a", newline="", encoding="utf-8")
        if new_log:
            self._episodes.write(",".join(self.EPISODE_FIELDS) + "\n")
        self._jsonl: IO[str] = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
        csv_path = os.path.join(run_dir, "progress.csv")
        new_csv = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
        self._csv_file: IO[str] = open(csv_path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._tb: Optional[Any] = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def write(self, kind: str, record: dict[str, Any]) -> None:
        """One record of ``kind`` ('train', 'eval', 'final', ...). A failed write (disk full)
        is reported once and training goes on: logs are not worth a run."""
        try:
            self._write(kind, record)
            self._failed = False
        except OSError as exc:
            if not self._failed:
                print(f"mpirl: warning: metrics not written to {self.run_dir}: {exc}", file=sys.stderr, flush=True)
            self._failed = True

    def _write(self, kind: str, record: dict[str, Any]) -> None:
        row = {"kind": kind, **record}
        self._jsonl.write(json.dumps(row, default=float) + "\n")
        self._jsonl.flush()
        if kind == "train":  # one row shape per file: evaluations live in metrics.jsonl
            self._csv.writerow(record)
            self._csv_file.flush()
        if self._tb is not None:
            step = int(record.get("global_env_steps", 0))
            for key, value in record.items():
                if key != "global_env_steps" and isinstance(value, (int, float)) and value == value:
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def write_episodes(self, by_rank: list[list[tuple[int, int, float, int]]]) -> None:
        """Append every rank's finished episodes ((global step, env, return, length) lists, in
        rank order) to ``episodes.csv``, ordered by step, rank, env; returns at full precision."""
        rows = sorted((step, rank, env, ret, n) for rank, eps in enumerate(by_rank) for step, env, ret, n in eps)
        try:
            self._episodes.write("".join(f"{s},{r},{e},{ret!r},{n}\n" for s, r, e, ret, n in rows))
            self._episodes.flush()
        except OSError as exc:
            print(f"mpirl: warning: episode log not written to {self.run_dir}: {exc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for fh in (self._jsonl, self._csv_file, self._episodes, self._tb):
            try:
                if fh is not None:
                    fh.close()
            except OSError:
                pass


def _truncate_episode_log(path: str, last_step: int) -> None:
    """Keep the header and the rows of episodes that ended at or before ``last_step``."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    head = [ln.split(",", 1)[0] for ln in lines]
    # complete rows only (a kill during a write can leave half a line), of episodes up to the step
    kept = lines[:1] + [
        ln for ln, h in zip(lines[1:], head[1:]) if ln.endswith("\n") and h.isdigit() and int(h) <= last_step
    ]
    if len(kept) != len(lines):
        fsutil.write_text_atomic(path, "".join(kept))


def fmt_time(seconds: float) -> str:
    """A duration for a progress line: ``42s``, ``3m07s``, or ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
