"""Share of training time spent checkpointing at the default interval (50,000 global env
steps), on CartPole-v1 with default options and no early stop, from the run's own summary
(checkpoint_s is the slowest rank's time inside checkpoint.save, wall_time_s the loop's).

    .venv/bin/python benchmarks/checkpoint_share.py [--ranks 2] [--steps 300000] [--quick]
"""

from __future__ import annotations

import argparse
import json

from common import machine, run_mpirl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300_000)
    ap.add_argument("--json", default="")
    ap.add_argument("--quick", action="store_true", help="smoke run: 10,000 env steps (only the final checkpoint)")
    args = ap.parse_args()
    if args.quick:
        args.steps = 10_000
    s = run_mpirl(args.ranks, ["--total-env-steps", str(args.steps), "--no-early-stop", "--eval-interval", "0",
                               "--final-eval-episodes", "0"])  # fmt: skip
    n_ckpt = args.steps // 50_000 + (1 if args.steps % 50_000 else 0)
    share = s["checkpoint_s"] / s["wall_time_s"]
    print(f"machine: {machine()}")
    print(f"{args.ranks} ranks, {s['global_env_steps']:,} env steps, {n_ckpt} checkpoints: {s['checkpoint_s']:.2f} s "
          f"of {s['wall_time_s']:.1f} s training = {100 * share:.2f}%")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine(), "args": vars(args), "checkpoints": n_ckpt, "share": share,
                       "summary": s}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
