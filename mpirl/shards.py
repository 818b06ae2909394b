"""Every rank's replay shard, streamed to and from rank 0 in bounded chunks.

A checkpoint holds every rank's replay, yet rank 0 alone touches the file. Saving, each rank
LZF-compresses its own arrays into ready-to-store HDF5 chunks (in parallel) and sends them in
messages of about ``CHUNK_BYTES``, at most one in flight (synchronous sends); rank 0 stores
them as they come, round-robin over the ranks. Restoring, rank 0 reads each rank's share
(``shard_plan``: the same shard at the same world size, else redistributed) and sends it the
same way. Rank 0's extra memory is about one message per rank, whatever the world size or
buffer size. Point-to-point messages only, through mpirl.dist (tagged ``# MPI:``).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Optional

import h5py
import numpy as np

from mpirl import dist, integrity

try:  # LZF in-process, so each rank compresses its own chunks (see _encoded_chunks)
    import lzf as _lzf
except ImportError:  # pragma: no cover - python-lzf is a dependency; stay readable without it
    _lzf = None

CHUNK_BYTES = 32 << 20  # streaming message size; also bounds rank 0's extra memory
Chunk = tuple[str, int, int, bytes]  # (field, first row, HDF5 filter mask, stored bytes)


def chunk_rows(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Rows per HDF5 chunk: about 1 MiB per chunk."""
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    return int(max(1, min(max(shape[0], 1), (1 << 20) // row_bytes)))


def encoded_chunks(
    arrays: dict[str, Any], digests: Optional[dict[str, str]] = None
) -> Iterator[list[tuple[str, int, int, bytes]]]:
    """This rank's arrays as ready-to-store HDF5 chunks, LZF-compressed here (so every rank
    compresses its own shard, in parallel), in messages of about CHUNK_BYTES raw bytes:
    lists of (name, first_row, filter_mask, data). A chunk LZF cannot shrink is stored raw
    with filter-mask bit 0 set, as HDF5's optional filters do; without python-lzf every chunk
    is stored raw that way (readable by plain h5py either way). Each array's checksum over
    its stored chunks (``integrity.ChunkHasher``) goes into ``digests`` once it is encoded."""
    batch: list[tuple[str, int, int, bytes]] = []
    size = 0
    for name, a in arrays.items():
        n = len(a)
        hasher = integrity.ChunkHasher()
        rows = chunk_rows(tuple(a.shape), np.dtype(a.dtype))
        for start in range(0, n, rows):
            block = np.ascontiguousarray(a[start : start + rows])
            if len(block) < rows:  # HDF5 stores whole chunks; the part past the extent is ignored
                pad = np.zeros((rows - len(block), *block.shape[1:]), dtype=block.dtype)
                block = np.concatenate([block, pad])
            raw = block.tobytes()
            packed = _lzf.compress(raw) if _lzf is not None else None
            chunk = (name, start, 0, packed) if packed else (name, start, 1, raw)
            if digests is not None:
                hasher.update(start, chunk[2], chunk[3])
            batch.append(chunk)
            size += len(raw)
            if size >= CHUNK_BYTES:
                yield batch
                batch, size = [], 0
        if digests is not None:
            digests[name] = hasher.digest()
    if batch:
        yield batch


def send_to_root(arrays: dict[str, Any]) -> None:
    """A rank other than 0: send its arrays' compressed chunks to rank 0, then the end mark,
    which carries the checksum of each array's chunks (a dict: field -> digest)."""
    digests: dict[str, str] = {}
    for msg in encoded_chunks(arrays, digests):
        dist.send_object(0, msg)  # MPI: compressed chunks -> rank 0 (blocks until received)
    dist.send_object(0, digests)  # MPI: end of this rank's shard, with its checksums


def receive_into(
    datasets: dict[tuple[int, str], h5py.Dataset],
    own: Iterator[list[Chunk]],
    own_digests: dict[str, str],
    world_size: int,
    error: str,
    path: str,
) -> tuple[str, dict[tuple[int, str], str]]:
    """Rank 0: store every rank's chunks (its own from ``own``, whose checksums fill
    ``own_digests``) into ``datasets`` by (rank, field), round-robin, one message per rank in
    turn: every rank compresses its next message while rank 0 stores the others'. After an
    error (the one given, or a failed write) it only drains, so no sender blocks. Returns the
    first error ("" if none) and every rank's chunk checksums by (rank, field)."""
    active = list(range(world_size))
    digests: dict[tuple[int, str], str] = {}
    while active:
        for r in list(active):
            msg = next(own, own_digests) if r == 0 else dist.recv_object(r)  # MPI: receive (p2p)
            if isinstance(msg, dict):  # the end mark, with the sender's checksums
                active.remove(r)
                digests.update({(r, k): v for k, v in msg.items()})
            elif not error:
                try:
                    for key, start, mask, data in msg:
                        ds = datasets[(r, key)]
                        ds.id.write_direct_chunk((start,) + (0,) * (ds.ndim - 1), data, mask)
                except Exception as exc:
                    error = f"checkpoint {path}: {type(exc).__name__}: {exc}"
    return error, digests


def shard_plan(old_rows: list[int], new_size: int) -> list[list[tuple[int, int, int]]]:
    """Which rows of which old shard each new rank takes: a list per new rank of
    (old_rank, start, stop) in slot-order rows. Same size: shard r -> rank r. Fewer new
    ranks: old shard i -> new rank i % new_size. More: each old shard is split evenly among
    the new ranks r' with r' % old_size == i."""
    old_size = len(old_rows)
    plan: list[list[tuple[int, int, int]]] = [[] for _ in range(new_size)]
    if new_size <= old_size:
        for i, n in enumerate(old_rows):
            plan[i % new_size].append((i, 0, n))
        return plan
    for i, n in enumerate(old_rows):
        takers = [r for r in range(new_size) if r % old_size == i]
        bounds = np.linspace(0, n, len(takers) + 1).astype(int)
        for r, lo, hi in zip(takers, bounds[:-1], bounds[1:]):
            plan[r].append((i, int(lo), int(hi)))
    return plan


def restore(
    f: h5py.File | None,
    ctx: dist.DistContext,
    old_rows: list[int],
    begin: Callable[[int, list[dict[str, Any]]], None],
    rows: Callable[[str, int, np.ndarray], None],
) -> None:
    """Collective over point-to-point messages: every rank receives its share of the saved
    shards (see ``shard_plan``), chunk by chunk. ``begin(total_rows, metas)`` is called first
    on each rank with the metas of the old shards it takes; then ``rows(field, first_row,
    chunk)`` for each chunk (env_state is delivered as field 'env_state' when the world size is
    unchanged). ``f``: the open checkpoint on rank 0, None elsewhere. Same messages as a save
    uses, the other way round: at most one of about CHUNK_BYTES in flight per rank."""
    if ctx.rank != 0:
        deliver(iter(lambda: dist.recv_object(0), None), begin, rows)  # MPI: until None
        return
    assert f is not None
    plan = shard_plan(old_rows, ctx.size)
    same = len(old_rows) == ctx.size
    for r in range(ctx.size):
        messages = shard_messages(f, plan[r], same)
        if r == 0:
            deliver(messages, begin, rows)
        else:
            for msg in messages:
                dist.send_object(r, msg)  # MPI: header, then chunk batches
            dist.send_object(r, None)


def shard_messages(f: h5py.File, pieces: list[tuple[int, int, int]], same: bool) -> Iterator[Any]:
    """Rank 0: a header ``(total_rows, metas)``, then batches of ``(field, first_row, rows)``
    of about CHUNK_BYTES, read lazily from the file (rows of ``pieces``, numbered from 0)."""
    # first_piece: an old shard split over several new ranks is taken by each; only the first
    # counts its episodes (the run's episode count survives a change of world size).
    metas = [{**json.loads(f["ranks"][str(i)].attrs["meta"]), "first_piece": lo == 0} for i, lo, _ in pieces]
    yield sum(hi - lo for _, lo, hi in pieces), metas
    batch: list[tuple[str, int, np.ndarray]] = []
    size, offset = 0, 0
    for i, lo, hi in pieces:
        g = f["ranks"][str(i)]
        # A whole shard (same world size) is sent whole: fields may have other row counts
        # than the transitions (a frame-stack replay's frame ring).
        sources = [(k, ds, *((0, ds.shape[0]) if same else (lo, hi)), offset) for k, ds in g["replay"].items()]
        if same and "env_state" in g:
            sources.append(("env_state", g["env_state"], 0, g["env_state"].shape[0], 0))
        for key, ds, a, b, base in sources:
            row_bytes = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
            step = max(1, CHUNK_BYTES // row_bytes)
            for start in range(a, b, step):
                chunk = ds[start : min(start + step, b)]
                batch.append((key, base + start - a, chunk))
                size += chunk.nbytes
                if size >= CHUNK_BYTES:
                    yield batch
                    batch, size = [], 0
        offset += hi - lo
    if batch:
        yield batch


def deliver(
    messages: Iterator[Any],
    begin: Callable[[int, list[dict[str, Any]]], None],
    rows: Callable[[str, int, np.ndarray], None],
) -> None:
    total, metas = next(messages)
    begin(total, metas)
    for batch in messages:
        for key, first_row, chunk in batch:
            rows(key, first_row, chunk)
