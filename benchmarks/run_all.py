"""Run the whole benchmark suite, one benchmark after another, each under its own timeout.

    .venv/bin/python benchmarks/run_all.py            # full suite, ~28 min on 2 cores -> benchmarks/results/
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run, < 5 min -> runs/bench-quick/ (git-ignored)
    .venv/bin/python benchmarks/run_all.py --list     # the plan: commands, timeouts, estimated durations
    .venv/bin/python benchmarks/run_all.py --only memory allreduce_cycle005

Each benchmark's output goes to the console and to ``<out>/logs/<name>.log``. A failure or a
timeout is reported and the suite goes on; the exit code is 1 when any benchmark failed, timed
out or was left out for lack of time, and ``<out>/run_all.json`` lists each one's status and wall
time. The suite as a whole stops starting benchmarks after ``--max-minutes`` (35; quick: 5): each
benchmark's timeout is cut to the time left, so the suite never runs much past it. Benchmarks whose
file does not exist (yet) are reported as skipped. Run it on a quiet machine: every figure is a
ratio against a baseline of the same run, but other work on the cores widens them (and can make a
2-thread process thrash). The SB3 comparison needs stable-baselines3 (see benchmarks/sb3_cartpole.py).

Full-mode settings (measured on this 2-core AMD EPYC machine, quiet; ``--list`` prints the
estimates): solve_cartpole with 5 seeds (~15 min: each seed runs SB3, mpirl at 1 and at 2 ranks
to a solve, ~3 min together, SB3's ~110 s the most; ``--solve-seeds 1 2 3`` saves ~6 min), the
learning-curve plot right after it, throughput with 3 repeats, allreduce (3 blocks) at both Horovod
cycles, checkpoint_io at 1 GiB x 3, checkpoint_share over 150,000 env steps (not 300,000; 3
checkpoints), memory, sync_strategies with 1 seed (not 3), Atari throughput with 1 repeat (not 2)
and the recording overhead with 1 off/on pair (not 3; adds ~4 min). Quick mode passes each
script's ``--quick``, except sync_strategies: 1 seed of 10,000 env steps.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Optional, Sequence

from common import LAUNCH, QUICK_RESULTS, REPO, RESULTS, machine, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
CURVES = "@curves"  # placeholder in a command: the solve_cartpole run directories, listed when the step starts
# The 5 seeds (~15 min of the ~28 here); --solve-seeds 1 2 3 for a shorter suite.
FULL_SOLVE_SEEDS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Step:
    """One benchmark: its command (run from the repository root), a timeout and the duration
    expected on the reference machine (2 cores), both in seconds."""

    name: str
    cmd: list[str]
    timeout_s: float
    estimate_s: float
    env: dict[str, str] = field(default_factory=dict)
    missing: str = ""  # why it cannot run (a file that does not exist yet): reported as skipped


def _defines(path: str, option: str) -> bool:
    """Does the script at ``path`` define ``option``? (For scripts that other changes are still
    writing: an option is passed only once the script has it.)"""
    try:
        with open(path, encoding="utf-8") as fh:
            return f'"{option}"' in fh.read()
    except OSError:
        return False


def plan(quick: bool, out: str, solve_seeds: Sequence[int] = FULL_SOLVE_SEEDS) -> list[Step]:
    """The suite, in order: the headline first, so that a suite cut short by --max-minutes
    loses the least. Estimates are this 2-core machine's (AMD EPYC), quiet, in seconds."""
    py = sys.executable
    curves = os.path.join(out, "curves")

    def step(
        name: str, cmd: list[str], quick_args: list[str], full_args: list[str], timeout: tuple[float, float],
        estimate: tuple[float, float], env: Optional[dict[str, str]] = None,
    ) -> Step:  # fmt: skip
        """``timeout`` and ``estimate``: (quick, full) seconds; results go to <out>/<name>.json."""
        script = next((c for c in cmd if c.endswith(".py")), "")
        missing = "" if os.path.exists(script) else f"{os.path.relpath(script, REPO)} does not exist"
        args = [*cmd, *(quick_args if quick else full_args), "--json", os.path.join(out, f"{name}.json")]
        return Step(name, args, timeout[0 if quick else 1], estimate[0 if quick else 1], env or {}, missing)

    def script(name: str) -> list[str]:
        return [py, os.path.join(HERE, name)]

    def mpi2(name: str) -> list[str]:
        return [LAUNCH, "-np", "2", "--", "python", os.path.join(HERE, name)]

    q = ["--quick"]
    plot = [py, "-m", "mpirl.plot", CURVES, "--out", os.path.join(out, "cartpole_curves.png")]
    has_plot = os.path.exists(os.path.join(REPO, "mpirl", "plot.py"))
    sync = os.path.join(HERE, "sync_strategies.py")
    sync_curves = ["--curves-dir", curves] if _defines(sync, "--curves-dir") else []
    seeds = ["--seeds", *map(str, solve_seeds)]
    steps = [
        # Per seed: SB3 ~115 s + mpirl 1 rank ~30 s + mpirl 2 ranks ~40 s, interleaved (AMD EPYC,
        # 2 cores); the timeout leaves room for runs that go to their whole budget.
        step(
            "solve_cartpole",
            [*script("solve_cartpole.py"), "--curves-dir", curves],
            q,
            seeds,
            (150, 450 * len(solve_seeds)),
            (65, 190 * len(solve_seeds)),
        ),  # fmt: skip
        # Their learning curves, SB3 against mpirl, right away (cheap, and not lost to a late cut).
        Step("plot", plot, 60, 5, missing="" if has_plot else "mpirl/plot.py does not exist"),
        # 5 variants (the last: two 1-rank jobs at once) x 3 repeats x 12,000 env steps per rank.
        step("throughput", script("throughput.py"), q, ["--repeats", "3"], (100, 600), (50, 270)),
        # Horovod at mpirl's 0.05 ms cycle; then (full mode) at Horovod's default 1 ms cycle.
        step("allreduce_cycle005", mpi2("allreduce.py"), q, [], (60, 240), (6, 40)),
    ]
    if not quick:
        steps.append(step("allreduce", mpi2("allreduce.py"), q, [], (60, 240), (6, 40), {"HOROVOD_CYCLE_TIME": "1"}))
    steps += [
        step("checkpoint_io", mpi2("checkpoint_io.py"), q, ["--gib", "1.0", "--repeats", "3"], (60, 240), (10, 50)),
        # 150,000 (not 300,000) env steps at 2 ranks: 3 checkpoints at the default interval.
        step("checkpoint_share", script("checkpoint_share.py"), q, ["--steps", "150000"], (60, 300), (15, 100)),
        step("memory", script("memory.py"), q, [], (60, 120), (2, 55)),
        # 1 seed (not 3) x 4 variants at 2 ranks, ~10-40 s a run to a solve here (up to the 300k
        # budget for one that does not). Quick: 10,000 env steps rather than its --quick's 20,000,
        # so that the quick suite fits in 5 minutes.
        step(
            "sync_strategies",
            [py, sync, *sync_curves],
            ["--seeds", "1", "--total-env-steps", "10000"],
            ["--seeds", "1"],
            (120, 900),
            (55, 120),
        ),  # fmt: skip
        # 1 repeat (not 2) x 4 runs (acting and training, 1 and 2 ranks) of 2,000 env steps per rank.
        step("atari_throughput", script("atari_throughput.py"), q, ["--repeats", "1"], (120, 420), (65, 180)),
        # 1 off/on pair (not 3) per variant: CartPole training, Pong training and acting, at 2 ranks.
        step("recording_overhead", script("recording_overhead.py"), q, ["--repeats", "1"], (150, 600), (60, 220)),
    ]
    return steps


