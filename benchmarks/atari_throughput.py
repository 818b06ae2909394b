"""Atari (Pong) throughput on this machine: frames/s per rank at 1 and 2 ranks, side by side.

Weak scaling with the Atari preset (configs/atari-dqn.toml: 4 envs per rank, Nature CNN with a
dueling head, batch 32 per rank, one update per vector step, i.e. one update per 4 env steps
of each rank: the Nature DQN's update-to-data ratio). Two phases are timed apart:
``acting`` (warm-up: no updates, eps-greedy acting and replay writes only) and ``training``
(updates on). Frames are emulator frames: 4 per env step (frame skip 4). Variants run
interleaved, medians over repeats; ratios are against 1 rank of the same run.

    .venv/bin/python benchmarks/atari_throughput.py [--steps-per-rank 2000] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics

from common import REPO, RESULTS, machine, run_mpirl, write_json

PRESET = os.path.join(REPO, "configs", "atari-dqn.toml")
FRAME_SKIP = 4


def _run(np: int, steps_per_rank: int, training: bool) -> dict:
    steps = steps_per_rank * np
    # Training: updates start at once (after one batch); acting: a training phase is never due
    # (mpirl refuses a warm-up as long as the budget: such a run could never update).
    no_training = [] if training else ["--train-every", str(10**9)]
    s = run_mpirl(np, ["--config", PRESET, "--env", "ALE/Pong-v5", "--total-env-steps", str(steps), *no_training,
                       "--learning-starts-per-rank", "64", "--buffer-size-per-rank", str(steps_per_rank + 1),
                       "--eval-interval", "0", "--final-eval-episodes", "0", "--log-interval", str(steps),
                       "--checkpoint-interval", "0", "--no-checkpoint-replay"], timeout=1800)  # fmt: skip
    wall = s["wall_time_s"]
    return {
        "frames_per_s_per_rank": s["global_env_steps"] * FRAME_SKIP / wall / np,
        "env_steps_per_s": s["global_env_steps"] / wall,
        "updates_per_s": s["updates"] / wall,
        "updates": s["updates"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-per-rank", type=int, default=2_000, help="env steps per rank per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(RESULTS, "atari_throughput.json"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 env steps per rank, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.steps_per_rank, args.repeats = 400, 1
    variants = [(phase, np) for phase in ("acting", "training") for np in (1, 2)]
    samples: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for phase, np in variants:
            samples[(phase, np)].append(_run(np, args.steps_per_rank, phase == "training"))
    print(f"machine: {machine()}")
    print("| phase | ranks | frames/s per rank | global env steps/s | updates/s | per-rank frames/s vs 1 rank |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = []
    for phase, np in variants:
        med = {k: statistics.median(x[k] for x in samples[(phase, np)]) for k in samples[(phase, np)][0]}
        base = statistics.median(x["frames_per_s_per_rank"] for x in samples[(phase, 1)])
        med["ratio_vs_1_rank"] = med["frames_per_s_per_rank"] / base
        results.append({"phase": phase, "ranks": np, **med})
        print(f"| {phase} | {np} | {med['frames_per_s_per_rank']:,.0f} | {med['env_steps_per_s']:,.0f} | "
              f"{med['updates_per_s']:,.1f} | {med['ratio_vs_1_rank']:.2f}x |")  # fmt: skip
    write_json(args.json, {"machine": machine(), "args": vars(args), "update_to_data": "1 update of 32 samples "
                           "per rank per 4 env steps of that rank", "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
