"""Soak: 2 ranks train for --minutes at a short checkpoint interval; resident memory of each
rank is sampled throughout and compared between the start (after --warmup-s) and the end;
the run is then stopped by SIGUSR1 (checkpoint + exit 0) and must end with identical
parameters on both ranks. Not part of CI (it is minutes long).

    .venv/bin/python benchmarks/soak.py --minutes 20 [--json benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time

from common import LAUNCH, machine, rss_mib


def rank_pids(marker: str) -> dict[int, int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    pids: dict[int, int] = {}
    for p in out:
        try:
            with open(f"/proc/{p}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                pids[int(item.split(b"=")[1])] = int(p)
    return pids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="first memory sample after this")
    ap.add_argument("--checkpoint-interval", type=int, default=20_000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mpirl-soak-") as tmp:
        run = os.path.join(tmp, "run")
        cmd = [LAUNCH, "-np", "2", "--", "python", "-m", "mpirl.train", "--total-env-steps", str(10**10),
               "--no-early-stop", "--checkpoint-interval", str(args.checkpoint_interval), "--run-dir", run,
               "--no-tensorboard", "--log-interval", "100000"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip
        t0 = time.monotonic()
        samples: list[tuple[float, dict[int, float]]] = []
        while time.monotonic() - t0 < args.minutes * 60 and proc.poll() is None:
            time.sleep(10)
            pids = rank_pids(run)
            if len(pids) == 2:
                samples.append((time.monotonic() - t0, {r: rss_mib(p) for r, p in pids.items()}))
        os.killpg(proc.pid, signal.SIGUSR1)  # the launcher's mpirun forwards it to the ranks
        out, _ = proc.communicate(timeout=300)
        with open(os.path.join(run, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
        ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    start = next(s for t, s in samples if t >= args.warmup_s)
    end = samples[-1][1]
    result = {
        "machine": machine(), "minutes": args.minutes, "returncode": proc.returncode,
        "rss_start_mib": start, "rss_end_mib": end,
        "rss_growth_pct": {r: 100 * (end[r] - start[r]) / start[r] for r in start},
        "global_env_steps": summary["global_env_steps"], "updates": summary["updates"],
        "checkpoint_s": summary["checkpoint_s"], "wall_time_s": summary["wall_time_s"],
        "replicas_identical": summary["replicas_identical"], "preempted": summary["preempted"],
        "checkpoint_files_kept": [c for c in ckpts if c.endswith(".h5")],
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