def _pump(src: IO[str], log: IO[str]) -> None:
    """Copy a child's output to the console and its log, line by line."""
    for line in src:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (Linux /proc). mpirun puts each rank in a process group of
    its own, so the step's process group alone does not reach the ranks; its session does."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry))
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """End a step that ran out of time, with everything it started (the session it leads):
    SIGTERM first (mpirun then ends its ranks), SIGKILL to what is left after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the step itself, or it lingers in the session as a zombie
            if not _session_pids(proc.pid):
                return
            time.sleep(0.2)


def run_step(step: Step, out: str, time_left_s: float) -> dict[str, Any]:
    """Run one step to its end or its timeout (cut to ``time_left_s``); return its status record."""
    record: dict[str, Any] = {"name": step.name, "cmd": step.cmd, "estimate_s": step.estimate_s, "wall_s": 0.0}
    if step.missing:
        print(f"run_all: {step.name}: skipped ({step.missing})", flush=True)
        return {**record, "status": "skipped", "why": step.missing}
    if time_left_s < 1:
        print(f"run_all: {step.name}: not run (the suite's --max-minutes are used up)", flush=True)
        return {**record, "status": "not run", "why": "suite time limit"}
    cmd = list(step.cmd)
    if CURVES in cmd:  # only solve_cartpole's runs: sb3-s<seed>, mpirl-<ranks>r-s<seed>
        dirs = sorted(glob.glob(os.path.join(out, "curves", "sb3-s*")))
        dirs += sorted(glob.glob(os.path.join(out, "curves", "mpirl-*r-s*")))
        if not dirs:
            print(f"run_all: {step.name}: skipped (no run directories in {out}/curves)", flush=True)
            return {**record, "status": "skipped", "why": "no curves"}
        i = cmd.index(CURVES)
        cmd[i : i + 1] = dirs
    timeout = min(step.timeout_s, time_left_s)
    log_path = os.path.join(out, "logs", f"{step.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    print(f"run_all: {step.name}: {' '.join(cmd)} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        # A session of its own, so that a timeout can end the whole tree (mpirun and its ranks).
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **step.env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, log), daemon=True)
        pump.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        pump.join(timeout=10)
    wall = time.perf_counter() - t0
    rc = proc.returncode
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    print(f"run_all: {step.name}: {status} (exit {rc}) in {wall:.1f} s; log {os.path.relpath(log_path, REPO)}",
          flush=True)  # fmt: skip
    return {**record, "status": status, "returncode": rc, "wall_s": wall, "timeout_s": timeout, "log": log_path}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="each benchmark's smoke settings; total < 5 min")
    ap.add_argument("--out", default="", help=f"results folder (default: {RESULTS}; with --quick {QUICK_RESULTS})")
    ap.add_argument("--only", nargs="+", default=[], help="run only these benchmarks (names as in --list)")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no benchmark after this (35; quick: 5)")
    ap.add_argument("--solve-seeds", type=int, nargs="+", default=list(FULL_SOLVE_SEEDS),
                    help="seeds of solve_cartpole in full mode")  # fmt: skip
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    args = ap.parse_args()
    out = os.path.abspath(args.out or (QUICK_RESULTS if args.quick else RESULTS))
    max_s = 60 * (args.max_minutes or (5 if args.quick else 35))
    steps = plan(args.quick, out, args.solve_seeds)
    unknown = set(args.only) - {s.name for s in steps}
    if unknown:
        sys.exit(f"run_all: unknown benchmark(s) {sorted(unknown)}; see --list")
    steps = [s for s in steps if not args.only or s.name in args.only]
    if args.list:
        for s in steps:
            state = f"  [skipped: {s.missing}]" if s.missing else ""
            print(f"{s.name}: ~{s.estimate_s:.0f} s, timeout {s.timeout_s:.0f} s: {' '.join(s.cmd)}{state}")
        print(f"estimated total: {sum(s.estimate_s for s in steps if not s.missing) / 60:.1f} min "
              f"(suite limit {max_s / 60:.0f} min)")  # fmt: skip
        return

    print(f"run_all: {'quick' if args.quick else 'full'} suite on {machine()}; results in {out}", flush=True)
    t0 = time.perf_counter()
    records = [run_step(s, out, max_s - (time.perf_counter() - t0)) for s in steps]
    total = time.perf_counter() - t0
    print("\n| benchmark | status | wall s | estimate s |")
    print("| --- | --- | --- | --- |")
    for r in records:
        why = f" ({r['why']})" if r.get("why") else ""
        print(f"| {r['name']} | {r['status']}{why} | {r['wall_s']:.1f} | {r['estimate_s']:.0f} |")
    print(f"total: {total:.1f} s")
    write_json(os.path.join(out, "run_all.json"), {
        "machine": machine(), "quick": args.quick, "max_minutes": max_s / 60, "total_s": total, "benchmarks": records,
    })  # fmt: skip
    failed = [r["name"] for r in records if r["status"] in ("failed", "timeout", "not run")]
    if failed:
        print(f"run_all: failed, timed out or not run: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
