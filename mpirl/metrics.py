"""Rank 0's run-directory writers: JSONL (every record), CSV (progress rows only), TensorBoard.

Only rank 0 constructs a ``MetricsWriter``; other ranks never open files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import IO, Any, Optional


class MetricsWriter:
    """Appends records to ``metrics.jsonl``, progress rows to ``progress.csv`` and, when
    tensorboard is installed and enabled, scalars to ``tb/``. Flushes each record, so a
    killed run keeps every line it logged."""

    CSV_FIELDS = (
        "global_env_steps", "updates", "episodes", "wall_time_s", "sps", "updates_per_s",
        "mean_return", "mean_length", "loss", "epsilon", "eval_mean_return",
    )  # fmt: skip

    def __init__(self, run_dir: str, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self._failed = False
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

    def close(self) -> None:
        for fh in (self._jsonl, self._csv_file, self._tb):
            try:
                if fh is not None:
                    fh.close()
            except OSError:
                pass


def fmt_time(seconds: float) -> str:
    """A duration for a progress line: ``42s``, ``3m07s``, or ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
