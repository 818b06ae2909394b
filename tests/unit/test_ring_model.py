"""benchmarks/ring_model.py: the ring-allreduce cost model behind BENCHMARKS.md's interconnect
predictions, against hand-computed figures."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from ring_model import Link, Workload, allreduce_s, efficiency, pays_off, update_s  # noqa: E402

LINK = Link("test", latency_s=10e-6, bandwidth_bytes_s=1e9)  # 10 µs, 1 GB/s


def test_ring_allreduce_at_two_and_four_ranks():
    # 2 ranks: 2*(1/2)*1 MB / 1 GB/s = 1 ms, plus 2 latencies = 20 µs
    assert allreduce_s(1e6, 2, LINK) == pytest.approx(1.02e-3)
    # 4 ranks: 2*(3/4)*1 ms = 1.5 ms, plus 6 latencies = 60 µs
    assert allreduce_s(1e6, 4, LINK) == pytest.approx(1.56e-3)
    assert allreduce_s(1e6, 1, LINK) == 0.0  # nobody to talk to


def test_recursive_doubling_pays_log_latencies():
    # 64 ranks, 8 bytes: the ring pays 126 latencies, recursive doubling 2*6 = 12
    ring = allreduce_s(8, 64, LINK)
    rd = allreduce_s(8, 64, LINK, algorithm="recursive-doubling")
    assert ring == pytest.approx(126 * 10e-6 + 2 * 63 / 64 * 8 / 1e9)
    assert rd == pytest.approx(12 * 10e-6 + 2 * 63 / 64 * 8 / 1e9)
    with pytest.raises(ValueError, match="unknown allreduce algorithm"):
        allreduce_s(8, 4, LINK, algorithm="tree")


def test_bytes_per_variant():
    w = Workload("w", params=1000, compute_s=1e-3)
    assert w.sync_bytes(1, fp16=False) == 4000  # fp32 gradient
    assert w.sync_bytes(1, fp16=True) == 2000  # fp16 gradient
    assert w.sync_bytes(4, fp16=False) == 12000  # weights + Adam's two moments, every 4 updates


def test_update_time_and_efficiency():
    w = Workload("w", params=250_000, compute_s=2e-3, overhead_s=0.2e-3)  # 1 MB fp32 gradient
    # K=1 at 2 ranks: 2 ms + 0.2 ms + 1.02 ms
    assert update_s(w, 2, LINK) == pytest.approx(3.22e-3)
    # K=4: the 3 MB sync (3.02 ms) and the overhead over 4 updates
    assert update_s(w, 2, LINK, sync_every=4) == pytest.approx(2e-3 + (0.2e-3 + 3.02e-3) / 4)
    assert update_s(w, 1, LINK) == w.compute_s
    assert efficiency(w, 2, LINK) == pytest.approx(2e-3 / 3.22e-3)


def test_what_pays_off():
    fast = Link("fast", latency_s=1e-6, bandwidth_bytes_s=100e9)
    big = Workload("big gradient", params=25_000_000, compute_s=5e-3)  # 100 MB: bandwidth-bound
    assert pays_off(big, 8, LINK) == {"fp16": True, "sync_every_4": True, "sync_every_16": True}
    tiny = Workload("tiny", params=1000, compute_s=1e-3, overhead_s=0.2e-3)  # latency and overhead bound
    verdict = pays_off(tiny, 64, LINK)
    assert verdict["fp16"] is False and verdict["sync_every_4"] is True
    assert pays_off(tiny, 8, fast) == {"fp16": False, "sync_every_4": True, "sync_every_16": True}
    cheap = Workload("cheap", params=1000, compute_s=10e-3)  # nothing to win: the network is 0.1 %
    assert pays_off(cheap, 8, fast) == {"fp16": False, "sync_every_4": False, "sync_every_16": False}
