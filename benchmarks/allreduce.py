"""Horovod allreduce against a raw mpi4py Allreduce of the same float32 buffers, same run.

    launch/mpirun.sh -np 2 -- python benchmarks/allreduce.py [--json benchmarks/results/allreduce.json] [--quick]

For each size from 1 KiB to 64 MiB: raw MPI before hvd.init and again after hvd.shutdown (the
mean of the two), Horovod in between; figures are medians over rounds of per-call times, the
slowest rank's. Bandwidth is the algorithm bandwidth, bytes / time.
Horovod's figure includes what a training step pays: the tensor queue, negotiation over its
controller, fusion, and the wait in synchronize. It is timed two ways, alternating: in place
(``hvd.allreduce_`` with Average, what mpirl's DistributedOptimizer does with each gradient: the
headline ratio) and returning a new tensor (``hvd.allreduce``: one more allocation and copy). Horovod runs with mpirl's HOROVOD_CYCLE_TIME
(0.05 ms) unless the environment sets another (HOROVOD_CYCLE_TIME=1 is Horovod's default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-kib", type=int, default=1)
    ap.add_argument("--max-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per size")
    ap.add_argument("--json", default="")
    ap.add_argument("--quick", action="store_true", help="smoke run: up to 4 MiB, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.max_mib, args.rounds = 4, 2

    import horovod.torch as hvd
    from mpi4py import MPI

    # What mpirl uses with several ranks (mirrors dist.init); HOROVOD_CYCLE_TIME=1 gives Horovod's default.
    os.environ.setdefault("HOROVOD_CYCLE_TIME", "0.05")
    comm = MPI.COMM_WORLD.Dup()
    torch.set_num_threads(1)
    sizes = []
    n = args.min_kib * 1024
    while n <= args.max_mib * 2**20:
        sizes.append(n)
        n *= 4

    def iters_for(nbytes: int) -> int:
        return max(3, min(200, (64 << 20) // nbytes))

    def time_mpi() -> list[float]:
        """Per size, the faster of two raw calls (the stronger baseline): separate send and
        receive buffers, and MPI_IN_PLACE (what Horovod itself passes to MPI_Allreduce)."""
        out = []
        for nbytes in sizes:
            send = np.ones(nbytes // 4, dtype=np.float32)
            recv = np.empty_like(send)
            calls = {"two_buffers": lambda: comm.Allreduce(send, recv, op=MPI.SUM),
                     "in_place": lambda: comm.Allreduce(MPI.IN_PLACE, recv, op=MPI.SUM)}  # fmt: skip
            times: dict[str, list[float]] = {k: [] for k in calls}
            for call in calls.values():
                call()  # warm-up
            for _ in range(args.rounds):
                for name, call in calls.items():
                    recv.fill(1.0)  # in place sums grow; keep them finite
                    comm.Barrier()
                    t0 = time.perf_counter()
                    for _ in range(iters_for(nbytes)):
                        call()
                    times[name].append((time.perf_counter() - t0) / iters_for(nbytes))
            best = min(statistics.median(ts) for ts in times.values())
            out.append(comm.allreduce(best, op=MPI.MAX))  # the slowest rank's view
        return out

    # Raw MPI is timed while Horovod is not running (before init, after shutdown): Horovod's
    # background thread polls all the time and, with ranks filling the cores, would slow the
    # raw baseline down, not Horovod.
    mpi_before = time_mpi()
    hvd.init()
    # Two Horovod calls, alternating round by round: hvd.allreduce returns a new tensor (an
    # allocation and a copy of the whole buffer per call, on top of the reduction), while
    # hvd.allreduce_ averages in place, as mpirl's DistributedOptimizer does with every gradient.
    # Average (sum, then one scaling pass) is mpirl's op; it keeps the in-place values finite.
    calls = {"copy": lambda t: hvd.allreduce(t, name="bench", op=hvd.Sum),
             "in_place": lambda t: hvd.allreduce_(t, name="bench_", op=hvd.Average)}  # fmt: skip
    hvd_times: dict[str, list[float]] = {k: [] for k in calls}
    for nbytes in sizes:
        t = torch.ones(nbytes // 4, dtype=torch.float32)
        times: dict[str, list[float]] = {k: [] for k in calls}
        for call in calls.values():
            call(t)  # warm-up
        for _ in range(args.rounds):
            for name, call in calls.items():
                comm.Barrier()
                t0 = time.perf_counter()
                for _ in range(iters_for(nbytes)):
                    call(t)
                times[name].append((time.perf_counter() - t0) / iters_for(nbytes))
        for name in calls:
            hvd_times[name].append(comm.allreduce(statistics.median(times[name]), op=MPI.MAX))
    rank, size = hvd.rank(), hvd.size()
    hvd.shutdown()
    mpi_after = time_mpi()
    rows = []
    for nbytes, h, hc, m1, m2 in zip(sizes, hvd_times["in_place"], hvd_times["copy"], mpi_before, mpi_after):
        m = (m1 + m2) / 2
        rows.append({"bytes": nbytes, "horovod_s": h, "horovod_copy_s": hc, "mpi4py_s": m, "mpi4py_before_s": m1,
                     "mpi4py_after_s": m2, "ratio": m / h, "ratio_copy": m / hc, "horovod_MBps": nbytes / h / 1e6,
                     "mpi4py_MBps": nbytes / m / 1e6})  # fmt: skip
    if rank == 0:
        print(f"machine: {machine()}; {size} ranks")
        print("| size | Horovod in place (mpirl's) | Horovod, new tensor | mpi4py Allreduce | in place vs raw | "
              "new tensor vs raw |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            size = f"{r['bytes'] // 1024} KiB" if r["bytes"] < 2**20 else f"{r['bytes'] // 2**20} MiB"
            print(f"| {size} | {r['horovod_s'] * 1e6:,.0f} µs ({r['horovod_MBps']:,.0f} MB/s) | "
                  f"{r['horovod_copy_s'] * 1e6:,.0f} µs | "
                  f"{r['mpi4py_s'] * 1e6:,.0f} µs ({r['mpi4py_MBps']:,.0f} MB/s) | {r['ratio']:.2f}x | "
                  f"{r['ratio_copy']:.2f}x |")  # fmt: skip
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"machine": machine(), "ranks": size, "env": {k: v for k, v in os.environ.items()
                           if k.startswith(("HOROVOD_", "OMPI_MCA_"))}, "rows": rows}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
