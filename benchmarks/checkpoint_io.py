"""Checkpoint write throughput against a raw sequential write of the same bytes, same run.

Run under MPI (every rank fills a replay shard; rank 0 writes the checkpoint):

    launch/mpirun.sh -np 2 -- python benchmarks/checkpoint_io.py --gib 1.0 [--repeats 3] [--quick]

Each rank fills a uint8 frame-stack replay (4x84x84, like Atari) with synthetic frames
(a static background and moving blocks, so compression sees realistic redundancy) until the
replay bytes of all ranks add up to --gib. Figures: bytes of replay / seconds, for
checkpoint.save (gather over MPI in 32 MiB chunks + chunked lzf HDF5 + checksums + fsync +
rename) and for a plain sequential write of the same number of bytes by rank 0 (np.tofile +
fsync), taken alternately; the median of each.

What the checksums cost (mpirl.integrity), in the same run: each rank encodes its shard into
LZF chunks with and without hashing them (SHA-256, alternately), and rank 0 times
``checkpoint.verify`` of the written file against reading every dataset back (what a restore
reads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

from mpirl import checkpoint, dist, replay, shards  # noqa: E402
from mpirl.records import CheckpointHeader, Counters  # noqa: E402


def synthetic_frames(n: int, rng: np.random.Generator) -> np.ndarray:
    """n stacks of 4 84x84 uint8 frames: a fixed background plus a few moving blocks."""
    background = (rng.integers(0, 64, size=(84, 84)) // 16 * 16).astype(np.uint8)
    out = np.broadcast_to(background, (n, 4, 84, 84)).copy()
    xs = rng.integers(0, 76, size=(n, 3))
    ys = rng.integers(0, 76, size=(n, 3))
    for k in range(3):
        for f in range(4):
            for i in range(n):
                x, y = xs[i, k] + f, ys[i, k]
                out[i, f, y : y + 8, x : x + 4] = 200
    return out


def _read_all(obj: object) -> None:
    """Read a dataset whole (None keeps h5py's visititems going)."""
    if isinstance(obj, h5py.Dataset):
        obj[()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="replay bytes over all ranks, GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="", help="where to write (default: a temp dir under the repo)")
    ap.add_argument("--json", default="")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 GiB, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.gib, args.repeats = 0.1, 1
    ctx = dist.init("cpu", 0)
    shape = (4, 84, 84)
    per_transition = 2 * int(np.prod(shape)) + 8 + 4 + 1 + 1
    n = int(args.gib * 2**30 / per_transition / ctx.size)
    rng = np.random.default_rng(ctx.rank)
    buf = replay.ReplayBuffer(n, shape, np.dtype(np.uint8), 0.99)
    block = 2048
    for start in range(0, n, block):
        k = min(block, n - start)
        frames = synthetic_frames(k + 1, rng)
        t = replay.Transitions(
            obs=frames[:-1], actions=rng.integers(0, 6, k), rewards=rng.random(k, np.float32),
            next_obs=frames[1:], steps=np.ones(k, np.uint8), terminated=np.zeros(k, bool), truncated=np.zeros(k, bool),
        )  # fmt: skip
        buf.add(t)
    shard = checkpoint.RankShard(meta={"replay": buf.state()}, replay=buf.export_arrays(), env_state=b"")
    total = int(dist.allreduce_sum(np.array([buf.nbytes]), name="bench.bytes")[0])
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters())
    header = CheckpointHeader(0, 0, "synthetic", list(shape), 6, {}, Counters(steps_per_iter=1))
    base = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runs")
    os.makedirs(base, exist_ok=True)
    ckpt_s, raw_s, sizes, plain_s, hashed_s, verify_s, read_s = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=base, prefix="ckpt-bench-") as tmp:
        tmp = dist.broadcast_object(tmp, name="bench.dir")
        raw = np.zeros(0, dtype=np.uint8)
        if ctx.rank == 0:
            raw = np.random.default_rng(9).integers(0, 255, size=total, dtype=np.uint8)
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            header.global_env_steps = rep
            path, err = checkpoint.save(tmp, ctx, header, net, net, opt, shard, keep=1)
            ckpt_s.append(time.perf_counter() - t0)
            assert path, err
            for digests, into in ((None, plain_s), ({}, hashed_s)):  # LZF encoding alone, then with SHA-256
                t0 = time.perf_counter()
                for _ in shards.encoded_chunks(shard.replay, digests):
                    pass
                into.append(time.perf_counter() - t0)
            if ctx.rank == 0:
                sizes.append(os.path.getsize(path))
                t0 = time.perf_counter()
                checkpoint.verify(path)
                verify_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with h5py.File(path, "r") as f:
                    f.visititems(lambda _, o: _read_all(o))
                read_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                raw_path = os.path.join(tmp, "raw.bin")
                with open(raw_path, "wb") as fh:
                    raw.tofile(fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                raw_s.append(time.perf_counter() - t0)
                os.remove(raw_path)
            dist.allreduce_sum(np.zeros(1), name="bench.sync")
    if ctx.rank == 0:
        c, r = statistics.median(ckpt_s), statistics.median(raw_s)
        result = {
            "machine": machine(), "ranks": ctx.size, "replay_bytes": total, "file_bytes": statistics.median(sizes),
            "checkpoint_s": c, "raw_write_s": r, "checkpoint_MBps": total / c / 1e6, "raw_MBps": total / r / 1e6,
            "ratio": r / c, "all_checkpoint_s": ckpt_s, "all_raw_s": raw_s,
            "encode_s": statistics.median(plain_s), "encode_and_hash_s": statistics.median(hashed_s),
            "hash_cost": statistics.median(hashed_s) / statistics.median(plain_s) - 1,
            "verify_s": statistics.median(verify_s), "read_back_s": statistics.median(read_s),
        }  # fmt: skip
        print(f"machine: {machine()}")
        print(f"replay {total / 2**30:.2f} GiB over {ctx.size} ranks -> file {result['file_bytes'] / 2**30:.2f} GiB")
        print(f"checkpoint.save: {c:.2f} s ({result['checkpoint_MBps']:.0f} MB/s of replay); raw sequential write "
              f"of the same bytes: {r:.2f} s ({result['raw_MBps']:.0f} MB/s); ratio {r / c:.2f}x")  # fmt: skip
        print(f"rank 0's LZF encoding of its shard: {result['encode_s']:.2f} s, with SHA-256 of the chunks "
              f"{result['encode_and_hash_s']:.2f} s (+{100 * result['hash_cost']:.0f}%); checkpoint.verify "
              f"{result['verify_s']:.2f} s vs reading every dataset back {result['read_back_s']:.2f} s")  # fmt: skip
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
