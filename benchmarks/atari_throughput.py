"""Atari (Pong) and CartPole throughput: both env backends (gymnasium, EnvPool) at 1 and 2
ranks, side by side in one run, and where a training iteration's time goes on each.

Weak scaling with the Atari preset (configs/atari-dqn.toml: 4 envs per rank, Nature CNN with a
dueling head, batch 32 per rank, one update per vector step, i.e. one update per 4 env steps
of each rank: the Nature DQN's update-to-data ratio). Two phases are timed apart:
``acting`` (warm-up: no updates, eps-greedy acting and replay writes only) and ``training``
(updates on). Frames are emulator frames: 4 per env step (frame skip 4). Variants run
interleaved, medians over repeats; ratios are against gymnasium at the same phase and ranks
(``vs gymnasium``) and against 1 rank of the same backend (``vs 1 rank``). CartPole runs the
default options (8 envs per rank, an MLP) the same way. Last, ``benchmarks/profile_step.py``
at 1 rank per backend: the training iteration's milliseconds in env step, replay sample,
host-to-device copy, update and allreduce.

    .venv/bin/python benchmarks/atari_throughput.py [--steps-per-rank 2000] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import REPO, RESULTS, VENV_PYTHON, machine, run_mpirl, write_json

PRESET = os.path.join(REPO, "configs", "atari-dqn.toml")
FRAME_SKIP = 4


BACKENDS = ("gymnasium", "envpool")
GAMES = {  # game -> (options, frames per env step); updates start after one batch per rank
    "pong": (["--config", PRESET, "--env", "ALE/Pong-v5", "--learning-starts-per-rank", "64"], FRAME_SKIP),
    "cartpole": (["--env", "CartPole-v1", "--learning-starts-per-rank", "128"], 1),
}


def _run(game: str, backend: str, np: int, steps_per_rank: int, training: bool) -> dict:
    options, frames = GAMES[game]
    steps = steps_per_rank * np
    # Training: updates start at once (after one batch); acting: a training phase is never due
    # (mpirl refuses a warm-up as long as the budget: such a run could never update).
    no_training = [] if training else ["--train-every", str(10**9)]
    s = run_mpirl(np, [*options, "--env-backend", backend, "--total-env-steps", str(steps), *no_training,
                       "--buffer-size-per-rank", str(steps_per_rank + 1),
                       "--eval-interval", "0", "--final-eval-episodes", "0", "--log-interval", str(steps),
                       "--checkpoint-interval", "0", "--no-checkpoint-replay", "--no-early-stop"],
                  timeout=1800)  # fmt: skip
    wall = s["wall_time_s"]
    return {
        "frames_per_s_per_rank": s["global_env_steps"] * frames / wall / np,
        "env_steps_per_s": s["global_env_steps"] / wall,
        "updates_per_s": s["updates"] / wall,
        "updates": s["updates"],
    }


def _profile(game: str, backend: str, iterations: int) -> dict:
    """benchmarks/profile_step.py at 1 rank: milliseconds per training iteration by phase."""
    options, _ = GAMES[game]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "profile.json")
        cmd = [VENV_PYTHON, os.path.join(REPO, "benchmarks", "profile_step.py"), *options, "--env-backend", backend,
               "--iterations", str(iterations), "--json", out]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
        with open(out, encoding="utf-8") as fh:
            return json.load(fh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-per-rank", type=int, default=2_000, help="Pong env steps per rank per run")
    ap.add_argument("--cartpole-steps-per-rank", type=int, default=10_000, help="CartPole env steps per rank per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile-iterations", type=int, default=200)
    ap.add_argument("--json", default=os.path.join(RESULTS, "atari_throughput.json"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 (CartPole 2,000) env steps per rank, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.steps_per_rank, args.cartpole_steps_per_rank, args.repeats, args.profile_iterations = 400, 2000, 1, 50
    try:
        import envpool  # noqa: F401
    except ImportError:
        sys.exit("atari_throughput.py compares both env backends: install EnvPool (MPIRL_EXTRAS=test,envpool)")
    per_rank = {"pong": args.steps_per_rank, "cartpole": args.cartpole_steps_per_rank}
    variants = [(g, phase, np, b) for g in GAMES for phase in ("acting", "training") for np in (1, 2) for b in BACKENDS]
    samples: dict[tuple[str, str, int, str], list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for g, phase, np, b in variants:  # interleaved: the two backends of one cell run back to back
            samples[(g, phase, np, b)].append(_run(g, b, np, per_rank[g], phase == "training"))
    med = {v: {k: statistics.median(x[k] for x in xs) for k in xs[0]} for v, xs in samples.items()}
    print(f"machine: {machine()}")
    print("| game | phase | ranks | env backend | frames/s per rank | updates/s | vs gymnasium | vs 1 rank |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for g, phase, np, b in variants:
        m = med[(g, phase, np, b)]
        m["vs_gymnasium"] = m["frames_per_s_per_rank"] / med[(g, phase, np, "gymnasium")]["frames_per_s_per_rank"]
        m["vs_1_rank"] = m["frames_per_s_per_rank"] / med[(g, phase, 1, b)]["frames_per_s_per_rank"]
        results.append({"game": g, "phase": phase, "ranks": np, "env_backend": b, **m})
        print(f"| {g} | {phase} | {np} | {b} | {m['frames_per_s_per_rank']:,.0f} | {m['updates_per_s']:,.1f} | "
              f"{m['vs_gymnasium']:.2f}x | {m['vs_1_rank']:.2f}x |")  # fmt: skip
    profiles = []
    print("\n| game | env backend | ms per training iteration: env / sample / host-to-device / update / allreduce |")
    print("| --- | --- | --- |")
    for g in GAMES:
        for b in BACKENDS:
            p = _profile(g, b, args.profile_iterations)
            profiles.append({"game": g, "env_backend": b, **p})
            ms = p["ms_per_iteration"]
            phases = ("env", "sample", "host_to_device", "update", "allreduce")
            parts = " / ".join(f"{ms.get(k, 0.0):.2f}" for k in phases)
            print(f"| {g} | {b} | {parts} (plain iteration {p['plain_iteration_ms']:.2f} ms) |")
    write_json(args.json, {"machine": machine(), "args": vars(args), "update_to_data": "Pong: 1 update of 32 "
                           "samples per rank per 4 env steps of that rank", "results": results,
                           "profiles": profiles})  # fmt: skip


if __name__ == "__main__":
    main()
