"""Replay memory per rank: bytes a replay buffer allocates, against the raw bytes of what it stores.

    .venv/bin/python benchmarks/memory.py [--json benchmarks/results/memory.json] [--quick]

For each case (a buffer type with an observation layout) one fresh process builds the buffer
at the case's capacity (1,000,000 transitions; ``--quick``: a tenth), fills every slot, and
reports:
- ``buffer.nbytes`` (what mpirl counts) and every numpy array reachable from the buffer's
  attributes (``tree.sum``, ``inner.obs``, ``frames``, ...), so index structures count too;
- resident memory (VmRSS) growth after construction and after the fill: ``np.zeros`` pages
  are only backed once written, so the fill touches them all (a process per case, so that
  memory freed by one case cannot be reused by the next);
- the raw bytes: the least a transition's information takes in whole bytes, field by field
  (the "why" column says how it is counted). Stored bytes above raw are listed as findings.

Each rank holds its own buffer, so these are figures per rank; a job holds world size times them.
A new case is one more ``Case`` in ``CASES``: a name, how to build the buffer for a capacity,
how to fill it, and its raw bytes per field (keyed by the array's attribute path).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QUICK_RESULTS, RESULTS, machine, rss_mib, write_json  # noqa: E402

from mpirl import frame_replay, replay  # noqa: E402

MiB = 2**20
CHUNK = 65_536  # transitions per add(): keeps the fill's temporaries to a few MiB


@dataclass(frozen=True)
class Case:
    """One buffer to measure. ``raw`` maps an array's attribute path (as ``array_bytes`` names
    it) to (raw bytes per transition, why); arrays without an entry count as 0 raw bytes."""

    name: str
    make_buffer: Callable[[int], Any]  # capacity -> empty buffer
    fill: Callable[[Any, int, np.random.Generator], None]  # write `capacity` transitions
    raw: dict[str, tuple[int, str]]
    capacity: int = 1_000_000
    note: str = ""


# --- CartPole-v1: obs (4,) float32, 2 actions ---------------------------------------------
CARTPOLE_OBS = (4,)
CARTPOLE_ACTIONS = 2
CARTPOLE_RAW: dict[str, tuple[int, str]] = {
    "obs": (16, "4 x float32, kept as the env gives them"),
    # next_obs is the obs n steps later of the same episode; storing every observation once
    # (what the frame-stack replay does for images) would save these 16 B, at the cost of an index.
    "next_obs": (16, "4 x float32 (the obs n steps later)"),
    "actions": (1, f"uint8 holds {CARTPOLE_ACTIONS} actions (1 bit of information)"),
    "rewards": (4, "float32 n-step discounted return"),
    "steps": (1, "uint8: k <= n_step"),
    "terminated": (1, "bool (1 bit; could share a byte with steps)"),
    "truncated": (1, "bool (1 bit; could share a byte with steps)"),
}


def cartpole_uniform(capacity: int) -> replay.ReplayBuffer:
    return replay.ReplayBuffer(capacity, CARTPOLE_OBS, np.dtype(np.float32), 0.99)


def cartpole_prioritized(capacity: int) -> replay.PrioritizedReplayBuffer:
    return replay.PrioritizedReplayBuffer(capacity, CARTPOLE_OBS, np.dtype(np.float32), 0.99)


def fill_cartpole(buf: replay.ReplayBuffer, capacity: int, rng: np.random.Generator) -> None:
    """Random CartPole-shaped transitions through ``add``, as training stores them."""
    for start in range(0, capacity, CHUNK):
        k = min(CHUNK, capacity - start)
        buf.add(replay.Transitions(
            obs=rng.standard_normal((k, *CARTPOLE_OBS), dtype=np.float32),
            actions=rng.integers(0, CARTPOLE_ACTIONS, k), rewards=rng.random(k, dtype=np.float32),
            next_obs=rng.standard_normal((k, *CARTPOLE_OBS), dtype=np.float32), steps=np.full(k, 3, np.uint8),
            terminated=rng.random(k) < 0.01, truncated=np.zeros(k, bool),
        ))  # fmt: skip


# --- Atari: (4, 84, 84) uint8 frame stacks, 6 actions ------------------------------------
ATARI_FRAME = (84, 84)
ATARI_RAW: dict[str, tuple[int, str]] = {
    "obs": (84 * 84, "one new 84x84 uint8 frame per env step: a stack repeats 3 frames of the previous one"),
    "next_obs": (0, "frames of later steps of the same episode"),
    "actions": (1, "uint8 holds 18 actions"),
    "rewards": (4, "float32 n-step discounted return"),
    "steps": (1, "uint8: k <= n_step"),
    "terminated": (1, "bool"),
    "truncated": (1, "bool"),
}
ATARI_ENVS, ATARI_EPISODE = 4, 1_000  # env shard per rank; steps per synthetic episode


def atari_frame_stack(capacity: int) -> frame_replay.FrameStackReplay:
    inner = replay.ReplayBuffer(capacity, (4,), np.dtype(np.int64), 0.99)
    return frame_replay.FrameStackReplay(inner, ATARI_FRAME, ATARI_ENVS, n_step=3)


def atari_naive(capacity: int) -> replay.ReplayBuffer:
    return replay.ReplayBuffer(capacity, (4, *ATARI_FRAME), np.dtype(np.uint8), 0.99)


def fill_atari(buf: Any, capacity: int, rng: np.random.Generator) -> None:
    """A stream of frame stacks as the env shard gives them (one new frame per step, a reset
    stack of 4 equal frames every ATARI_EPISODE steps), stored as 1-step transitions."""
    frames = rng.integers(0, 256, size=(64, *ATARI_FRAME), dtype=np.uint8)  # reused: content is irrelevant
    stacks = np.repeat(frames[:1][None], ATARI_ENVS, axis=0).repeat(4, axis=1)
    encode = buf.encode_obs if isinstance(buf, frame_replay.FrameStackReplay) else (lambda o: o.copy())
    keys = encode(stacks)
    ones = np.ones(ATARI_ENVS, np.uint8)
    no = np.zeros(ATARI_ENVS, bool)
    for t in range(capacity // ATARI_ENVS):
        if (t + 1) % ATARI_EPISODE == 0:  # reset stacks: the first frame four times
            stacks[:] = frames[t % 64][None, None]
        else:
            stacks[:, :-1] = stacks[:, 1:]
            stacks[:, -1] = frames[(t + np.arange(ATARI_ENVS)) % 64]
        nxt = encode(stacks)
        buf.add(replay.Transitions(obs=keys, actions=rng.integers(0, 6, ATARI_ENVS), rewards=np.zeros(ATARI_ENVS,
                np.float32), next_obs=nxt, steps=ones, terminated=no, truncated=no))  # fmt: skip
        keys = nxt


CASES: list[Case] = [
    Case("CartPole-v1, uniform", cartpole_uniform, fill_cartpole, CARTPOLE_RAW),
    Case(
        "CartPole-v1, prioritized",
        cartpole_prioritized,
        fill_cartpole,
        {
            **CARTPOLE_RAW,
            "tree.sum": (4, "one float32 priority per transition (the tree's leaves); inner nodes are an index"),
            "tree.min": (0, "derived from the priorities"),
        },
        note="sum and min trees: 2 x 2P float64 nodes, P = capacity rounded up to a power of two",
    ),  # fmt: skip
    Case("Atari (4, 84, 84), frame-stack replay", lambda c: atari_frame_stack(c), lambda b, c, r: fill_atari(b, c, r),
         {"frames": ATARI_RAW["obs"], **{f"inner.{k}": v for k, v in ATARI_RAW.items() if k != "obs"},
          "inner.obs": (0, "4 frame references (an index)"), "inner.next_obs": (0, "4 frame references (an index)")},
         note="frames stored once in a ring 1/8 larger than the capacity; transitions hold int64 references"),
    # The naive layout of 1M Atari transitions (52.6 GiB) does not fit this machine: measured at
    # 100,000 and reported per transition (it is linear in the capacity).
    Case("Atari (4, 84, 84), naive layout", lambda c: atari_naive(c), lambda b, c, r: fill_atari(b, c, r), ATARI_RAW,
         capacity=100_000, note="obs and next_obs as full uint8 stacks: each frame stored 2 x 4 times"),
]  # fmt: skip


def array_bytes(obj: Any, prefix: str = "", seen: Optional[set[int]] = None) -> dict[str, np.ndarray]:
    """Every numpy array reachable through the attributes of ``obj`` (objects nested in
    attributes included, e.g. a PER buffer's ``tree``), by attribute path, each counted once."""
    seen = set() if seen is None else seen
    out: dict[str, np.ndarray] = {}
    for name, value in vars(obj).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, np.ndarray):
            if value.base is None or not isinstance(value.base, np.ndarray):  # views own no memory
                out[prefix + name] = value
        elif hasattr(value, "__dict__") and not isinstance(value, (type, np.random.Generator)):
            out.update(array_bytes(value, f"{prefix}{name}.", seen))
    return out


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so that RSS shows live data rather than
    the allocator's slack from the fill's temporaries."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes some slack
        pass


