"""The host side of a training iteration on CUDA: what each piece costs and what would cut it.

    .venv/bin/python benchmarks/gpu_overhead.py --config configs/atari-dqn.toml --env ALE/Pong-v5 \\
        --env-backend envpool [--device cuda] [--iterations 100] [--json out.json]

The first device check (2026-11-29, H200, BENCHMARKS.md) found Pong at 1 rank with the GPU busy
4-8 % of the time: 14-24 ms per iteration, of which 6-12 ms in mpirl's host-to-device copies and
8-9 ms in the update of a batch of 32, where the kernels themselves take well under a millisecond.
So the iteration is bound by the host. This measures, in one run, the candidate causes side by side:

- the plain iteration at torch intra-op threads = cores, 4 and 1 (thread-pool wake-ups and
  contention with the env threads);
- one ``torch.cuda.synchronize()`` and one tiny kernel launch, in microseconds (the machine's
  floor per sync and per launch);
- a batch's copy to the device as mpirl does it (``Learner._tensor``: page-lock, then an async
  copy), against a preallocated page-locked staging buffer and a plain pageable ``.to()``;
- the greedy forward pass for one env step (a device round trip);
- torch.profiler's top operators by host time per iteration.

On the CPU (the device check's dry run) the copies are skipped and the rest still runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_step import _iterate, _sync, report, setup  # noqa: E402


def _per_call_ms(fn: Callable[[], Any], device: torch.device, n: int) -> float:
    """Mean wall milliseconds per call of ``fn`` over ``n`` calls, the device synchronised around."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n * 1e3


def _top_ops(prof: Any, key: str, iterations: int, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` operators with the most ``key`` time (host or device), in ms per iteration."""
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:n]
    return [
        {
            "op": e.key,
            "calls_per_iteration": e.count / iterations,
            "ms_per_iteration": getattr(e, key, 0.0) / 1e3 / iterations,
        }
        for e in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=100, help="training iterations per timed loop")
    ap.add_argument("--json", default="", help="write the results here")
    args, rest = ap.parse_known_args()
    s = setup(rest)
    cfg, learner, collector = s.cfg, s.learner, s.collector
    dev = learner.device
    cuda = dev.type == "cuda"
    E, B = cfg.num_envs_per_rank, cfg.batch_size_per_rank
    step = s.steps_taken

    def loop_ms() -> float:
        nonlocal step
        _sync(dev)
        t0 = time.perf_counter()
        step += _iterate(learner, collector, cfg, args.iterations, step)
        _sync(dev)
        return (time.perf_counter() - t0) / args.iterations * 1e3

    cores = torch.get_num_threads()
    iteration_ms = {}
    for threads in sorted({cores, min(4, cores), 1}, reverse=True):
        torch.set_num_threads(threads)
        iteration_ms[str(threads)] = loop_ms()
    torch.set_num_threads(cores)

    n = 200
    x = torch.zeros(1, device=dev)
    obs = collector.replay.sample(B, collector.rng, 1.0).obs  # a real batch's observations
    small = np.zeros(B, dtype=np.float32)
    copy: dict[str, Any] = {"obs_bytes": int(obs.nbytes)}
    if cuda:
        staging = torch.empty(obs.shape, dtype=torch.from_numpy(obs).dtype).pin_memory()
        copy.update(
            mpirl_tensor_obs_ms=_per_call_ms(lambda: learner._tensor(obs), dev, n),
            mpirl_tensor_small_ms=_per_call_ms(lambda: learner._tensor(small), dev, n),
            staging_obs_ms=_per_call_ms(
                lambda: staging.copy_(torch.from_numpy(obs)).to(dev, non_blocking=True), dev, n
            ),
            pageable_obs_ms=_per_call_ms(lambda: torch.from_numpy(obs).to(dev), dev, n),
        )
    latest = collector.replay.sample(E, collector.rng, 1.0).obs  # E observations, as one env step acts on
    result: dict[str, Any] = {
        "env_id": cfg.env_id,
        "env_backend": s.env_backend,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if cuda else None,
        "num_envs_per_rank": E,
        "batch_size_per_rank": B,
        "iterations": args.iterations,
        "iteration_ms_by_torch_threads": iteration_ms,
        "sync_us": _per_call_ms(lambda: _sync(dev), dev, n) * 1e3,
        "tiny_kernel_launch_us": _per_call_ms(lambda: x.add_(1), dev, 2000) * 1e3,
        "greedy_forward_ms": _per_call_ms(lambda: learner.greedy(latest), dev, n),
        "copy": copy,
    }
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _iterate(learner, collector, cfg, 30, step)
    result["top_host_ops"] = _top_ops(prof, "self_cpu_time_total", 30)
    if cuda:
        result["top_device_ops"] = _top_ops(prof, "self_device_time_total", 30)
    report(result, args.json)
    collector.close()


if __name__ == "__main__":
    main()
