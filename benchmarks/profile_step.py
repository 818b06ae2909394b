"""Where a training iteration's time goes, at 1 rank: env step (acting included), replay
sample, host-to-device copy, update, allreduce; and how fast training runs without probes.

    .venv/bin/python benchmarks/profile_step.py --config configs/atari-dqn.toml --env ALE/Pong-v5 \\
        [--device cuda] [--iterations 300] [--json out.json]

Two timed phases over the same learner and collector, after the replay is warmed up:

1. plain: ``--iterations`` training iterations exactly as ``mpirl.trainer`` runs them (update
   started, env stepped while it is in flight, update finished), no probe; frames/s, env
   steps/s, updates/s, and on CUDA the GPU's busy share (``nvidia-smi`` sampled every 100 ms).
2. probed: the same iterations with each phase timed. The probes wrap mpirl's own methods
   (Collector.step, replay.sample, Learner._tensor, the gradient sync's wait) and synchronise
   the GPU at each boundary, so the phases run one after another (no overlap): the shares say
   what each phase costs, the plain phase says what the overlapped loop achieves. ``env`` is
   the env step with ε-greedy acting (its forward pass included, its copy to the device not);
   ``update`` is the rest: forward, backward, clip, optimizer and target steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

import torch

_here = os.path.dirname(os.path.abspath(__file__))
# The repository first, and not this folder: its minatar.py (the MinAtar benchmark) would shadow
# the minatar package that mpirl.envs imports for MinAtar games.
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
from mpirl import algo, dist, envs  # noqa: E402
from mpirl.collector import Collector  # noqa: E402
from mpirl.config import parse_args  # noqa: E402
from mpirl.learner import Learner  # noqa: E402

FRAME_SKIP = 4  # emulator frames per agent step for ALE games


class GpuSampler:
    """nvidia-smi's utilization.gpu (percent of time a kernel ran), every 100 ms, in a thread."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: Optional[subprocess.Popen] = None
        if shutil.which("nvidia-smi") and torch.cuda.is_available():
            cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def mean_since(self, start: int) -> Optional[float]:
        xs = self.samples[start:]
        return statistics.mean(xs) if xs else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _iterate(learner: Learner, collector: Collector, cfg: Any, n: int, step0: int) -> int:
    """``n`` training iterations as the trainer's loop runs them; returns env steps taken."""
    E = cfg.num_envs_per_rank
    for i in range(n):
        eps = algo.linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps, step0 + i * E)
        learner.start(collector.replay, collector.rng, 1.0)
        collector.step(learner.greedy, eps)  # while the allreduce runs (none at 1 rank)
        learner.finish()
    return n * E


