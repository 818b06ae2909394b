"""What ``--record-episodes`` costs: training throughput with and without recording, CartPole and
Pong at 2 ranks, interleaved side by side in one run (off, on, off, on, ...: drift in the
machine's load hits both alike), and the bytes a recorded env step takes on disk.

    PYTHONPATH=. .venv/bin/python benchmarks/recording_overhead.py [--repeats 3] [--quick]

Each run trains (updates on from the first batch) for a fixed budget; the figure is global env
steps per second over the training loop (``summary.json``'s wall time, which includes the final
checkpoint and so the recording's last flush). CartPole uses the default options (8 envs per
rank, an MLP: the cheapest update, so the worst case for an overhead that scales with env
steps); Pong ``configs/atari-dqn.toml`` (4 envs per rank, Nature CNN; env backend ``auto``),
in training and in acting (no updates: only env steps and replay writes, the worst case for
Pong). Bytes per step: the recording's chunk files over the global env steps recorded.

Second, in one process, the part of the cost that a rank-0-only writer would multiply: the
seconds a rank spends writing its chunks (lzf, Fletcher-32, fsync) per env step, beside the
time of an env step. Written by each rank, that cost runs in parallel on N ranks; gathered to
rank 0, rank 0 would pay it N times (plus the transfer) while the others wait for it at the
next gradient allreduce.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from common import REPO, RESULTS, machine, run_mpirl, write_json

PRESET = os.path.join(REPO, "configs", "atari-dqn.toml")
VARIANTS = {  # name -> (options, steps per rank, quick steps per rank)
    "cartpole-training": (["--env", "CartPole-v1", "--learning-starts-per-rank", "128"], 10_000, 2_000),
    "pong-training": (["--config", PRESET, "--env", "ALE/Pong-v5", "--learning-starts-per-rank", "64"], 800, 200),
    "pong-acting": (
        ["--config", PRESET, "--env", "ALE/Pong-v5", "--learning-starts-per-rank", "64", "--train-every", str(10**9)],
        3_000,
        400,
    ),  # fmt: skip
}


def _run(name: str, record: bool, np: int, quick: bool) -> dict:
    options, steps_per_rank, quick_steps = VARIANTS[name]
    per_rank = quick_steps if quick else steps_per_rank
    steps = per_rank * np
    rec = tempfile.mkdtemp(prefix="mpirl-rec-")
    try:
        extra = ["--record-episodes", rec] if record else []
        s = run_mpirl(np, [*options, "--total-env-steps", str(steps), "--buffer-size-per-rank", str(per_rank + 1),
                           "--eval-interval", "0", "--final-eval-episodes", "0", "--log-interval", str(steps),
                           "--checkpoint-interval", "0", "--no-checkpoint-replay", "--no-early-stop", *extra],
                      timeout=1800)  # fmt: skip
        chunks = os.path.join(rec, "chunks")
        size = sum(os.path.getsize(os.path.join(chunks, f)) for f in os.listdir(chunks)) if record else 0
    finally:
        shutil.rmtree(rec, ignore_errors=True)
    steps_done = s["global_env_steps"]
    return {"env_steps_per_s": steps_done / s["wall_time_s"], "global_env_steps": steps_done, "updates": s["updates"],
            "recording_bytes": size, "bytes_per_step": size / steps_done}  # fmt: skip


def _write_cost(env_id: str, options: list[str], steps: int) -> dict:
    """One rank, in process: chunk-write seconds per env step against an env step's time."""
    sys.path.insert(0, REPO)
    from mpirl import envs
    from mpirl.collector import Collector
    from mpirl.config import parse_args

    cfg = parse_args([*options, "--env", env_id, "--env-backend", "gymnasium", "--buffer-size-per-rank", "2000",
                      "--learning-starts-per-rank", "128"])  # fmt: skip
    info = envs.inspect_env(cfg.env_id, envs.atari_options(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        col = Collector(cfg, info, rank=0)
        os.makedirs(os.path.join(tmp, "chunks"))
        col.start_recording(tmp, 0, limit_bytes=4 << 20)  # chunks of 4 MiB: several flushes timed
        t0 = time.perf_counter()
        for i in range(steps):
            col.step(lambda o: np.zeros(len(o), np.int64), 1.0, i + 1)  # random play (epsilon 1)
        col.close()
        wall = time.perf_counter() - t0
        rec = col.recorder
        assert rec is not None
        env_steps = steps * cfg.num_envs_per_rank
        return {"env": env_id, "env_steps": env_steps, "chunks": rec.chunks_written,
                "write_us_per_env_step": rec.write_s / env_steps * 1e6,
                "collect_us_per_env_step": (wall - rec.write_s) / env_steps * 1e6,
                "bytes_per_env_step": rec.bytes_written / env_steps}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="off/on pairs per variant (CartPole; Pong: 2 at most)")
    ap.add_argument("--np", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: short budgets, 1 repeat")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="which to run")
    ap.add_argument("--no-write-cost", action="store_true", help="skip the one-rank write-cost measurement")
    ap.add_argument("--json", default=os.path.join(RESULTS, "recording_overhead.json"))
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    results: dict[str, dict] = {}
    for name in args.variants:
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(repeats if name.startswith("cartpole") else min(repeats, 2)):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")  # alternate who goes first
            for v in order:
                runs[v].append(_run(name, v == "on", args.np, args.quick))
                print(f"{name} {v}: {runs[v][-1]['env_steps_per_s']:,.1f} env steps/s", flush=True)
        off = statistics.median(x["env_steps_per_s"] for x in runs["off"])
        on = statistics.median(x["env_steps_per_s"] for x in runs["on"])
        results[name] = {"runs": runs, "off_env_steps_per_s": off, "on_env_steps_per_s": on, "ratio": on / off,
                         "overhead_pct": (1 - on / off) * 100,
                         "bytes_per_step": statistics.median(x["bytes_per_step"] for x in runs["on"])}  # fmt: skip
        print(f"{name}: {on:,.1f} vs {off:,.1f} env steps/s ({results[name]['overhead_pct']:+.1f} % overhead), "
              f"{results[name]['bytes_per_step']:,.1f} B/step", flush=True)  # fmt: skip
    writes = (
        []
        if args.no_write_cost
        else [
            _write_cost("CartPole-v1", [], 300 if args.quick else 3000),
            _write_cost("ALE/Pong-v5", ["--config", PRESET], 100 if args.quick else 1000),
        ]
    )
    for w in writes:
        print(f"write cost {w['env']}: {w['write_us_per_env_step']:.1f} us per env step (collecting "
              f"{w['collect_us_per_env_step']:.1f} us), {w['bytes_per_env_step']:,.1f} B/step", flush=True)  # fmt: skip
    write_json(args.json, {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "args": vars(args),
                           "ranks": args.np, "results": results, "write_cost_one_rank": writes})  # fmt: skip
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
