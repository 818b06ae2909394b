"""Throughput of the training loop: global env steps/s and updates/s, side by side.

Variants run interleaved (A B C A B C ...) so that machine noise hits all alike; each figure
is the median over repeats, and each ratio the median of per-round ratios against the 1-rank run
of the same round.
Weak scaling: every rank does the same work (mpirl's CartPole defaults, passed explicitly so that
a --baseline-rev with other defaults does the same work: 8 envs, batch 128 per rank, MLP
128x128), so ideal scaling from 1 to 2 ranks doubles global env steps/s at the same updates/s.

    .venv/bin/python benchmarks/throughput.py [--steps-per-rank 12000] [--repeats 3] [--quick]
        [--baseline-rev REV]      # also run 1 and 2 ranks of commit REV (a git worktree), interleaved,
                                  # and print this checkout's ratio to it per repeat
        [--only-baseline]         # with --baseline-rev: just the 1- and 2-rank runs of both checkouts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from common import machine, run_mpirl, worktree

# name -> (ranks, extra environment, extra mpirl options, plain mpirun instead of launch/mpirun.sh)
VARIANTS: dict[str, tuple[int, dict[str, str], list[str], bool]] = {
    "1 rank": (1, {}, [], False),
    "2 ranks": (2, {}, [], False),  # the default backend (auto) through the local launcher
    "2 ranks, Horovod": (2, {}, ["--backend", "horovod"], False),
    "2 ranks, MPI backend": (2, {}, ["--backend", "mpi"], False),
    "2 ranks, torch Gloo": (2, {}, ["--backend", "torch"], False),
    # What users type: mpirun -np 2 python -m mpi4py -m mpirl.train, with none of our launcher's
    # flags; mpirl itself picks MPI's wait mode (dist._choose_mpi_wait_mode).
    "2 ranks, Horovod, plain mpirun": (2, {}, ["--backend", "horovod"], True),
    "2 ranks, MPI backend, plain mpirun": (2, {}, ["--backend", "mpi"], True),
    "2 ranks, torch Gloo, plain mpirun": (2, {}, ["--backend", "torch"], True),
    # Open MPI's busy polling while the ranks fill the cores (what plain mpirun did before mpirl
    # chose the wait mode itself).
    "2 ranks, Horovod, MPI spinning (no yield)": (
        2,
        {"OMPI_MCA_mpi_yield_when_idle": "0"},
        ["--backend", "horovod"],
        False,
    ),
    # mpirl sets HOROVOD_CYCLE_TIME=0.05 (ms) with several ranks; this is Horovod's default.
    "2 ranks, Horovod's default 1 ms cycle": (2, {"HOROVOD_CYCLE_TIME": "1"}, ["--backend", "horovod"], False),
}


CEILING = "2 independent 1-rank jobs at once, one per core (no communication): the ceiling"
# The per-rank work of every variant, whatever the defaults of the checkout that runs it.
WORK = ["--num-envs-per-rank", "8", "--batch-size-per-rank", "128", "--hidden-sizes", "128,128"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps-per-rank", type=int, default=12_000, help="env steps per rank per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3,000 env steps per rank, 1 repeat")
    ap.add_argument("--baseline-rev", default="", help="a git revision to measure side by side (1 and 2 ranks)")
    ap.add_argument("--only-baseline", action="store_true", help="with --baseline-rev: only 1 and 2 ranks of each")
    args = ap.parse_args()
    if args.quick:
        args.steps_per_rank, args.repeats = 3_000, 1
    # name -> (ranks, extra environment, extra options, plain mpirun, checkout to run: None = this one)
    variants: dict[str, tuple[int, dict[str, str], list[str], bool, Optional[str]]] = {
        name: (np, env, opts, plain, None) for name, (np, env, opts, plain) in VARIANTS.items()
    }
    if args.only_baseline:
        variants = {k: v for k, v in variants.items() if k in ("1 rank", "2 ranks")}
    if args.baseline_rev:
        tree = worktree(args.baseline_rev)
        variants[f"1 rank @ {args.baseline_rev}"] = (1, {}, [], False, tree)
        variants[f"2 ranks @ {args.baseline_rev}"] = (2, {}, [], False, tree)

    def run_args(steps: int) -> list[str]:
        return [*WORK, "--total-env-steps", str(steps), "--eval-interval", "0", "--final-eval-episodes", "0",
                "--log-interval", str(steps)]  # fmt: skip

    ceiling = (os.cpu_count() or 1) >= 2 and not args.only_baseline  # needs two cores to pin the jobs on
    samples: dict[str, list[dict]] = {k: [] for k in [*variants, *([CEILING] if ceiling else [])]}
    for _ in range(args.repeats):
        for name, (np, env, opts, plain, checkout) in variants.items():
            s = run_mpirl(np, [*run_args(args.steps_per_rank * np), *opts], env=env, tree=checkout, plain=plain)
            samples[name].append(
                {"sps": s["global_env_steps"] / s["wall_time_s"], "ups": s["updates"] / s["wall_time_s"]}
            )
        # The machine's own ceiling: two 1-rank jobs at once, each on its own core, with no MPI
        # between them. What they lose against one job alone (shared caches, memory bandwidth,
        # the hypervisor) no allreduce can win back, so it bounds weak scaling on this machine.
        if not ceiling:
            continue
        with ThreadPoolExecutor(2) as pool:
            pair = list(pool.map(lambda c: run_mpirl(1, run_args(args.steps_per_rank), core=c), (0, 1)))
        samples[CEILING].append({"sps": sum(s["global_env_steps"] / s["wall_time_s"] for s in pair),
                                 "ups": sum(s["updates"] / s["wall_time_s"] for s in pair)})  # fmt: skip
    # Ratios are taken within each repeat (a variant against the 1-rank run of the same round),
    # then their median: this machine drifts by tens of percent over minutes, and a ratio of
    # medians taken from different rounds would carry that drift.
    one = samples["1 rank"]
    results = []
    print(f"machine: {machine()}")
    print("| variant | global env steps/s | updates/s | env steps/s vs 1 rank (min-max over repeats) | "
          "updates/s vs 1 rank |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for name, xs in samples.items():
        sps = statistics.median(x["sps"] for x in xs)
        ups = statistics.median(x["ups"] for x in xs)
        r_sps = [x["sps"] / b["sps"] for x, b in zip(xs, one)]
        r_ups = [x["ups"] / b["ups"] for x, b in zip(xs, one)]
        results.append({"variant": name, "sps": sps, "ups": ups, "sps_ratio": statistics.median(r_sps),
                        "ups_ratio": statistics.median(r_ups), "sps_ratios": r_sps, "ups_ratios": r_ups,
                        "samples": xs})  # fmt: skip
        print(f"| {name} | {sps:,.0f} | {ups:,.0f} | {statistics.median(r_sps):.2f}x ({min(r_sps):.2f}-"
              f"{max(r_sps):.2f}) | {statistics.median(r_ups):.2f}x |")  # fmt: skip
    if ceiling:
        of_ceiling = [t["sps"] / c["sps"] for t, c in zip(samples["2 ranks"], samples[CEILING])]
        print(f"2 ranks reach {statistics.median(of_ceiling):.2f}x ({min(of_ceiling):.2f}-{max(of_ceiling):.2f}) "
              "of the ceiling's global env steps/s, per repeat")  # fmt: skip
        results.append({"variant": "2 ranks / ceiling", "sps_ratio": statistics.median(of_ceiling),
                        "sps_ratios": of_ceiling})  # fmt: skip
    if args.baseline_rev:
        # This checkout against the baseline revision, per round (the two ran minutes apart at most).
        for np in (1, 2):
            label = "1 rank" if np == 1 else "2 ranks"
            ours, theirs = samples[label], samples[f"{label} @ {args.baseline_rev}"]
            r = [x["sps"] / b["sps"] for x, b in zip(ours, theirs)]
            print(f"{label}: this checkout / {args.baseline_rev} = {statistics.median(r):.3f}x "
                  f"({min(r):.3f}-{max(r):.3f}) env steps/s, per repeat")  # fmt: skip
            results.append({"variant": f"{label} vs {args.baseline_rev}", "sps_ratio": statistics.median(r),
                            "sps_ratios": r})  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
