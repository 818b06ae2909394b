"""Sync strategies on CartPole-v1 at 2 ranks: gradient averaging every update (K = 1), local
SGD with weight averaging every 4 or 16 updates (--sync-every), and fp16-compressed gradients.

Every run trains with default options and stops early once a periodic greedy evaluation
(20 episodes every 5,000 global env steps) reaches 475; a final evaluation of 20 fresh
episodes gives the final greedy return and 'solved' (>= 475). Time to 475 is the launcher's
wall time of a run that reached it (start-up included), so variants compare end to end;
updates/s counts the training loop only. Variants are interleaved per seed, their order
rotated from seed to seed, so drift of a shared machine hits all of them alike.

    .venv/bin/python benchmarks/sync_strategies.py [--seeds 3] [--total-env-steps 300000]
    .venv/bin/python benchmarks/sync_strategies.py --quick      # 1 seed, 20k steps: a smoke test

Run directories (logs only) are kept under <curves>/sync_strategies/<variant>/s<seed>; the
script ends by printing the ``python -m mpirl.plot`` command that draws them, one curve per variant.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, Optional

from common import QUICK_RESULTS, RESULTS, machine, run_mpirl, write_json

# (key for file names, name in the table, extra mpirl flags)
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("k1", "K=1 (gradient allreduce every update)", []),
    ("k4", "K=4 (local SGD, average every 4 updates)", ["--sync-every", "4"]),
    ("k16", "K=16 (local SGD, average every 16 updates)", ["--sync-every", "16"]),
    ("fp16", "K=1 + fp16 gradient compression", ["--fp16-allreduce"]),
]
RANKS = 2
TARGET = 475.0


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarise(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's figures over its seeds."""
    reached = [r for r in rows if r["stopped_early"]]
    finals = [r["final_eval_mean"] for r in rows]
    return {
        "variant": name,
        "runs": len(rows),
        "solved": sum(r["solved"] for r in rows),  # final greedy evaluation >= 475
        "reached": len(reached),  # a periodic evaluation reached 475 (the run stopped early)
        "median_time_to_target_s": _median([r["total_wall_s"] for r in reached]),
        "median_env_steps_to_target": _median([r["global_env_steps"] for r in reached]),
        "final_return_mean": statistics.fmean(finals),
        "final_return_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "median_updates_per_s": _median([r["updates"] / max(r["wall_time_s"], 1e-9) for r in rows]),
        "median_wall_s": _median([r["total_wall_s"] for r in rows]),
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | solved (final >= 475) | reached 475 | median time to 475 (s) | median env steps to 475 "
        "| final greedy return | updates/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in results:
        lines.append(
            f"| {s['variant']} | {s['solved']}/{s['runs']} | {s['reached']}/{s['runs']} "
            f"| {_fmt(s['median_time_to_target_s'], '.1f')} | {_fmt(s['median_env_steps_to_target'], ',.0f')} "
            f"| {s['final_return_mean']:.1f} ± {s['final_return_sd']:.1f} | {_fmt(s['median_updates_per_s'], ',.0f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds per variant (1..S)")
    ap.add_argument("--total-env-steps", type=int, default=300_000, help="budget per run, global env steps")
    ap.add_argument("--quick", action="store_true", help="1 seed, 20,000 env steps, 10 eval episodes (a smoke test)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--json", default=None, help="default: <results>/sync_strategies.json")
    ap.add_argument("--curves-dir", default=None, help="run directories kept here; default: <results>/curves")
    args = ap.parse_args()
    results_dir = QUICK_RESULTS if args.quick else RESULTS  # smoke figures never land in benchmarks/results
    out_json = args.json or os.path.join(results_dir, "sync_strategies.json")
    curves = os.path.join(args.curves_dir or os.path.join(results_dir, "curves"), "sync_strategies")
    seeds, steps, episodes = args.seeds, args.total_env_steps, 20
    if args.quick:
        seeds, steps, episodes = 1, 20_000, 10
    print(f"machine: {machine()}")
    print(f"CartPole-v1, {RANKS} ranks, {seeds} seed(s), budget {steps:,} env steps, target {TARGET:g}")
    rows: dict[str, list[dict[str, Any]]] = {name: [] for _, name, _ in VARIANTS}
    for seed in range(1, seeds + 1):
        shift = (seed - 1) % len(VARIANTS)
        for key, name, extra in VARIANTS[shift:] + VARIANTS[:shift]:
            s = run_mpirl(RANKS, ["--env", "CartPole-v1", "--seed", str(seed), "--total-env-steps", str(steps),
                                  "--eval-episodes", str(episodes), "--final-eval-episodes", str(episodes),
                                  "--target-return", str(TARGET), *extra],
                          timeout=args.timeout, run_dir=os.path.join(curves, key, f"s{seed}"))  # fmt: skip
            s.update(seed=seed, variant=name, args=extra)
            rows[name].append(s)
            reached = f"reached {TARGET:g} at {s['global_env_steps']:,} steps" if s["stopped_early"] else "not reached"
            print(f"seed {seed} | {name}: {s['total_wall_s']:.1f} s wall, {reached}, final eval "
                  f"{s['final_eval_mean']:.1f}, {s['updates'] / max(s['wall_time_s'], 1e-9):,.0f} updates/s, "
                  f"replicas identical {s['replicas_identical']}", flush=True)  # fmt: skip
            if not s["replicas_identical"]:
                raise SystemExit(f"{name}, seed {seed}: ranks ended with different parameters")
    results = [summarise(name, rows[name]) for _, name, _ in VARIANTS]
    print()
    print(table(results))
    meta = {"machine": machine(), "ranks": RANKS, "seeds": seeds, "total_env_steps": steps,
            "eval_episodes": episodes, "quick": args.quick}  # fmt: skip
    write_json(out_json, {**meta, "results": results, "rows": rows})
    print(f"\nwrote {out_json}; learning curves:")
    rel = os.path.relpath(curves)
    dirs = " ".join(os.path.join(curves if rel.startswith("..") else rel, key) for key, _, _ in VARIANTS)
    labels = " ".join(f"'{name.split(' (')[0]}'" for _, name, _ in VARIANTS)
    print(f"  .venv/bin/python -m mpirl.plot {dirs} --label {labels} --out sync_strategies.png")


if __name__ == "__main__":
    main()
