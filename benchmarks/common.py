"""Shared helpers for the benchmarks: run mpirl under the local launcher, read its summary."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "mpirun.sh")


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {platform.system()} {platform.release()}"


def run_mpirl(np: int, args: Sequence[str], env: Optional[dict[str, str]] = None, timeout: float = 900) -> dict:
    """Run ``python -m mpirl.train ARGS`` on ``np`` ranks; return summary.json plus the
    launcher-measured wall time (``total_wall_s``, start-up included)."""
    with tempfile.TemporaryDirectory(prefix="mpirl-bench-") as tmp:
        run_dir = os.path.join(tmp, "run")
        cmd = [LAUNCH, "-np", str(np), "--", "python", "-m", "mpirl.train", *args,
               "--run-dir", run_dir, "--no-tensorboard"]  # fmt: skip
        full_env = {**os.environ, **(env or {})}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
    summary["total_wall_s"] = wall
    return summary