class Phases:
    """Time spent in wrapped methods, each call's time less the wrapped calls it made (so a
    copy to the device inside an env step counts as a copy, not as env time). The GPU is
    synchronised at every boundary, so device work is charged to the phase that queued it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open call: time of the wrapped calls inside it
        self._undo: list[Callable[[], None]] = []

    def wrap(self, obj: Any, name: str, phase: str) -> None:
        original = getattr(obj, name)
        self.seconds.setdefault(phase, 0.0)

        def timed(*a: Any, **k: Any) -> Any:
            _sync(self.device)
            t0 = time.perf_counter()
            self._inner.append(0.0)
            try:
                return original(*a, **k)
            finally:
                _sync(self.device)
                dt = time.perf_counter() - t0
                self.seconds[phase] += dt - self._inner.pop()
                if self._inner:
                    self._inner[-1] += dt

        setattr(obj, name, timed)
        self._undo.append(lambda: setattr(obj, name, original))

    def unwrap(self) -> None:
        for undo in reversed(self._undo):
            undo()


SETTLE = 20  # training iterations run before anything is timed (allocation, lazy CUDA init)


class Setup(NamedTuple):
    """A 1-rank learner and collector with a warmed-up replay, as ``mpirl.trainer`` builds them."""

    cfg: Any
    learner: Learner
    collector: Collector
    env_backend: str
    frames_per_step: int  # emulator frames per env step (4 for ALE games, else 1)
    acting_iterations: int  # acting-only iterations of the warm-up (then SETTLE training ones)
    acting_s: float  # seconds the acting-only warm-up took

    @property
    def steps_taken(self) -> int:
        """Env steps this rank has taken so far (every env, warm-up and settling)."""
        return (self.acting_iterations + SETTLE) * self.cfg.num_envs_per_rank


def setup(argv: list[str]) -> Setup:
    """Build from mpirl's command-line options, fill the replay by acting, then run 20 training
    iterations (``SETTLE``) before anything is timed."""
    # A short profile needs a small replay and warm-up, unless the command line says otherwise.
    for flag, value in (("--learning-starts-per-rank", "256"), ("--buffer-size-per-rank", "20000")):
        if flag not in argv:
            argv = [*argv, flag, value]
    cfg = parse_args(argv)
    ctx = dist.init(cfg.device, cfg.torch_threads, cfg.backend)
    info = envs.inspect_env(cfg.env_id, envs.atari_options(cfg))
    env_backend = envs.choose_backend(cfg.env_backend, cfg.env_id, info, envs.atari_options(cfg))
    collector = Collector(cfg, info, ctx.rank, env_backend, dist.cores_per_rank(ctx.local_size))
    learner = Learner(cfg, info.obs_shape, info.n_actions, ctx)
    E = cfg.num_envs_per_rank
    # Warm-up: acting only, until the replay holds enough for a batch (and for lazy CUDA init).
    warm = max(cfg.learning_starts_per_rank, cfg.batch_size_per_rank) // E + 1
    t0 = time.perf_counter()
    for _ in range(warm):
        collector.step(learner.greedy, 1.0)
    acting_s = time.perf_counter() - t0
    _iterate(learner, collector, cfg, SETTLE, warm * E)
    frames = FRAME_SKIP if info.atari else 1
    return Setup(cfg, learner, collector, env_backend, frames, warm, acting_s)


def report(result: dict[str, Any], path: str) -> None:
    """Print the results as JSON, and write them to ``path`` unless it is empty."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=300, help="training iterations per timed phase")
    ap.add_argument("--json", default="", help="write the results here")
    args, rest = ap.parse_known_args()
    s = setup(rest)
    cfg, learner, collector, env_backend, frames, warm, acting_s = s
    dev = learner.device
    E = cfg.num_envs_per_rank
    gpu = GpuSampler()
    time.sleep(0.3)

    # 1. plain
    mark = len(gpu.samples)
    _sync(dev)
    t0 = time.perf_counter()
    steps = _iterate(learner, collector, cfg, args.iterations, s.steps_taken)
    _sync(dev)
    plain_s = time.perf_counter() - t0
    busy = gpu.mean_since(mark)

    # 2. probed
    phases = Phases(dev)
    phases.wrap(collector, "step", "env")
    phases.wrap(collector.replay, "sample", "sample")
    phases.wrap(learner, "_tensor", "host_to_device")
    phases.seconds["allreduce"] = 0.0
    if learner.grad_sync is not None:
        phases.wrap(learner.grad_sync, "wait", "allreduce")
    _sync(dev)
    t0 = time.perf_counter()
    _iterate(learner, collector, cfg, args.iterations, s.steps_taken + steps)
    _sync(dev)
    probed_s = time.perf_counter() - t0
    phases.unwrap()
    gpu.stop()
    parts = dict(phases.seconds)
    parts["update"] = max(0.0, probed_s - sum(parts.values()))  # forward, backward, clip, step, target
    result = {
        "env_id": cfg.env_id,
        "env_backend": env_backend,
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "num_envs_per_rank": E,
        "batch_size_per_rank": cfg.batch_size_per_rank,
        "precision": cfg.precision,
        "iterations": args.iterations,
        "acting_frames_per_s": warm * E * frames / acting_s,
        "training_frames_per_s": steps * frames / plain_s,
        "training_env_steps_per_s": steps / plain_s,
        "updates_per_s": args.iterations / plain_s,
        "gpu_busy_percent": busy,
        "probed_iteration_ms": probed_s / args.iterations * 1e3,
        "plain_iteration_ms": plain_s / args.iterations * 1e3,
        "share": {k: v / probed_s for k, v in parts.items()},
        "ms_per_iteration": {k: v / args.iterations * 1e3 for k, v in parts.items()},
    }
    report(result, args.json)
    collector.close()


if __name__ == "__main__":
    main()