def measure(case: Case, capacity: int) -> dict[str, Any]:
    """Build, fill and measure ``case`` at ``capacity`` transitions (run it in a fresh process)."""
    rng = np.random.default_rng(0)
    _trim_heap()
    rss0 = rss_mib()
    buf = case.make_buffer(capacity)
    rss_built = rss_mib()
    case.fill(buf, capacity, rng)
    _trim_heap()
    rss_filled = rss_mib()
    arrays = array_bytes(buf)
    allocated = sum(a.nbytes for a in arrays.values())
    raw = sum(b for b, _ in case.raw.values()) * capacity
    fields: list[dict[str, Any]] = []
    for path in sorted(set(arrays) | set(case.raw)):
        a = arrays.get(path)
        raw_b, why = case.raw.get(path, (0, "not information (index or scratch)"))
        fields.append({
            "field": path, "dtype": None if a is None else str(a.dtype),
            "shape": None if a is None else list(a.shape), "bytes": 0 if a is None else a.nbytes,
            "stored_per_transition": 0.0 if a is None else a.nbytes / capacity, "raw_per_transition": raw_b, "why": why,
        })  # fmt: skip
    findings = [
        f"{f['field']}: {f['dtype']} stores {f['stored_per_transition']:.2f} B per transition where "
        f"{f['raw_per_transition']} B would do ({f['why']}): "
        f"{(f['stored_per_transition'] - f['raw_per_transition']) * capacity / MiB:.1f} MiB at this capacity"
        for f in fields
        if f["stored_per_transition"] > f["raw_per_transition"]
    ]
    return {
        "case": case.name, "capacity": capacity, "note": case.note, "buffer_nbytes": int(buf.nbytes),
        "allocated_bytes": int(allocated), "raw_bytes": int(raw), "allocated_per_transition": allocated / capacity,
        "raw_per_transition": raw / capacity, "overhead": allocated / raw,
        "rss_after_construction_mib": rss_built - rss0, "rss_after_fill_mib": rss_filled - rss0,
        "fields": fields, "findings": findings,
    }  # fmt: skip


