"""Collect benchmarks/device_check.sh's results: $OUT/device_check.json and a table for BENCHMARKS.md.

    python benchmarks/device_summary.py OUT_DIR [--dry]

Exit 1 when a step failed or a check did not hold (a: solved, on a GPU run; c: replicas
identical; d: both resumes said so; f: profiled in bf16).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import sys
from typing import Any, Optional

STEPS = (
    "a_cartpole",
    "b_pong",
    "b_pong_envpool",
    "e_overhead",
    "c_shared_gpu",
    "d_cuda_first",
    "d_then_cpu",
    "d_cpu_first",
    "d_then_cuda",
    "f_pong_bf16",
)


def _read(path: str) -> Optional[Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args()
    out = args.out
    steps = {r["step"]: r for r in (_read(p) for p in sorted(glob.glob(os.path.join(out, "*.rc.json")))) if r}
    a = _read(os.path.join(out, "a_cartpole", "summary.json")) or {}
    b = _read(os.path.join(out, "b_pong.json")) or {}
    b_envpool = _read(os.path.join(out, "b_pong_envpool.json")) or {}
    e = _read(os.path.join(out, "e_overhead.json")) or {}
    f = _read(os.path.join(out, "f_pong_bf16.json")) or {}
    c = _read(os.path.join(out, "c_shared", "summary.json")) or {}
    resumed = {name: "mpirl: resumed from" in _text(os.path.join(out, f"{name}.log"))
               for name in ("d_then_cpu", "d_then_cuda")}  # fmt: skip
    checks = {
        "all steps exited 0": all(r["rc"] == 0 for r in steps.values()) and len(steps) == len(STEPS),
        "a: CartPole solved on one rank": bool(a.get("solved")) or args.dry,
        "b: Pong profiled on gymnasium and on EnvPool": (b.get("env_backend"), b_envpool.get("env_backend"))
        == ("gymnasium", "envpool"),
        "c: 2 ranks on one GPU, replicas identical": bool(c.get("replicas_identical")) and c.get("world_size") == 2,
        "d: checkpoints resume across devices": all(resumed.values()),
        "f: Pong profiled in bf16": f.get("precision") == "bf16",
    }
    report = {
        "date": _dt.date.today().isoformat(),
        "dry_run": args.dry,
        "gpu": _text(os.path.join(out, "gpu.txt")).strip(),
        "python_torch_cuda": _text(os.path.join(out, "versions.txt")).strip(),
        "steps": steps,
        "a_cartpole": {
            k: a.get(k) for k in ("solved", "final_eval_mean", "global_env_steps", "updates", "wall_time_s")
        },
        "b_pong": b,
        "b_pong_envpool": b_envpool,
        "e_overhead": e,
        "c_shared_gpu": {k: c.get(k) for k in ("world_size", "replicas_identical", "updates", "wall_time_s")},
        "d_resumed": resumed,
        "f_pong_bf16": f,
        "checks": checks,
    }
    with open(os.path.join(out, "device_check.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print(f"device check {report['date']}{' (dry run, CPU)' if args.dry else ''}: {report['gpu']}; "
          f"python/torch/cuda {report['python_torch_cuda']}")  # fmt: skip
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if a:
        print(
            f"| a | CartPole-v1, 1 rank | solved {a.get('solved')}, eval {a.get('final_eval_mean')}, "
            f"{a.get('global_env_steps'):,} env steps, {a.get('updates'):,} updates "
            f"in {a.get('wall_time_s', 0):.1f} s |"
        )
    for row, p in (("b", b), ("b", b_envpool), ("f", f)):
        if not p:
            continue
        share = ", ".join(f"{k} {v:.0%}" for k, v in p.get("share", {}).items())
        busy = p.get("gpu_busy_percent")
        print(
            f"| {row} | Pong, 1 rank, {p.get('env_backend')}, {p.get('precision')} | acting "
            f"{p['acting_frames_per_s']:,.0f} frames/s; training {p['training_frames_per_s']:,.0f} frames/s, "
            f"{p['updates_per_s']:,.0f} updates/s; GPU busy "
            f"{'n/a' if busy is None else f'{busy:.0f}%'}; iteration: {share} |"
        )
    if e:
        copy = e.get("copy", {})
        copies = ", ".join(f"{k} {v:.3f} ms" for k, v in copy.items() if k.endswith("_ms")) or "n/a on the CPU"
        threads = ", ".join(f"{k} threads {v:.1f} ms" for k, v in e.get("iteration_ms_by_torch_threads", {}).items())
        print(
            f"| e | Pong iteration's host side, {e.get('env_backend')} | {threads}; sync {e.get('sync_us', 0):.0f} µs, "
            f"tiny launch {e.get('tiny_kernel_launch_us', 0):.1f} µs, greedy {e.get('greedy_forward_ms', 0):.2f} ms; "
            f"copies: {copies} |"
        )
        for row in e.get("top_host_ops", [])[:8]:
            print(
                f"|   | host: {row['op']} | {row['calls_per_iteration']:.0f} calls, "
                f"{row['ms_per_iteration']:.2f} ms/iteration |"
            )
    if c:
        print(
            f"| c | 2 ranks, one GPU, Gloo | replicas identical {c.get('replicas_identical')}, "
            f"{c.get('updates'):,} updates in {c.get('wall_time_s', 0):.1f} s |"
        )
    print(f"| d | checkpoint across devices | resumed: {resumed} |")
    if f and b_envpool:
        ratio = f["training_frames_per_s"] / b_envpool["training_frames_per_s"]
        print(f"| f | bf16 against float32 (b, EnvPool), training frames/s | {ratio:.2f}x (steps minutes apart) |")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
