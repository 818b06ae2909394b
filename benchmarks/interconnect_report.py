"""The report of benchmarks/interconnect.py: its tables, the ring model checked against the
measurements, and the model's predictions for real interconnects at 8 and 64 ranks.

    .venv/bin/python benchmarks/interconnect_report.py benchmarks/results/interconnect.json

The check takes, per task and variant, the update time of 2 ranks on one node (shared memory,
measured in the same round) and adds what the ring model says the link costs on top of shared
memory: [t_allreduce(S, 2, link) - t_allreduce(S, 2, shared memory)] / K, with each link's latency
and bandwidth as link_pingpong.py measured them. Nothing is fitted. For the predictions,
t_compute is a rank's update time when ranks share a node, as they do at N ranks: 2 ranks on one
node synchronising every 16 updates, less their amortised sync (the 1-rank run, with the second
core free for the OS and Horovod's thread, is faster still: it is shown, not used); and the
collective's fixed cost o is what gradient averaging every update (K=1) adds to that beyond its
allreduce (see benchmarks/ring_model.py).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from typing import Any

from common import read_json
from ring_model import INTERCONNECTS, Link, Workload, allreduce_s, efficiency, pays_off

SYNC_EVERY = {"K=1": 1, "K=4": 4, "K=16": 16, "fp16": 1}
TASK_NAMES = {"cartpole": "CartPole-v1 (MLP 128x128)", "minatar": "MinAtar Breakout (CNN)"}


def link_of(name: str, measured: dict[str, Any]) -> Link:
    return Link(name, measured["latency_s"], measured["bandwidth_bytes_s"])


def median_update_s(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], float]:
    """(task, placement, rate, variant) -> median seconds per update over the repeats."""
    found: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        found[(r["task"], r["placement"], r["rate"], r["variant"])].append(r["update_s"])
    return {k: statistics.median(v) for k, v in found.items()}


def sync_bytes(params: int, variant: str) -> float:
    return Workload("", params, 0.0).sync_bytes(SYNC_EVERY[variant], variant == "fp16")


def link_table(data: dict[str, Any]) -> str:
    sizes = sorted({int(s) for v in data["links"].values() for s in v["allreduce_s"]})
    head = " | ".join(f"allreduce {s / 1e3:,.0f} kB: measured / model" for s in sizes)
    lines = [f"| link | one-way latency | bandwidth | {head} |", "| --- | --- | --- |" + " --- |" * len(sizes)]
    for name, m in data["links"].items():
        link = link_of(name, m)
        cells = [f"{m['allreduce_s'][str(s)] * 1e3:.2f} / {allreduce_s(s, 2, link) * 1e3:.2f} ms" for s in sizes]
        lines.append(f"| {name} | {m['latency_s'] * 1e6:.0f} µs | {m['bandwidth_bytes_s'] * 8 / 1e9:.2f} Gbit/s | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def throughput_table(data: dict[str, Any], task: str) -> str:
    """Updates/s per variant and placement, with ratios to one node and to 1 rank's env steps/s."""
    med = median_update_s(data["rows"])
    rates = [r for r in data["links"] if r != "one node"]
    one_rank = med.get((task, "1 rank", "-", "K=1"))
    head = " | ".join(f"two nodes, {r}" for r in rates)
    lines = [f"| {TASK_NAMES[task]} | one node (shared memory) | {head} |", "| --- | --- |" + " --- |" * len(rates)]
    for variant in SYNC_EVERY:
        base = med.get((task, "one node", "-", variant))
        if base is None:
            continue
        cells = [f"{1 / base:,.0f} updates/s"]
        for rate in rates:
            t = med.get((task, "two nodes", rate, variant))
            cells.append("-" if t is None else f"{1 / t:,.0f} ({base / t:.2f}x)")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if one_rank:
        lines.append(f"| 1 rank (no communication) | {1 / one_rank:,.0f} updates/s |" + " |" * len(rates))
    return "\n".join(lines)


