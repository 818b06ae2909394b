"""The link between two ranks as MPI sees it: one-way latency, bandwidth, and allreduce times.

    mpirun -np 2 --host mpirl-n1,mpirl-n2 --mca plm_rsh_agent hpc/slurm/on-node.sh \\
        .venv/bin/python benchmarks/link_pingpong.py [--allreduce-bytes 69640 823628] [--json out.json]

- latency: half the round trip of an 8-byte ping-pong (MPI Send/Recv), median of many;
- bandwidth: bytes over half the round trip of a 4 MiB ping-pong, median of a few;
- allreduce: MPI_Allreduce (sum, float32) of each given size, median per-call time, the slower
  rank's; what the ring model's allreduce term predicts from the two figures above.

Rank 0 prints one JSON object (and writes it with --json). benchmarks/interconnect.py runs this at
each link rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from mpi4py import MPI


def pingpong_s(comm: MPI.Comm, nbytes: int, reps: int) -> float:
    """Median one-way time (half a round trip) of ``nbytes`` between ranks 0 and 1."""
    buf = np.zeros(max(nbytes, 1), dtype=np.uint8)
    peer = 1 - comm.rank
    times = []
    for i in range(reps + 2):  # two warm-up round trips
        comm.Barrier()
        t0 = time.perf_counter()
        if comm.rank == 0:
            comm.Send(buf, dest=peer, tag=1)
            comm.Recv(buf, source=peer, tag=2)
        else:
            comm.Recv(buf, source=peer, tag=1)
            comm.Send(buf, dest=peer, tag=2)
        if i >= 2:
            times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def allreduce_s(comm: MPI.Comm, nbytes: int, reps: int) -> float:
    """Median over calls of the slower rank's time for an Allreduce of ``nbytes`` of float32."""
    send = np.ones(max(nbytes // 4, 1), dtype=np.float32)
    recv = np.empty_like(send)
    times = []
    for i in range(reps + 2):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(send, recv, op=MPI.SUM)
        dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if i >= 2:
            times.append(dt)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allreduce-bytes", type=int, nargs="*", default=[])
    ap.add_argument("--bandwidth-mib", type=float, default=4.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    if comm.size != 2:
        raise SystemExit("link_pingpong.py: run it on exactly 2 ranks")
    big = int(args.bandwidth_mib * 2**20)
    latency = pingpong_s(comm, 8, reps=500)
    one_way = pingpong_s(comm, big, reps=5)
    result = {
        "hosts": comm.gather(MPI.Get_processor_name()),
        "latency_s": latency,
        "bandwidth_bytes_s": big / one_way,
        "bandwidth_message_bytes": big,
        "allreduce_s": {str(n): allreduce_s(comm, n, reps=20) for n in args.allreduce_bytes},
    }
    if comm.rank == 0:
        print(json.dumps(result))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
