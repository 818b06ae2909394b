"""The cost of one synchronous update at N ranks: compute plus a ring allreduce of the gradient.

A ring allreduce of S bytes over N ranks (reduce-scatter, then allgather) sends 2(N-1) messages
of S/N bytes from every rank, one after the other:

    t_allreduce(S, N) = 2 (N-1)/N * S / B  +  2 (N-1) * alpha

with B the link's bandwidth (bytes/s, per direction) and alpha its one-way latency per message
(what an MPI ping-pong of a tiny message measures: half its round trip). An update of mpirl at N
ranks then takes

    t_update = t_compute + o + t_allreduce(S, N)                           (--sync-every 1)
    t_update = t_compute + (o + t_allreduce(S_sync, N)) / K                (--sync-every K)

t_compute: an update's own work plus the env steps between updates, as one rank runs it;
o: the library's fixed cost per collective (Horovod's negotiation and cycle, about 0.1-0.3 ms,
measured on one node where the link terms vanish); S: the gradient (4 bytes per parameter, 2 with
--fp16-allreduce); S_sync: what local SGD averages every K updates, the weights and Adam's two
moments (12 bytes per parameter). mpirl overlaps the gradient allreduce with the next env step,
so the model is an upper bound where the link is fast; where the link dominates (the cases worth
modelling) the overlap is a small part of the total.

Not modelled: contention on a shared fabric, the topology (a ring across N nodes of a fat tree
runs at the links' rate; oversubscribed uplinks do not), and the algorithm MPI picks: for small
messages Open MPI uses recursive doubling, 2 ceil(log2 N) latencies instead of 2 (N-1), which
``allreduce_s(..., algorithm="recursive-doubling")`` gives for comparison.

Stdlib only; used by benchmarks/interconnect.py and tested in tests/unit/test_ring_model.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FP32, FP16 = 4, 2
SYNC_FLOATS_PER_PARAM = 3  # local SGD averages the weights and Adam's exp_avg and exp_avg_sq


@dataclass(frozen=True)
class Link:
    """A network link as the model sees it: one-way latency per message and bandwidth."""

    name: str
    latency_s: float
    bandwidth_bytes_s: float


# Typical MPI figures of real interconnects (vendor and OSU micro-benchmark ballparks, not
# measured here): the latency is MPI's small-message one-way latency, the bandwidth the link's
# line rate less protocol overhead.
INTERCONNECTS = (
    Link("InfiniBand HDR 200 Gb/s", 1.5e-6, 24e9),
    Link("InfiniBand EDR 100 Gb/s", 1.5e-6, 12e9),
    Link("Ethernet 100 Gb/s, RoCE", 3e-6, 12e9),
    Link("Ethernet 25 Gb/s, TCP", 15e-6, 2.9e9),
    Link("Ethernet 10 Gb/s, TCP", 25e-6, 1.15e9),
)


def allreduce_s(nbytes: float, ranks: int, link: Link, algorithm: str = "ring") -> float:
    """Seconds for an allreduce of ``nbytes`` per rank over ``ranks`` ranks joined by ``link``."""
    if ranks < 2:
        return 0.0
    transfer = 2 * (ranks - 1) / ranks * nbytes / link.bandwidth_bytes_s
    if algorithm == "ring":
        return transfer + 2 * (ranks - 1) * link.latency_s
    if algorithm == "recursive-doubling":
        return transfer + 2 * math.ceil(math.log2(ranks)) * link.latency_s
    raise ValueError(f"unknown allreduce algorithm {algorithm!r}")


@dataclass(frozen=True)
class Workload:
    """What one update of a task costs apart from the network."""

    name: str
    params: int  # parameters of the Q-network
    compute_s: float  # t_compute: one update and its env steps, no communication
    overhead_s: float = 0.0  # o: the collective library's fixed cost per allreduce

    def sync_bytes(self, sync_every: int, fp16: bool) -> float:
        """Bytes each rank allreduces at a synchronisation point."""
        if sync_every > 1:
            return SYNC_FLOATS_PER_PARAM * FP32 * self.params
        return (FP16 if fp16 else FP32) * self.params


def update_s(work: Workload, ranks: int, link: Link, sync_every: int = 1, fp16: bool = False) -> float:
    """Seconds per update at ``ranks`` ranks: compute plus the collective, every ``sync_every`` updates."""
    if ranks < 2:
        return work.compute_s
    comm = work.overhead_s + allreduce_s(work.sync_bytes(sync_every, fp16), ranks, link)
    return work.compute_s + comm / sync_every


def efficiency(work: Workload, ranks: int, link: Link, sync_every: int = 1, fp16: bool = False) -> float:
    """Weak-scaling efficiency: the update rate at ``ranks`` ranks over the rate without communication."""
    return work.compute_s / update_s(work, ranks, link, sync_every, fp16)


def pays_off(work: Workload, ranks: int, link: Link, threshold: float = 0.10) -> dict[str, bool]:
    """Whether --sync-every 4 / 16 or fp16 would save more than ``threshold`` of an update's time
    against gradient averaging every update (K = 1, fp32) on this link at this size."""
    base = update_s(work, ranks, link)
    return {
        "fp16": update_s(work, ranks, link, fp16=True) < (1 - threshold) * base,
        "sync_every_4": update_s(work, ranks, link, sync_every=4) < (1 - threshold) * base,
        "sync_every_16": update_s(work, ranks, link, sync_every=16) < (1 - threshold) * base,
    }
