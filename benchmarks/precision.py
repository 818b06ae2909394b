"""The learner's update in float32 against bf16 autocast (``--precision``), interleaved, per network.

    .venv/bin/python benchmarks/precision.py [--device cpu|cuda] [--rounds 5] [--updates 200] [--json out.json]

For each network mpirl builds (the MinAtar CNN on (4, 10, 10) planes at the MinAtar recipe's
batch of 128, the Nature CNN on (4, 84, 84) frames at the Atari recipe's 32, the CartPole MLP at
128), two learners of one seed, one per precision, update from the same replay of random
transitions (one rank, no collectives: what one rank's update costs). The timed phases alternate
fp32, bf16, fp32, ... for ``--rounds`` rounds, so the machine's noise hits both alike; the figure
is the median over rounds of ms per update (``Learner.start`` + ``finish``: forward passes,
backward, clip, Adam, target copy) and the ratio bf16 / fp32 (below 1: bf16 is faster). One torch
thread on the CPU, as a rank of the recipes runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpirl.config import Config  # noqa: E402
from mpirl.dist import DistContext  # noqa: E402
from mpirl.learner import Learner  # noqa: E402
from mpirl.replay import ReplayBuffer, Transitions  # noqa: E402

# name: (observation shape, dtype, actions, batch per rank, options)
NETWORKS: dict[str, tuple[tuple[int, ...], Any, int, int, dict[str, Any]]] = {
    "minatar_cnn": ((4, 10, 10), np.uint8, 6, 128, {"target_update_interval": 250, "tau": 1.0}),
    "nature_cnn": ((4, 84, 84), np.uint8, 6, 32, {"target_update_interval": 2000, "tau": 1.0}),
    "cartpole_mlp": ((4,), np.float32, 2, 128, {"hidden_sizes": (128, 128)}),
}
CAPACITY = 4096


def make_learner(name: str, precision: str, device: torch.device) -> tuple[Learner, ReplayBuffer]:
    """A learner of ``name``'s network and a replay of CAPACITY random transitions for it."""
    shape, dtype, n_actions, batch, extra = NETWORKS[name]
    cfg = Config(batch_size_per_rank=batch, learning_starts_per_rank=batch, buffer_size_per_rank=CAPACITY,
                 num_envs_per_rank=1, precision=precision, seed=1, **extra).validate()  # fmt: skip
    learner = Learner(cfg, shape, n_actions, DistContext(0, 1, 0, 1, device))
    rng = np.random.default_rng(0)
    obs = (rng.random((CAPACITY, *shape)) * (2 if dtype == np.uint8 and shape[1] == 10 else 256)).astype(dtype)
    buf = ReplayBuffer(CAPACITY, shape, np.dtype(dtype), cfg.gamma)
    rewards = rng.random(CAPACITY).astype(np.float32)
    buf.add(Transitions(obs=obs, actions=rng.integers(0, n_actions, CAPACITY), rewards=rewards,
                        next_obs=np.roll(obs, 1, axis=0), steps=np.full(CAPACITY, 3, np.uint8),
                        terminated=rng.random(CAPACITY) < 0.01, truncated=np.zeros(CAPACITY, bool)))  # fmt: skip
    return learner, buf


def time_updates(learner: Learner, buf: ReplayBuffer, n: int, rng: np.random.Generator) -> float:
    """Seconds per update over ``n`` updates."""
    sync = torch.cuda.synchronize if learner.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        learner.start(buf, rng, 1.0)
        learner.finish()
    sync()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved fp32/bf16 rounds (median over them)")
    ap.add_argument("--updates", type=int, default=200, help="updates per timed phase")
    ap.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor()
                              or platform.machine(), "torch": torch.__version__, "networks": {}}  # fmt: skip
    for name in args.networks:
        pair = {p: make_learner(name, p, device) for p in ("fp32", "bf16")}
        rng = np.random.default_rng(1)
        for learner, buf in pair.values():  # warm-up: allocator, oneDNN/cuBLAS kernel choice
            time_updates(learner, buf, max(10, args.updates // 10), rng)
        ms: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for _ in range(args.rounds):
            for p, (learner, buf) in pair.items():
                ms[p].append(1e3 * time_updates(learner, buf, args.updates, rng))
        med = {p: statistics.median(v) for p, v in ms.items()}
        result["networks"][name] = {"batch": NETWORKS[name][3], "ms_per_update": ms, "median_ms": med,
                                    "bf16_over_fp32": med["bf16"] / med["fp32"]}  # fmt: skip
        print(f"{name:13s} batch {NETWORKS[name][3]:3d}: fp32 {med['fp32']:.3f} ms, bf16 {med['bf16']:.3f} ms "
              f"per update -> bf16/fp32 {med['bf16'] / med['fp32']:.2f}x", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
