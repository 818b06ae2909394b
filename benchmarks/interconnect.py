"""What the interconnect costs: 2-node weak scaling at several link rates, against one node.

Needs root and the local two-node cluster (network namespaces joined by a shaped link):

    hpc/slurm/local-cluster.sh start --nodes 2
    .venv/bin/python benchmarks/interconnect.py [--tasks cartpole minatar] [--repeats 1]
        [--rates unshaped 10gbit 1gbit 100mbit] [--quick] [--json benchmarks/results/interconnect.json]

For each link rate (``local-cluster.sh link-rate``, a token bucket on every node's link, both
directions) it first measures the link as MPI sees it (benchmarks/link_pingpong.py: one-way
latency, bandwidth, MPI_Allreduce of each task's gradient sizes). Then, per task and round, every
run interleaved with its baselines:

- 1 rank alone (no communication at all): t_compute, the ring model's compute term;
- per variant (gradient allreduce every update K=1; local SGD --sync-every 4 and 16; fp16
  gradients): 2 ranks on one node (shared memory: the baseline of the same round), then 2 ranks
  on two nodes, one each (TCP over the link), at every rate.

Every job is ``mpirun --host ... --bind-to none`` through hpc/slurm/on-node.sh (no SLURM, no ssh).
Each "node" runs on its own core (local-cluster.sh gives node i CPU i-1 of this 2-core machine),
so a rank on two nodes has one core and one torch thread; the one-node baseline runs on the host
(the login node: both cores, 2 ranks, one core and one thread each). So one node against two
differ only in the transport. (2 ranks per node, 4 in all, would put 2 ranks on each core:
oversubscribed, so not measured here.) The link rate is reset at the end.
The report (tables, the model's check and its predictions) is benchmarks/interconnect_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from typing import Any

import interconnect_report as report
from common import QUICK_RESULTS, REPO, RESULTS, VENV_PYTHON, machine, read_json, run_timed, write_json

CLUSTER = os.path.join(REPO, "hpc", "slurm", "local-cluster.sh")
ON_NODE = os.path.join(REPO, "hpc", "slurm", "on-node.sh")
NODES = ("mpirl-n1", "mpirl-n2")
ONE_NODE = "localhost:2"  # the host: both cores (a namespace node has one), shared memory between the 2 ranks
RATES = ("unshaped", "10gbit", "1gbit", "100mbit")
VARIANTS = {"K=1": [], "K=4": ["--sync-every", "4"], "K=16": ["--sync-every", "16"], "fp16": ["--fp16-allreduce"]}
COMMON = ["--eval-interval", "0", "--final-eval-episodes", "0", "--checkpoint-interval", "0", "--no-tensorboard"]
# task -> (options, env steps per rank, quick env steps per rank). CartPole: mpirl's defaults (MLP
# 128x128, 8 envs, batch 128 per rank). MinAtar Breakout: configs/minatar-dqn.toml's CNN (4 envs,
# batch 128 per rank), a smaller replay and a short warm-up so that the run is all updates.
TASKS: dict[str, tuple[list[str], int, int]] = {
    "cartpole": (["--env", "CartPole-v1", "--learning-starts-per-rank", "256"], 6_000, 1_000),
    "minatar": (["--config", "configs/minatar-dqn.toml", "--env", "MinAtar/Breakout-v1",
                 "--learning-starts-per-rank", "512", "--buffer-size-per-rank", "20000"], 2_700, 800),
}  # fmt: skip


def mpirun_cmd(hosts: str, np: int, program: list[str]) -> list[str]:
    return ["mpirun", "--mca", "plm_rsh_agent", ON_NODE, "--host", hosts, "-np", str(np), "--bind-to", "none",
            "-x", "OMPI_MCA_btl_vader_single_copy_mechanism=none", VENV_PYTHON, *program]  # fmt: skip


ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def set_rate(rate: str) -> None:
    subprocess.run(["bash", CLUSTER, "link-rate", "reset" if rate == "unshaped" else rate], check=True,
                   capture_output=True, timeout=60)  # fmt: skip


def param_count(task: str) -> int:
    """Parameters of the task's Q-network, built as mpirl builds it."""
    code = ("import sys, json; from mpirl.config import parse_args; from mpirl.envs import inspect_env; "
            "from mpirl.model import build; cfg = parse_args(json.loads(sys.argv[1])); "
            "i = inspect_env(cfg.env_id); m = build(i.obs_shape, i.n_actions, cfg.hidden_sizes, cfg.dueling); "
            "print(sum(p.numel() for p in m.parameters()))")  # fmt: skip
    out = subprocess.run([VENV_PYTHON, "-c", code, json.dumps(TASKS[task][0])], capture_output=True, text=True,
                         check=True, cwd=REPO, timeout=300)  # fmt: skip
    return int(out.stdout.split()[-1])


