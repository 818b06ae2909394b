"""Checkpoints in HDF5: the only module that imports h5py.

One file holds a whole job at one step: online and target weights, optimizer state, every
counter, the config, versions, and each rank's shard (replay arrays, RNG states, env state).
Layout (``schema_version`` 1; see README "Checkpoint layout"):

    /                      attrs: format, schema_version, world_size, global_env_steps,
                                  updates, env_id, obs_shape, n_actions, versions (JSON),
                                  config (JSON), counters (JSON), created
    /model/online/<name>   parameters and buffers of the online network
    /model/target/<name>   same for the target network
    /optimizer/state/<i>/<key>   per-parameter optimizer tensors; attrs: param_groups (JSON)
    /ranks/<r>/            attrs: meta (JSON: replay ring state, numpy RNG state, counters)
    /ranks/<r>/replay/<field>    obs, actions, rewards, next_obs, steps, terminated
                                 (+ priorities), slot order, chunked + lzf-compressed
    /ranks/<r>/env_state   pickled env shard state (uint8), when the envs could be pickled

Writes are atomic: rank 0 writes ``<name>.tmp``, fsyncs, renames, fsyncs the folder, then
points ``latest`` at it the same way, so a crash at any moment leaves the previous checkpoint
whole. Every rank LZF-compresses its own shard into HDF5 chunks and streams them to rank 0 in
messages of about ``CHUNK_BYTES``, which rank 0 stores as they come (round-robin over the ranks):
rank 0's memory does not grow with world size x buffer size, and compression runs in parallel.

Loading uses pickle for the env state: load only checkpoints you trust.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import h5py
import numpy as np
import torch

from mpirl import dist

try:  # LZF in-process, so each rank compresses its own chunks (see _encoded_chunks)
    import lzf as _lzf
except ImportError:  # pragma: no cover - python-lzf is a dependency; stay readable without it
    _lzf = None

FORMAT = "mpirl-checkpoint"
SCHEMA_VERSION = 1
CHUNK_BYTES = 32 << 20  # shard streaming chunk; also bounds rank 0's extra memory
SPACE_MARGIN = 256 << 10  # HDF5 metadata and chunk-index overhead beyond the raw bytes (+2%)
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class RankShard:
    """What one rank contributes: replay arrays (1-D or more, first axis = rows), and a small
    JSON-able ``meta`` (ring state, RNG state, local counters). ``env_state`` may be empty."""

    meta: dict[str, Any]
    replay: dict[str, np.ndarray]
    env_state: bytes


def versions() -> dict[str, str]:
    import gymnasium

    import mpirl

    out = {"mpirl": mpirl.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "gymnasium": gymnasium.__version__, "h5py": h5py.__version__}  # fmt: skip
    try:
        import horovod

        out["horovod"] = horovod.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def _fsync(path: str) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(path) or ".")


def _write_module(group: h5py.Group, module: torch.nn.Module) -> None:
    for name, t in module.state_dict().items():
        group.create_dataset(name, data=t.detach().cpu().numpy())


def _write_optimizer(group: h5py.Group, optimizer: Any) -> None:
    sd = optimizer.state_dict()
    group.attrs["param_groups"] = json.dumps(sd["param_groups"])
    state = group.create_group("state")
    for idx, entry in sd["state"].items():
        g = state.create_group(str(idx))
        for key, value in entry.items():
            if torch.is_tensor(value):
                g.create_dataset(key, data=value.detach().cpu().numpy())
            else:
                g.attrs[key] = value


def _chunk_rows(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Rows per HDF5 chunk: about 1 MiB per chunk."""
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    return int(max(1, min(max(shape[0], 1), (1 << 20) // row_bytes)))


def _dataset_for(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
    if shape[0] == 0:
        return group.create_dataset(name, shape=shape, dtype=dtype)
    chunks = (_chunk_rows(shape, dtype), *shape[1:])
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression="lzf")


def _encoded_chunks(arrays: dict[str, Any]) -> Iterator[list[tuple[str, int, int, bytes]]]:
    """This rank's arrays as ready-to-store HDF5 chunks, LZF-compressed here (so every rank
    compresses its own shard, in parallel), in messages of about CHUNK_BYTES raw bytes:
    lists of (name, first_row, filter_mask, data). A chunk LZF cannot shrink is stored raw
    with filter-mask bit 0 set, as HDF5's optional filters do; without python-lzf every chunk
    is stored raw that way (readable by plain h5py either way)."""
    batch: list[tuple[str, int, int, bytes]] = []
    size = 0
    for name, a in arrays.items():
        n = len(a)
        if n == 0:
            continue
        rows = _chunk_rows(tuple(a.shape), np.dtype(a.dtype))
        for start in range(0, n, rows):
            block = np.ascontiguousarray(a[start : start + rows])
            if len(block) < rows:  # HDF5 stores whole chunks; the part past the extent is ignored
                pad = np.zeros((rows - len(block), *block.shape[1:]), dtype=block.dtype)
                block = np.concatenate([block, pad])
            raw = block.tobytes()
            packed = _lzf.compress(raw) if _lzf is not None else None
            batch.append((name, start, 0, packed) if packed else (name, start, 1, raw))
            size += len(raw)
            if size >= CHUNK_BYTES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def save(
    run_dir: str,
    ctx: dist.DistContext,
    header: dict[str, Any],
    online: torch.nn.Module,
    target: torch.nn.Module,
    optimizer: Any,
    shard: RankShard,
    keep: int,
) -> tuple[Optional[str], str]:
    """Collective: write one checkpoint of the whole job; returns (path, "") on success or
    (None, error message) on failure, identical on every rank. The previous checkpoints
    stay untouched on failure. ``header``: global JSON-able facts (counters, config, env)."""
    folder = checkpoint_dir(run_dir)
    name = f"step-{int(header['global_env_steps']):012d}.h5"
    path = os.path.join(folder, name)
    # Check the space first: HDF5 does not survive a write into a full disk (h5py can crash
    # on close after ENOSPC), so a checkpoint that may not fit is refused up front.
    local = sum(a.nbytes for a in shard.replay.values()) + len(shard.env_state)
    need = int(dist.allreduce_sum(np.array([local]), name="mpirl.checkpoint.bytes")[0])  # HVD
    need += sum(t.numel() * t.element_size() for t in online.state_dict().values()) * 4  # nets + Adam
    need = int(need * 1.02) + SPACE_MARGIN
    verdict = ""
    if ctx.rank == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            free = shutil.disk_usage(folder).free
            if free < need:
                verdict = (
                    f"checkpoint {path}: not enough free space ({free / 2**20:,.1f} MiB free, "
                    f"up to {need / 2**20:,.1f} MiB needed)"
                )
        except OSError as exc:
            verdict = f"checkpoint {path}: {exc.strerror or exc}"
    verdict = dist.broadcast_object(verdict, name="mpirl.checkpoint.go")  # HVD: go / no-go for all
    if verdict:
        return None, verdict
    arrays = {**shard.replay, "env_state": _bytes_array(shard.env_state)}
    specs = [(k, tuple(a.shape), np.dtype(a.dtype).str) for k, a in arrays.items()]
    metas = dist.gather_to_root((shard.meta, specs), name="mpirl.checkpoint.specs")  # MPI: gather (small)
    error = ""
    if ctx.rank == 0:
        tmp = path + ".tmp"
        f: Optional[h5py.File] = None
        datasets: dict[tuple[int, str], h5py.Dataset] = {}
        try:
            f = h5py.File(tmp, "w")
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["world_size"] = ctx.size
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
            f.attrs["versions"] = json.dumps(versions())
            for key in ("global_env_steps", "updates", "env_id"):
                f.attrs[key] = header[key]
            f.attrs["obs_shape"] = np.asarray(header["obs_shape"], dtype=np.int64)
            f.attrs["n_actions"] = header["n_actions"]
            f.attrs["config"] = json.dumps(header["config"])
            f.attrs["counters"] = json.dumps(header["counters"])
            _write_module(f.create_group("model/online"), online)
            _write_module(f.create_group("model/target"), target)
            _write_optimizer(f.create_group("optimizer"), optimizer)
            for r, (meta, rank_specs) in enumerate(metas):
                g = f.create_group(f"ranks/{r}")
                g.attrs["meta"] = json.dumps(meta)
                rg = g.create_group("replay")
                for key, shape, dtype in rank_specs:
                    datasets[(r, key)] = _dataset_for(g if key == "env_state" else rg, key, shape, np.dtype(dtype))
        except Exception as exc:  # keep receiving below, or the other ranks would block forever
            error = f"checkpoint {path}: {type(exc).__name__}: {exc}"
        # Round-robin over the ranks, one message each in turn (rank 0's own included): every
        # rank compresses its next message while rank 0 stores the others'.
        own = _encoded_chunks(arrays)
        active = list(range(ctx.size))
        while active:
            for r in list(active):
                msg = next(own, None) if r == 0 else dist.recv_object(r)  # MPI: receive (p2p)
                if msg is None:
                    active.remove(r)
                    continue
                if error:
                    continue  # drain, so no sender blocks
                try:
                    for key, start, mask, data in msg:
                        ds = datasets[(r, key)]
                        ds.id.write_direct_chunk((start,) + (0,) * (ds.ndim - 1), data, mask)
                except Exception as exc:
                    error = f"checkpoint {path}: {type(exc).__name__}: {exc}"
        try:
            if f is not None:
                f.close()  # flushes: a full disk may only show here
        except Exception as exc:
            error = error or f"checkpoint {path}: {type(exc).__name__}: {exc}"
        if not error:
            try:
                _fsync(tmp)
                os.replace(tmp, path)
                _fsync(folder)
                _write_text_atomic(os.path.join(folder, LATEST), name + "\n")
                _prune(folder, keep)
            except Exception as exc:
                error = f"checkpoint {path}: {type(exc).__name__}: {exc}"
        if error and os.path.exists(tmp):
            try:
                os.remove(tmp)  # never leave a half-written file behind
            except OSError:
                pass
    else:
        for msg in _encoded_chunks(arrays):
            dist.send_object(0, msg)  # MPI: compressed chunks -> rank 0 (blocks until received)
        dist.send_object(0, None)
    ok_path, err = dist.broadcast_object(  # HVD: everyone learns whether it worked
        (path if not error else None, error), name="mpirl.checkpoint.status"
    )
    return ok_path, err


def _bytes_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).copy() if data else np.zeros(0, dtype=np.uint8)


def _prune(folder: str, keep: int) -> None:
    if keep <= 0:
        return
    files = sorted(n for n in os.listdir(folder) if n.startswith("step-") and n.endswith(".h5"))
    for old in files[:-keep]:
        os.remove(os.path.join(folder, old))


def latest(run_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint of a run directory, or None."""
    folder = checkpoint_dir(run_dir)
    pointer = os.path.join(folder, LATEST)
    try:
        with open(pointer, encoding="utf-8") as fh:
            name = fh.read().strip()
        if name and os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    except OSError:
        pass
    # No (or a stale) pointer: fall back to the newest file that is not a temporary one.
    try:
        files = sorted(n for n in os.listdir(folder) if n.startswith("step-") and n.endswith(".h5"))
    except OSError:
        return None
    return os.path.join(folder, files[-1]) if files else None


# --- reading --------------------------------------------------------------------------


def resolve(path: str) -> str:
    """A checkpoint file as given, or a run directory's latest checkpoint; CheckpointError if none."""
    if os.path.isdir(path):
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        return found
    return path


def open_checked(path: str) -> h5py.File:
    """Open a checkpoint read-only and check it is one; CheckpointError otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable HDF5 file (truncated or corrupted?): {exc}") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CheckpointError(f"{path} is an HDF5 file but not an mpirl checkpoint")
    version = int(f.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION or version < 1:
        f.close()
        raise CheckpointError(f"{path} has schema version {version}; this mpirl reads 1..{SCHEMA_VERSION}")
    for key in ("model/online", "model/target", "optimizer", "ranks/0"):
        if key not in f:
            f.close()
            raise CheckpointError(f"{path} lacks /{key} (incomplete checkpoint)")
    return f


def summary(path: str) -> dict[str, Any]:
    """A checkpoint's facts, for ``python -m mpirl.inspect``."""
    with open_checked(path) as f:
        out: dict[str, Any] = {k: _attr(f.attrs[k]) for k in f.attrs}
        for key in ("config", "counters", "versions"):
            out[key] = json.loads(out[key])
        shards = []
        for r in sorted(f["ranks"], key=int):
            g = f["ranks"][r]
            meta = json.loads(g.attrs["meta"])
            rep = g["replay"]
            stored = sum(ds.id.get_storage_size() for ds in rep.values())
            raw = sum(ds.size * ds.dtype.itemsize for ds in rep.values())
            shards.append({"rank": int(r), "transitions": int(rep["actions"].shape[0]),
                           "fields": {k: [list(ds.shape), str(ds.dtype)] for k, ds in rep.items()},
                           "raw_bytes": int(raw), "stored_bytes": int(stored),
                           "env_state_bytes": int(g["env_state"].shape[0]) if "env_state" in g else 0,
                           "replay_state": meta.get("replay", {})})  # fmt: skip
        out["shards"] = shards
        out["file_bytes"] = os.path.getsize(path)
    return out


def _attr(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v


def read_header(path: str) -> dict[str, Any]:
    """Global facts of a checkpoint (small); CheckpointError if it is not a usable one."""
    with open_checked(path) as f:
        return {
            "path": path,
            "world_size": int(f.attrs["world_size"]),
            "global_env_steps": int(f.attrs["global_env_steps"]),
            "updates": int(f.attrs["updates"]),
            "env_id": str(_attr(f.attrs["env_id"])),
            "obs_shape": [int(x) for x in f.attrs["obs_shape"]],
            "n_actions": int(f.attrs["n_actions"]),
            "config": json.loads(f.attrs["config"]),
            "counters": json.loads(f.attrs["counters"]),
            "versions": json.loads(f.attrs["versions"]),
            "optimizer_has_state": len(f["optimizer/state"]) > 0,
            "shard_rows": [int(f["ranks"][r]["replay"]["actions"].shape[0]) for r in sorted(f["ranks"], key=int)],
        }


def load_module(path: str, group: str, module: torch.nn.Module) -> None:
    """Load /model/<group> into ``module``; CheckpointError naming the mismatch otherwise."""
    with open_checked(path) as f:
        g = f["model"][group]
        expected = module.state_dict()
        missing = sorted(set(expected) - set(g))
        extra = sorted(set(g) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{path}: network mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        sd = {}
        for k, t in expected.items():
            arr = g[k][()]
            if tuple(arr.shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{path}: network mismatch at {k}: checkpoint {tuple(arr.shape)}, model {tuple(t.shape)}"
                )
            sd[k] = torch.from_numpy(np.asarray(arr))
        module.load_state_dict(sd)


def load_optimizer(path: str, optimizer: Any) -> None:
    with open_checked(path) as f:
        g = f["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for idx in g["state"]:
            entry: dict[str, Any] = {k: torch.from_numpy(np.asarray(ds[()])) for k, ds in g["state"][idx].items()}
            entry.update({k: _attr(v) for k, v in g["state"][idx].attrs.items()})
            state[int(idx)] = entry
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(g.attrs["param_groups"])})


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


def restore_shards(
    path: str,
    ctx: dist.DistContext,
    old_rows: list[int],
    begin: Callable[[int, list[dict[str, Any]]], None],
    rows: Callable[[str, int, np.ndarray], None],
) -> None:
    """Collective over point-to-point messages: every rank receives its share of the saved
    replay shards (see ``shard_plan``), chunk by chunk. ``begin(total_rows, metas)`` is called
    first on each rank with the metas of the old shards it takes; then ``rows(field,
    first_row, chunk)`` for each chunk (env_state is delivered as field 'env_state' when the
    world size is unchanged). Rank 0 reads the file; others never touch it. Same messages as
    ``save`` uses, the other way round: at most one of about CHUNK_BYTES in flight per rank."""
    if ctx.rank == 0:
        plan = shard_plan(old_rows, ctx.size)
        same = len(old_rows) == ctx.size
        with open_checked(path) as f:
            for r in range(ctx.size):
                messages = _shard_messages(f, plan[r], same)
                if r == 0:
                    _deliver(messages, begin, rows)
                else:
                    for msg in messages:
                        dist.send_object(r, msg)  # MPI: header, then chunk batches
                    dist.send_object(r, None)
    else:
        _deliver(iter(lambda: dist.recv_object(0), None), begin, rows)  # MPI: until None


def _shard_messages(f: h5py.File, pieces: list[tuple[int, int, int]], same: bool) -> Iterator[Any]:
    """Rank 0: a header ``(total_rows, metas)``, then batches of ``(field, first_row, rows)``
    of about CHUNK_BYTES, read lazily from the file (rows of ``pieces``, numbered from 0)."""
    metas = [json.loads(f["ranks"][str(i)].attrs["meta"]) for i, _, _ in pieces]
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


def _deliver(
    messages: Iterator[Any],
    begin: Callable[[int, list[dict[str, Any]]], None],
    rows: Callable[[str, int, np.ndarray], None],
) -> None:
    total, metas = next(messages)
    begin(total, metas)
    for batch in messages:
        for key, first_row, chunk in batch:
            rows(key, first_row, chunk)
