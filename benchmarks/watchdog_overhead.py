"""What the stall watchdog's heartbeat costs per env step, at 1 rank, on the CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/watchdog_overhead.py [--env CartPole-v1] [--rounds 200]

Times ``Collector.step`` as mpirl runs it (one ``watchdog.beat`` per vector step) against the
same method with the beat line removed, in interleaved blocks (A, B, A, B, ...) so that drift
in the machine's load hits both alike; reports the per-step time of each (the fastest block,
which other processes disturbed least, and the median block) and their ratios, for random
acting (ε = 1: the env step alone, the worst case for the ratio) and for ε-greedy acting
(ε = 0.05: a forward pass per step, as in training). Also times ``beat()`` alone.

On the 2-core development machine, shared with other jobs: ``beat()`` 0.14-0.24 us, a vector
step of 8 CartPole envs 165-330 us, so about 0.1 %; the A/B ratios fell between 0.98 and 1.02
from run to run, i.e. the heartbeat is below what this machine's noise lets one measure.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import textwrap
import time
import timeit

_here = os.path.dirname(os.path.abspath(__file__))
# The repository first, and not this folder: its minatar.py (the MinAtar benchmark) would shadow
# the minatar package that mpirl.envs imports for MinAtar games.
sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
import torch  # noqa: E402

from mpirl import collector as collector_module  # noqa: E402
from mpirl import envs, model, watchdog  # noqa: E402
from mpirl.collector import Collector  # noqa: E402
from mpirl.config import Config  # noqa: E402


def step_without_beat() -> object:
    """``Collector.step`` with its heartbeat line taken out (compiled in the collector's module)."""
    src = textwrap.dedent(inspect.getsource(Collector.step))
    lines = [ln for ln in src.splitlines() if "watchdog.beat(" not in ln]
    assert len(lines) == len(src.splitlines()) - 1, "Collector.step has no single watchdog.beat line"
    namespace: dict[str, object] = {}
    exec("\n".join(lines), vars(collector_module), namespace)  # noqa: S102 - our own source
    return namespace["step"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=200, help="interleaved A/B block pairs")
    p.add_argument("--block", type=int, default=100, help="vector steps per block")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = Config(env_id=args.env, num_envs_per_rank=args.num_envs)
    info = envs.inspect_env(cfg.env_id)
    col = Collector(cfg, info, rank=0)
    net = model.build(info.obs_shape, info.n_actions, cfg.hidden_sizes, False)

    def greedy(obs):
        with torch.no_grad():
            return net(torch.from_numpy(obs)).argmax(dim=1).numpy()

    plain = step_without_beat().__get__(col)
    per_call = min(timeit.repeat(lambda: watchdog.beat("env step"), number=100_000, repeat=5)) / 100_000
    print(f"beat() alone: {per_call * 1e9:.0f} ns per call")
    for eps in (1.0, 0.05):
        times: dict[str, list[float]] = {"with beat": [], "without": []}
        for _ in range(3):  # warm-up
            col.step(greedy, eps)
            plain(greedy, eps)
        for _ in range(args.rounds):
            for name, fn in (("with beat", col.step), ("without", plain)):
                t0 = time.perf_counter()
                for _ in range(args.block):
                    fn(greedy, eps)
                times[name].append((time.perf_counter() - t0) / args.block)
        for stat in (min, statistics.median):
            a, b = stat(times["with beat"]), stat(times["without"])
            print(
                f"eps {eps:4.2f}, {stat.__name__:6} block: Collector.step {a * 1e6:7.2f} us with beat, "
                f"{b * 1e6:7.2f} us without; ratio {a / b:.4f} ({(a - b) * 1e9:+.0f} ns per vector step)"
            )
    col.close()


if __name__ == "__main__":
    main()