def measure_link(hosts: str, sizes: list[int], tmp: str) -> dict[str, Any]:
    out = os.path.join(tmp, "link.json")
    prog = [os.path.join(REPO, "benchmarks", "link_pingpong.py"), "--json", out,
            "--allreduce-bytes", *map(str, sizes)]  # fmt: skip
    run_timed(mpirun_cmd(hosts, 2, prog), env=ROOT_ENV, timeout=300, cwd=REPO)
    return read_json(out)


def train(task: str, hosts: str, np: int, variant: str, steps_per_rank: int, tmp: str) -> dict[str, Any]:
    """One run; its rates from summary.json (the training loop's own wall time)."""
    run_dir = tempfile.mkdtemp(prefix="run-", dir=tmp)
    opts, _, _ = TASKS[task]
    sync = VARIANTS[variant] if np > 1 else []  # one rank has nothing to synchronise
    prog = ["-m", "mpi4py", "-m", "mpirl.train", *opts, *COMMON, *sync, "--total-env-steps", str(steps_per_rank * np),
            "--run-dir", run_dir]  # fmt: skip
    _, wall = run_timed(mpirun_cmd(hosts, np, prog), env=ROOT_ENV, timeout=1200, cwd=REPO)
    s = read_json(os.path.join(run_dir, "summary.json"))
    if not s["replicas_identical"]:
        raise SystemExit(f"{task} {variant} on {hosts}: the ranks ended with different parameters")
    return {"updates": s["updates"], "global_env_steps": s["global_env_steps"], "wall_time_s": s["wall_time_s"],
            "total_wall_s": wall, "update_s": s["wall_time_s"] / max(s["updates"], 1),
            "env_steps_per_s": s["global_env_steps"] / s["wall_time_s"]}  # fmt: skip


def links(rates: list[str], sizes: list[int], tmp: str) -> dict[str, Any]:
    """The link at every rate, and shared memory within one node."""
    found = {"one node": measure_link(ONE_NODE, sizes, tmp)}
    for rate in rates:
        set_rate(rate)
        found[rate] = measure_link(",".join(NODES), sizes, tmp)
        print(f"link {rate}: {json.dumps(found[rate])}", flush=True)
    return found


def one_round(task: str, rates: list[str], steps: int, tmp: str) -> list[dict[str, Any]]:
    """1 rank, then per variant one node and each link rate, in that order."""
    rows = []

    def run(placement: str, rate: str, hosts: str, np: int, variant: str) -> None:
        r = train(task, hosts, np, variant, steps, tmp)
        r.update(task=task, placement=placement, rate=rate, variant=variant, ranks=np)
        rows.append(r)
        print(f"{task} | {variant} | {placement} {rate}: {1 / r['update_s']:,.1f} updates/s, "
              f"{r['env_steps_per_s']:,.0f} env steps/s ({r['updates']} updates)", flush=True)  # fmt: skip

    run("1 rank", "-", NODES[0], 1, "K=1")
    for variant in VARIANTS:
        run("one node", "-", ONE_NODE, 2, variant)
        for rate in rates:
            set_rate(rate)
            run("two nodes", rate, ",".join(NODES), 2, variant)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--rates", nargs="+", default=list(RATES))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: short runs, unshaped and 100mbit only")
    ap.add_argument("--json", default=None, help="default: <results>/interconnect.json")
    args = ap.parse_args()
    if not all(os.path.exists(f"/run/netns/{n}") for n in NODES):
        raise SystemExit("no two-node cluster here: run hpc/slurm/local-cluster.sh start --nodes 2 (as root) first")
    if args.quick:
        args.rates, args.repeats = ["unshaped", "100mbit"], 1
    out_json = args.json or os.path.join(QUICK_RESULTS if args.quick else RESULTS, "interconnect.json")
    params = {task: param_count(task) for task in args.tasks}
    sizes = sorted({n * b for n in params.values() for b in (2, 4, 12)})  # fp16, fp32, local SGD's sync
    print(f"machine: {machine()}\nparameters: {params}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mpirl-interconnect-") as tmp:
        try:
            link = links(args.rates, sizes, tmp)
            for _ in range(args.repeats):
                for task in args.tasks:
                    steps = TASKS[task][2] if args.quick else TASKS[task][1]
                    rows.extend(one_round(task, args.rates, steps, tmp))
        finally:
            set_rate("unshaped")
    data = {"machine": machine(), "args": vars(args), "params": params, "links": link, "rows": rows}
    write_json(out_json, data)
    print()
    print(report.render(data))
    print(f"\nwrote {out_json}; the report again: .venv/bin/python benchmarks/interconnect_report.py {out_json}")


if __name__ == "__main__":
    main()
