"""Time to solve CartPole-v1, side by side: Stable-Baselines3 DQN (rl-baselines3-zoo
hyperparameters, one process), mpirl at 1 rank and mpirl at 2 ranks (default options).

    .venv/bin/python benchmarks/solve_cartpole.py [--seeds 1 2 3 4 5] [--variants sb3 mpirl-1 mpirl-2]
    .venv/bin/python benchmarks/solve_cartpole.py --variants mpirl-2-horovod mpirl-2-torch mpirl-2-torch-plain
    .venv/bin/python benchmarks/solve_cartpole.py --quick        # smoke run: 1 seed, small budgets

One criterion for all: a greedy evaluation of 20 episodes every 5,000 global env steps, the run
stopping once its mean reaches 475; then a final greedy evaluation of 20 fresh episodes decides
"solved" (same evaluation seeds for both libraries; see sb3_cartpole.py). Wall time is from
process start to exit, measured from outside (interpreter and MPI start-up, evaluations and
mpirl's final checkpoint included). Budgets: mpirl its default 300,000 global env steps, SB3
150,000 (3x the zoo's 5e4, which often ends unsolved; more would let an unsolved seed run for
minutes). Torch threads: SB3 all cores (cores / 1 process, torch's own default too; --sb3-threads);
mpirl its own default per rank, cores / ranks, except that launch/mpirun.sh binds a rank to one
core when ranks <= cores, so mpirl at 1 rank runs 1 thread on 1 of the 2 cores here.
--quick runs SB3 on 1 thread: on a machine busy with other work, 2 OpenMP threads per process
thrash (SB3's learn() measured 7x slower with 2 threads than with 1 under load).
Variants run interleaved per seed (seed 1: sb3, mpirl-1, mpirl-2; seed 2: ...) so that the
machine's noise hits all alike.

Needs stable-baselines3 for the sb3 variant (install: see sb3_cartpole.py). Learning curves are
kept as run directories ``<curves-dir>/sb3-s<seed>/`` and ``<curves-dir>/mpirl-<ranks>r-s<seed>/``
(each with metrics.jsonl), for ``python -m mpirl.plot``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from typing import Callable

from common import QUICK_RESULTS, RESULTS, fresh_dir, machine, read_json, run_mpirl, run_timed, write_json
from sb3_cartpole import sb3_missing

HERE = os.path.dirname(os.path.abspath(__file__))
MPIRL_BUDGET = 300_000  # mpirl's default --total-env-steps
SB3_BUDGET = 150_000
# --quick: a smoke run, not expected to solve. SB3 does 0.5 updates per env step (train_freq 256,
# gradient_steps 128), mpirl 0.25 at 1 rank, so SB3 gets half the steps for a similar time.
QUICK_MPIRL_BUDGET, QUICK_SB3_BUDGET = 10_000, 5_000
GOAL_RATIO = 0.5  # issue 5: mpirl at 2 ranks in at most half of SB3's median time


def run_sb3(seed: int, run_dir: str, budget: int, threads: int, timeout: float) -> dict:
    """One SB3 run in its own process; its summary.json plus the outside wall time (``total_wall_s``)."""
    run_dir = fresh_dir(run_dir)
    cmd = [sys.executable, os.path.join(HERE, "sb3_cartpole.py"), "--seed", str(seed), "--run-dir", run_dir,
           "--budget", str(budget), "--torch-threads", str(threads)]  # fmt: skip
    _, wall = run_timed(cmd, timeout=timeout)
    return {**read_json(os.path.join(run_dir, "summary.json")), "total_wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--variants", nargs="+", default=["sb3", "mpirl-1", "mpirl-2"],
                    help="sb3 and/or mpirl-<ranks>, run in this order for each seed")  # fmt: skip
    ap.add_argument("--ranks", type=int, nargs="+", help="mpirl alone at these rank counts (= --variants mpirl-N)")
    ap.add_argument("--mpirl-budget", type=int, default=MPIRL_BUDGET, help="global env steps")
    ap.add_argument("--sb3-budget", type=int, default=SB3_BUDGET, help="env steps")
    ap.add_argument("--sb3-threads", type=int, default=0, help="torch threads of SB3; 0: all cores (--quick: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 1 only, small budgets, SB3 on 1 thread")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--json", default=None, help="default: <results>/solve_cartpole.json; '' to skip")
    ap.add_argument("--curves-dir", default=None, help="run directories kept here; default: <results>/curves")
    args = ap.parse_args()
    results_dir = QUICK_RESULTS if args.quick else RESULTS  # smoke figures never land in benchmarks/results
    args.json = os.path.join(results_dir, "solve_cartpole.json") if args.json is None else args.json
    args.curves_dir = args.curves_dir or os.path.join(results_dir, "curves")
    if args.ranks:
        args.variants = [f"mpirl-{n}" for n in args.ranks]
    if args.quick:
        args.seeds, args.mpirl_budget, args.sb3_budget = args.seeds[:1], QUICK_MPIRL_BUDGET, QUICK_SB3_BUDGET
        args.sb3_threads = args.sb3_threads or 1
    args.sb3_threads = args.sb3_threads or (os.cpu_count() or 1)
    if "sb3" in args.variants and sb3_missing():
        sys.exit(f"solve_cartpole: {sb3_missing()} (or leave it out: --variants mpirl-1 mpirl-2)")

    def runner(variant: str) -> Callable[[int], dict]:
        """seed -> summary of one run of ``variant``."""
        if variant == "sb3":
            return lambda seed: run_sb3(seed, os.path.join(args.curves_dir, f"sb3-s{seed}"), args.sb3_budget,
                                        args.sb3_threads, args.timeout)  # fmt: skip
        # mpirl-<ranks>[-<backend>][-plain]: e.g. mpirl-2, mpirl-2-torch, mpirl-2-horovod-plain
        parts = variant.split("-")
        if parts[0] == "mpirl" and len(parts) >= 2 and parts[1].isdigit():
            np, rest = int(parts[1]), parts[2:]
            plain = "plain" in rest
            backend = [p for p in rest if p != "plain"]
            opts = ["--backend", backend[0]] if backend else []
            tag = "-".join([f"{np}r", *rest])
            return lambda seed: run_mpirl(np, ["--seed", str(seed), "--total-env-steps", str(args.mpirl_budget),
                                               *opts], timeout=args.timeout, plain=plain,
                                          run_dir=os.path.join(args.curves_dir, f"mpirl-{tag}-s{seed}"))  # fmt: skip
        sys.exit(f"solve_cartpole: unknown variant {variant!r} (sb3 or mpirl-<ranks>[-<backend>][-plain])")

    runners = {v: runner(v) for v in args.variants}

    print(f"machine: {machine()}")
    rows: dict[str, list[dict]] = {v: [] for v in runners}
    failures: list[str] = []
    for seed in args.seeds:
        for name, run in runners.items():  # interleaved: noise hits every variant alike
            try:
                s = run(seed)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # report it, go on with the others
                failures.append(f"{name} seed {seed}: {exc}")
                print(f"{name} seed {seed}: FAILED: {exc}", flush=True)
                continue
            s["seed"] = seed
            rows[name].append(s)
            print(f"{name} seed {seed}: {s['total_wall_s']:.1f} s wall, {s['global_env_steps']:,} env steps, "
                  f"{s['updates']:,} updates, final eval {s['final_eval_mean']:.1f}, solved {s['solved']}",
                  flush=True)  # fmt: skip

    # Medians over all runs that finished: an unsolved run counts with the time of its whole budget.
    results = []
    for name, rs in rows.items():
        if not rs:
            continue
        results.append({
            "variant": name, "runs": len(rs), "solved": sum(bool(r["solved"]) for r in rs),
            "median_wall_s": statistics.median(r["total_wall_s"] for r in rs),
            "median_env_steps": statistics.median(r["global_env_steps"] for r in rs),
            "median_updates": statistics.median(r["updates"] for r in rs), "rows": rs,
        })  # fmt: skip
    by_name = {r["variant"]: r for r in results}
    ratios = {}
    if "sb3" in by_name:
        for r in results:
            if r["variant"] != "sb3":
                ratios[f"{r['variant']} / sb3"] = r["median_wall_s"] / by_name["sb3"]["median_wall_s"]

    print("| variant | solved | median wall s | median env steps | median updates | wall vs SB3 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = ratios.get(f"{r['variant']} / sb3")
        print(f"| {r['variant']} | {r['solved']}/{r['runs']} | {r['median_wall_s']:.1f} | "
              f"{r['median_env_steps']:,.0f} | {r['median_updates']:,.0f} | "
              f"{'-' if ratio is None else f'{ratio:.2f}x'} |")  # fmt: skip
    if "mpirl-2 / sb3" in ratios:
        ok = ratios["mpirl-2 / sb3"] <= GOAL_RATIO
        print(f"mpirl-2 / SB3 median wall time: {ratios['mpirl-2 / sb3']:.2f}x (goal <= {GOAL_RATIO}x: "
              f"{'met' if ok else 'not met'})")  # fmt: skip
    if args.json:
        write_json(args.json, {
            "machine": machine(), "args": vars(args), "goal_ratio": GOAL_RATIO, "ratios": ratios, "results": results,
            "failures": failures,
        })  # fmt: skip
    if failures:
        sys.exit(f"solve_cartpole: {len(failures)} run(s) failed")


if __name__ == "__main__":
    main()