def _measure_by_name(name: str, capacity: int) -> dict[str, Any]:
    # Runs in a spawned child: it rebuilds CASES on import and looks the case up by name.
    return measure(next(c for c in CASES if c.name == name), capacity)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of each case's capacity")
    ap.add_argument("--json", default=None, help="default: <results>/memory.json; '' to skip")
    args = ap.parse_args()
    if args.json is None:  # smoke figures never land in benchmarks/results
        args.json = os.path.join(QUICK_RESULTS if args.quick else RESULTS, "memory.json")
    results = []
    for case in CASES:
        capacity = case.capacity // 10 if args.quick else case.capacity
        # A fresh process per case: RSS growth then counts this buffer alone.
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            results.append(pool.submit(_measure_by_name, case.name, capacity).result())

    print(f"machine: {machine()}; figures per rank")
    print("| case | transitions | buffer.nbytes | all arrays | RSS after construction / after fill | "
          "raw | B per transition, stored / raw | stored vs raw |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['case']} | {r['capacity']:,} | {r['buffer_nbytes'] / MiB:,.1f} MiB | "
              f"{r['allocated_bytes'] / MiB:,.1f} MiB | {r['rss_after_construction_mib']:,.1f} / "
              f"{r['rss_after_fill_mib']:,.1f} MiB | {r['raw_bytes'] / MiB:,.1f} MiB | "
              f"{r['allocated_per_transition']:.1f} / {r['raw_per_transition']:.1f} | "
              f"{r['overhead']:.2f}x |")  # fmt: skip
    print()
    print("| case | field | dtype | stored B per transition | raw B per transition | raw counted as |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        for f in r["fields"]:
            print(f"| {r['case']} | {f['field']} | {f['dtype'] or '-'} | {f['stored_per_transition']:.2f} | "
                  f"{f['raw_per_transition']} | {f['why']} |")  # fmt: skip
    for r in results:
        for line in r["findings"]:
            print(f"finding ({r['case']}): {line}")
    if args.json:
        write_json(args.json, {"machine": machine(), "quick": args.quick, "results": results})


if __name__ == "__main__":
    main()
