"""Horovod, mpirl's MPI backend and torch.distributed (Gloo) allreduce against a raw mpi4py
Allreduce of the same float32 buffers, side by side in one run: mpirl's three CPU backends and
their baseline.

    launch/mpirun.sh -np 2 -- python benchmarks/allreduce.py [--json benchmarks/results/allreduce.json] [--quick]

For each size from 1 KiB to 64 MiB, in blocks: raw MPI, Horovod (hvd.init ... hvd.shutdown),
mpirl's MPI backend, torch Gloo, raw MPI, Horovod, ..., raw MPI. Each backend block is compared
with the mean of the raw blocks around it; the ratio is the median over blocks (min-max shown).
The MPI backend is timed through mpirl's own ``MpiBackend`` (a torch tensor's numpy view, its
communicator, the call a gradient sync makes). Gloo is timed as mpirl's torch backend calls it:
in place, started asynchronously and waited for (``all_reduce(..., async_op=True).wait()``), on
a process group whose rendezvous went through MPI, as dist_torch does. Times are medians over rounds of
per-call times, the slowest rank's. Bandwidth is the algorithm bandwidth, bytes / time.
Horovod's figure includes what a training step pays: the tensor queue, negotiation over its
controller, fusion, and the wait in synchronize. It is timed two ways, alternating: in place
(``hvd.allreduce_``, as mpirl's DistributedOptimizer does with each gradient: the headline
ratio) and returning a new tensor (``hvd.allreduce``: one more allocation and copy). Horovod
runs with mpirl's HOROVOD_CYCLE_TIME (0.05 ms) unless the environment sets another
(HOROVOD_CYCLE_TIME=1 is Horovod's default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-kib", type=int, default=1)
    ap.add_argument("--max-mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per size within a block")
    ap.add_argument("--blocks", type=int, default=3, help="Horovod blocks, each between two raw MPI blocks")
    ap.add_argument("--json", default="")
    ap.add_argument("--quick", action="store_true", help="smoke run: up to 4 MiB, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.max_mib, args.rounds, args.blocks = 4, 2, 1

    import horovod.torch as hvd
    import torch.distributed as tdist
    from mpi4py import MPI

    from mpirl.dist_mpi import MpiBackend

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
            calls = {"two_buffers": lambda s=send, r=recv: comm.Allreduce(s, r, op=MPI.SUM),
                     "in_place": lambda r=recv: comm.Allreduce(MPI.IN_PLACE, r, op=MPI.SUM)}  # fmt: skip
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
    # Two Horovod calls, alternating round by round: hvd.allreduce returns a new tensor (an
    # allocation and a copy of the whole buffer per call, on top of the reduction), while
    # hvd.allreduce_ averages in place, as mpirl's DistributedOptimizer does with every gradient.
    # Sum on both sides, as raw MPI does (mpirl averages: one more scaling pass over the buffer).
    calls = {"copy": lambda t: hvd.allreduce(t, name="bench", op=hvd.Sum),
             "in_place": lambda t: hvd.allreduce_(t, name="bench_", op=hvd.Sum)}  # fmt: skip

    def time_hvd() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {k: [] for k in calls}
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
                out[name].append(comm.allreduce(statistics.median(times[name]), op=MPI.MAX))
        return out

    # torch.distributed with Gloo, started as mpirl's torch backend starts it: rank 0's free port
    # travels by one MPI broadcast. Gloo has no polling thread: it can stay up between blocks.
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    port = comm.bcast(port, root=0)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=comm.Get_rank(),
                             world_size=comm.Get_size())  # fmt: skip

    def time_call(call: Callable[[torch.Tensor], object]) -> list[float]:
        """Per size, the median per-call time of ``call`` on a float32 tensor (the slowest rank's)."""
        out = []
        for nbytes in sizes:
            t = torch.ones(nbytes // 4, dtype=torch.float32)
            call(t)  # warm-up
            times = []
            for _ in range(args.rounds):
                t.fill_(1.0)
                comm.Barrier()
                t0 = time.perf_counter()
                for _ in range(iters_for(nbytes)):
                    call(t)
                times.append((time.perf_counter() - t0) / iters_for(nbytes))
            out.append(comm.allreduce(statistics.median(times), op=MPI.MAX))
        return out

    mpi_backend = MpiBackend()  # no thread of its own: it can stay up between blocks, as Gloo does

    def time_mpi_backend() -> list[float]:
        return time_call(lambda t: mpi_backend._sum_(t)())  # the sum and its (empty) wait, as mpirl's sync

    def time_gloo() -> list[float]:
        return time_call(lambda t: tdist.all_reduce(t, op=tdist.ReduceOp.SUM, async_op=True).wait())

    # Blocks alternate raw, Horovod, Gloo, raw, Horovod, Gloo, ..., raw (Horovod started and shut
    # down each time); each backend block is compared with the raw blocks on either side of it,
    # and the ratio reported is the median over blocks: this machine's speed drifts by 2-3x over
    # minutes.
    raw_blocks = [time_mpi()]
    hvd_blocks, mpi_blocks, gloo_blocks = [], [], []
    rank, size = comm.Get_rank(), comm.Get_size()
    for _ in range(args.blocks):
        hvd.init()
        hvd_blocks.append(time_hvd())
        hvd.shutdown()
        mpi_blocks.append(time_mpi_backend())
        gloo_blocks.append(time_gloo())
        raw_blocks.append(time_mpi())
    tdist.destroy_process_group()
    rows = []
    for i, nbytes in enumerate(sizes):
        raw = [(raw_blocks[b][i] + raw_blocks[b + 1][i]) / 2 for b in range(args.blocks)]
        ratio = [m / h["in_place"][i] for m, h in zip(raw, hvd_blocks)]
        ratio_copy = [m / h["copy"][i] for m, h in zip(raw, hvd_blocks)]
        h = statistics.median(b["in_place"][i] for b in hvd_blocks)
        hc = statistics.median(b["copy"][i] for b in hvd_blocks)
        m = statistics.median(raw)
        ratio_gloo = [r / g[i] for r, g in zip(raw, gloo_blocks)]
        ratio_mpi = [r / b[i] for r, b in zip(raw, mpi_blocks)]
        gl = statistics.median(g[i] for g in gloo_blocks)
        rows.append({"bytes": nbytes, "horovod_s": h, "horovod_copy_s": hc, "mpi4py_s": m, "gloo_s": gl,
                     "mpi_backend_s": statistics.median(b[i] for b in mpi_blocks),
                     "ratio_mpi_backend": statistics.median(ratio_mpi), "ratio_mpi_backend_min": min(ratio_mpi),
                     "ratio_mpi_backend_max": max(ratio_mpi), "mpi_backend_blocks_s": [b[i] for b in mpi_blocks],
                     "ratio_gloo": statistics.median(ratio_gloo), "ratio_gloo_min": min(ratio_gloo),
                     "ratio_gloo_max": max(ratio_gloo), "gloo_blocks_s": [g[i] for g in gloo_blocks],
                     "ratio": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
                     "ratio_copy": statistics.median(ratio_copy), "horovod_MBps": nbytes / h / 1e6,
                     "mpi4py_MBps": nbytes / m / 1e6, "mpi4py_blocks_s": [r[i] for r in raw_blocks],
                     "horovod_blocks_s": [b["in_place"][i] for b in hvd_blocks]})  # fmt: skip
    if rank == 0:
        print(f"machine: {machine()}; {size} ranks")
        print("| size | mpi4py Allreduce (raw) | Horovod in place (mpirl's) | mpirl's MPI backend | torch Gloo "
              "(mpirl's) | Horovod vs raw (min-max) | MPI backend vs raw (min-max) | Gloo vs raw (min-max) | "
              "Horovod, new tensor, vs raw |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            size = f"{r['bytes'] // 1024} KiB" if r["bytes"] < 2**20 else f"{r['bytes'] // 2**20} MiB"
            print(f"| {size} | {r['mpi4py_s'] * 1e6:,.0f} µs ({r['mpi4py_MBps']:,.0f} MB/s) | "
                  f"{r['horovod_s'] * 1e6:,.0f} µs ({r['horovod_MBps']:,.0f} MB/s) | "
                  f"{r['mpi_backend_s'] * 1e6:,.0f} µs ({r['bytes'] / r['mpi_backend_s'] / 1e6:,.0f} MB/s) | "
                  f"{r['gloo_s'] * 1e6:,.0f} µs ({r['bytes'] / r['gloo_s'] / 1e6:,.0f} MB/s) | "
                  f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
                  f"{r['ratio_mpi_backend']:.2f}x ({r['ratio_mpi_backend_min']:.2f}-"
                  f"{r['ratio_mpi_backend_max']:.2f}) | "
                  f"{r['ratio_gloo']:.2f}x ({r['ratio_gloo_min']:.2f}-{r['ratio_gloo_max']:.2f}) | "
                  f"{r['ratio_copy']:.2f}x |")  # fmt: skip
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"machine": machine(), "ranks": size, "env": {k: v for k, v in os.environ.items()
                           if k.startswith(("HOROVOD_", "OMPI_MCA_"))}, "rows": rows}, fh, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