def model_check(data: dict[str, Any], task: str) -> tuple[str, list[float]]:
    """Measured against predicted update time at every rate; the relative errors."""
    med = median_update_s(data["rows"])
    shm = link_of("one node", data["links"]["one node"])
    errors: list[float] = []
    lines = ["| variant | rate | measured ms/update | model ms/update | model / measured |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for variant, k in SYNC_EVERY.items():
        base = med.get((task, "one node", "-", variant))
        nbytes = sync_bytes(data["params"][task], variant)
        for rate, m in data["links"].items():
            t = med.get((task, "two nodes", rate, variant))
            if rate == "one node" or base is None or t is None:
                continue
            extra = (allreduce_s(nbytes, 2, link_of(rate, m)) - allreduce_s(nbytes, 2, shm)) / k
            pred = base + extra
            errors.append(pred / t - 1)
            lines.append(f"| {variant} | {rate} | {t * 1e3:.2f} | {pred * 1e3:.2f} | {pred / t:.2f} |")
    return "\n".join(lines), errors


def workload(data: dict[str, Any], task: str) -> Workload:
    """t_compute = 2 ranks' update on one node at K=16 less its amortised sync; o = what K=1 adds
    to that beyond its allreduce (never below 0)."""
    med = median_update_s(data["rows"])
    params = data["params"][task]
    shm = link_of("one node", data["links"]["one node"])
    compute = med[(task, "one node", "-", "K=16")] - allreduce_s(sync_bytes(params, "K=16"), 2, shm) / 16
    overhead = med[(task, "one node", "-", "K=1")] - compute - allreduce_s(sync_bytes(params, "K=1"), 2, shm)
    return Workload(TASK_NAMES[task], params, compute, max(overhead, 0.0))


def predictions(works: list[Workload], ranks: tuple[int, ...] = (8, 64)) -> str:
    lines = ["| task, t_compute | interconnect | ranks | efficiency K=1 | fp16 | K=4 | K=16 | saves > 10 % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for w in works:
        for link in INTERCONNECTS:
            for n in ranks:
                eff = [efficiency(w, n, link, k, fp16) for k, fp16 in ((1, False), (1, True), (4, False), (16, False))]
                wins = [name.replace("_", " ") for name, ok in pays_off(w, n, link).items() if ok] or ["nothing"]
                lines.append(f"| {w.name}, {w.compute_s * 1e3:.2f} ms | {link.name} | {n} | "
                             + " | ".join(f"{e:.2f}" for e in eff) + f" | {', '.join(wins)} |")  # fmt: skip
    return "\n".join(lines)


def render(data: dict[str, Any]) -> str:
    tasks = [t for t in data["params"] if any(r["task"] == t for r in data["rows"])]
    out = [f"machine: {data['machine']}", f"parameters: {data['params']}", "", "Link (MPI ping-pong, Allreduce):",
           link_table(data)]  # fmt: skip
    works = []
    for task in tasks:
        out += ["", f"{TASK_NAMES[task]}: updates/s (ratio to one node, same round):", throughput_table(data, task)]
        table, errors = model_check(data, task)
        worst = max((abs(e) for e in errors), default=0.0)
        out += ["", f"Ring model against the measurements (worst error {worst:.0%}):", table]
        w = workload(data, task)
        works += [w, Workload(f"{w.name} with 10x faster compute", w.params, w.compute_s / 10, w.overhead_s)]
        out.append(f"\n{w.name}: t_compute {w.compute_s * 1e3:.2f} ms, o {w.overhead_s * 1e3:.2f} ms, "
                   f"{w.params:,} parameters ({4 * w.params / 1e3:,.0f} kB fp32)")  # fmt: skip
    out += ["", "Predicted weak-scaling efficiency (update rate / rate without communication):", predictions(works)]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} RESULTS.json")
    print(render(read_json(sys.argv[1])))
