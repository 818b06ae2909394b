"""Time to solve CartPole-v1 with default options: greedy evaluation mean >= 475 over 20
episodes, checked every 5,000 global env steps; the final evaluation (20 fresh episodes)
decides 'solved'. Wall time is the launcher's (start-up included).

    .venv/bin/python benchmarks/solve_cartpole.py [--ranks 2] [--seeds 1 2 3 4 5]
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import machine, run_mpirl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    out = []
    for np in args.ranks:
        rows = []
        for seed in args.seeds:
            s = run_mpirl(np, ["--seed", str(seed)])
            rows.append(s)
            print(f"ranks {np} seed {seed}: {s['total_wall_s']:.1f} s wall, {s['global_env_steps']:,} env steps, "
                  f"{s['updates']:,} updates, final eval {s['final_eval_mean']:.1f}, solved {s['solved']}")  # fmt: skip
        solved = sum(r["solved"] for r in rows)
        med = statistics.median(r["total_wall_s"] for r in rows)
        print(f"ranks {np}: solved {solved}/{len(rows)}, median wall {med:.1f} s")
        out.append({"ranks": np, "solved": solved, "runs": len(rows), "median_wall_s": med, "rows": rows})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "results": out}, fh, indent=2)


if __name__ == "__main__":
    main()
