"""Checkpoints in HDF5: with mpirl.shards (its replay streaming), the only code that knows h5py.

One file holds a whole job at one step: online and target weights, optimizer state, every
counter, the config, versions, and each rank's shard (replay arrays, RNG states, env state).
Layout (``schema_version`` 2, written by mpirl.layout; see README "Checkpoint layout"):

    /                      attrs: format, schema_version, world_size, global_env_steps,
                                  updates, env_id, obs_shape, n_actions, versions (JSON),
                                  config (JSON), counters (JSON), created, checksums (JSON:
                                  mpirl.integrity's SHA-256 of every dataset and attribute)
    /model/online/<name>   parameters and buffers of the online network
    /model/target/<name>   same for the target network
    /optimizer/state/<i>/<key>   per-parameter optimizer tensors; attrs: param_groups (JSON)
    /ranks/<r>/            attrs: meta (JSON: replay ring state, numpy RNG state, counters)
    /ranks/<r>/replay/<field>    obs, actions, rewards, next_obs, steps, terminated
                                 (+ priorities), slot order, chunked + lzf-compressed
    /ranks/<r>/env_state   env shard state as data (uint8, mpirl.envstate), when it could be captured

Writes are atomic: rank 0 writes ``<name>.tmp``, fsyncs, renames, fsyncs the folder, then
points ``latest`` at it the same way, so a crash at any moment leaves the previous checkpoint
whole. Every rank's replay shard travels to rank 0 (and back on restore) in bounded,
compressed chunks: see mpirl.shards.

Nothing here uses pickle: the env state is mpirl.envstate's declared data, decoded and checked
by the collector (an old checkpoint's pickled env state is never loaded: the env shards restart).

The header's fields are typed records (``mpirl.records``): ``CheckpointHeader`` and its
``Counters`` are written here and read back by ``read_header`` as a ``StoredCheckpoint``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import h5py
import numpy as np
import torch

from mpirl import dist, fsutil, integrity, layout, shards
from mpirl.layout import FORMAT, SCHEMA_VERSION
from mpirl.records import CheckpointHeader, StoredCheckpoint

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


def library_versions() -> dict[str, str]:
    """This module's own library version, for a checkpoint's ``versions`` attribute."""
    return {"h5py": h5py.__version__}


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def bytes_needed(shard_bytes: int, param_bytes: int) -> int:
    """Upper bound of one checkpoint's size on disk, before compression: every rank's shard
    (replay arrays and env state, summed over ranks), two networks plus Adam's two moments
    (4x the parameter bytes), 2% and a margin for HDF5's metadata and chunk index."""
    return int((shard_bytes + 4 * param_bytes) * 1.02) + SPACE_MARGIN


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a network's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def save(
    run_dir: str,
    ctx: dist.DistContext,
    header: CheckpointHeader,
    online: torch.nn.Module,
    target: torch.nn.Module,
    optimizer: Any,
    shard: RankShard,
    keep: int,
) -> tuple[Optional[str], str]:
    """Collective: write one checkpoint of the whole job; returns (path, "") on success or
    (None, error message) on failure, identical on every rank. The previous checkpoints
    stay untouched on failure."""
    folder = checkpoint_dir(run_dir)
    path = os.path.join(folder, f"step-{header.global_env_steps:012d}.h5")
    # Check the space first: HDF5 does not survive a write into a full disk (h5py can crash
    # on close after ENOSPC), so a checkpoint that may not fit is refused up front.
    local = sum(a.nbytes for a in shard.replay.values()) + len(shard.env_state)
    total = int(dist.allreduce_sum(np.array([local]), name="mpirl.checkpoint.bytes")[0])  # HVD: allreduce
    need = bytes_needed(total, module_bytes(online))
    try:
        dist.rank0_decides(lambda: _check_space(path, need), name="mpirl.checkpoint.go", errors=CheckpointError)  # HVD
    except CheckpointError as exc:
        return None, str(exc)
    arrays = {**shard.replay, "env_state": _bytes_array(shard.env_state)}
    specs = [(k, tuple(a.shape), np.dtype(a.dtype).str) for k, a in arrays.items()]
    metas = dist.gather_to_root((shard.meta, specs))  # MPI: gather (small)
    if ctx.rank != 0:
        shards.send_to_root(arrays)  # MPI: compressed chunks -> rank 0, one message in flight

    def write() -> str:  # rank 0 only
        nets = {"online": online, "target": target}
        own_digests: dict[str, str] = {}
        own = shards.encoded_chunks(arrays, own_digests)
        _write_as_root(path, ctx.size, header, nets, optimizer, metas, (own, own_digests), keep)
        return path

    try:
        return dist.rank0_decides(write, name="mpirl.checkpoint.status", errors=CheckpointError), ""  # HVD
    except CheckpointError as exc:
        return None, str(exc)


def _check_space(path: str, need: int) -> None:
    """Rank 0: create the checkpoint folder; CheckpointError unless ``need`` bytes are free."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc.strerror or exc}") from None
    if free < need:
        raise CheckpointError(
            f"checkpoint {path}: not enough free space ({free / 2**20:,.1f} MiB free, "
            f"up to {need / 2**20:,.1f} MiB needed)"
        )


def _write_as_root(
    path: str,
    world_size: int,
    header: CheckpointHeader,
    nets: dict[str, torch.nn.Module],
    optimizer: Any,
    metas: list[tuple[dict[str, Any], list[tuple[str, tuple[int, ...], str]]]],
    own: tuple[Iterator[list[shards.Chunk]], dict[str, str]],
    keep: int,
) -> None:
    """Rank 0: write ``<path>.tmp`` with every rank's chunks as they arrive (``own``: rank 0's
    chunks and the dict their checksums fill), seal it with every checksum, then commit it
    atomically. Raises CheckpointError, only after every rank's messages were received (a
    sender is never left blocked), and never leaves the temporary file behind."""
    tmp = path + ".tmp"
    error = ""
    f: Optional[h5py.File] = None
    datasets: dict[tuple[int, str], h5py.Dataset] = {}
    try:
        f = h5py.File(tmp, "w")
        datasets = layout.create(f, world_size, header, nets, optimizer, metas)
    except Exception as exc:  # keep receiving below, or the other ranks would block forever
        error = f"checkpoint {path}: {type(exc).__name__}: {exc}"
    error, digests = shards.receive_into(datasets, *own, world_size, error, path)  # MPI: every rank's chunks
    try:
        if f is not None and not error:
            integrity.seal(f, {datasets[key].name: digest for key, digest in digests.items()})  # written last
        if f is not None:
            f.close()  # flushes: a full disk may only show here
        if not error:
            _commit(tmp, path, keep)
    except Exception as exc:
        error = error or f"checkpoint {path}: {type(exc).__name__}: {exc}"
    if error:
        if os.path.exists(tmp):
            try:
                os.remove(tmp)  # never leave a half-written file behind
            except OSError:
                pass
        raise CheckpointError(error)


def _commit(tmp: str, path: str, keep: int) -> None:
    """Make a written temporary file the newest checkpoint: fsync, rename, fsync the folder,
    point ``latest`` at it the same way, prune the oldest."""
    folder = os.path.dirname(path)
    fsutil.fsync(tmp)
    os.replace(tmp, path)
    fsutil.fsync(folder)
    fsutil.write_text_atomic(os.path.join(folder, LATEST), os.path.basename(path) + "\n")
    _prune(folder, keep)


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
# Nothing read here constructs an object of a type the file names, or decides what to import:
# attributes are JSON and numbers, datasets are plain arrays (mpirl.envstate reads env state).


@contextlib.contextmanager
def _malformed_is_an_error(path: str) -> Iterator[None]:
    """Turn what h5py, json and numpy raise on a damaged or forged file into one
    CheckpointError naming the file, so every reader ends with one line, never a traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except integrity.IntegrityError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (OSError, KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is damaged or malformed ({type(exc).__name__}: {exc})") from None


def resolve(path: str) -> str:
    """A checkpoint file as given, or a run directory's latest checkpoint; CheckpointError if none."""
    if os.path.isdir(path):
        found = latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        return found
    return path


def newest_first(run_dir: str) -> list[str]:
    """A run directory's checkpoints, the one ``latest`` names first, then by step, newest first."""
    folder = checkpoint_dir(run_dir)
    try:
        files = sorted((n for n in os.listdir(folder) if n.startswith("step-") and n.endswith(".h5")), reverse=True)
    except OSError:
        return []
    first = latest(run_dir)
    paths = [os.path.join(folder, n) for n in files]
    return ([first] if first else []) + [p for p in paths if p != first]


def open_checked(path: str) -> h5py.File:
    """Open a checkpoint read-only and check it is one; CheckpointError otherwise."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CheckpointError(f"{path} is not a readable HDF5 file (truncated or corrupted?): {exc}") from None
    try:
        with _malformed_is_an_error(path):
            if layout.attr(f.attrs.get("format")) != FORMAT:
                raise CheckpointError(f"{path} is an HDF5 file but not an mpirl checkpoint")
            version = int(f.attrs.get("schema_version", -1))
            if version > SCHEMA_VERSION or version < 1:
                raise CheckpointError(f"{path} has schema version {version}; this mpirl reads 1..{SCHEMA_VERSION}")
            for key in ("model/online", "model/target", "optimizer", "ranks/0"):
                if key not in f:
                    raise CheckpointError(f"{path} lacks /{key} (incomplete checkpoint)")
    except CheckpointError:
        f.close()
        raise
    return f


def verify(path: str, only: Optional[Sequence[str]] = None) -> tuple[int, int]:
    """Check a checkpoint against its checksums (all of it, or the objects under the HDF5
    paths ``only``, e.g. ``["/model/online"]``), reading the stored bytes without
    decompressing them. Returns (objects checked, stored bytes read); (0, 0) for a schema-1
    file, which carries none. CheckpointError naming the first damaged object otherwise."""
    with open_checked(path) as f, _malformed_is_an_error(path):
        if int(f.attrs["schema_version"]) < 2:
            return 0, 0
        return integrity.verify(f, only)


def summary(path: str) -> dict[str, Any]:
    """A checkpoint's facts, for ``python -m mpirl.inspect``: its header (as read by
    ``read_header``) and, per rank, the saved replay's size and ring state."""
    with open_checked(path) as f, _malformed_is_an_error(path):
        stored = layout.read_header(path, f)  # the same open file: one open, one validation
        shards = []
        for r in sorted(f["ranks"], key=int):
            g = f["ranks"][r]
            meta = json.loads(g.attrs["meta"])
            rep = g["replay"]
            stored_bytes = sum(ds.id.get_storage_size() for ds in rep.values())
            raw = sum(ds.size * ds.dtype.itemsize for ds in rep.values())
            shards.append({"rank": int(r), "transitions": int(rep["actions"].shape[0]),
                           "fields": {k: [list(ds.shape), str(ds.dtype)] for k, ds in rep.items()},
                           "raw_bytes": int(raw), "stored_bytes": int(stored_bytes),
                           "env_state_bytes": int(g["env_state"].shape[0]) if "env_state" in g else 0,
                           "replay_state": meta.get("replay", {})})  # fmt: skip
        schema = int(f.attrs["schema_version"])
        checksums = len(json.loads(f.attrs[integrity.CHECKSUMS])) if integrity.CHECKSUMS in f.attrs else 0
    h = stored.header
    return {
        "path": path,
        "file_bytes": os.path.getsize(path),
        "schema_version": schema,
        "checksums": checksums,
        "created": stored.created,
        "world_size": stored.world_size,
        "global_env_steps": h.global_env_steps,
        "updates": h.updates,
        "env_id": h.env_id,
        "obs_shape": h.obs_shape,
        "n_actions": h.n_actions,
        "versions": h.versions,
        "config": h.config,
        "counters": h.counters.to_json(),
        "shards": shards,
    }


def read_header(path: str) -> StoredCheckpoint:
    """Global facts of a checkpoint (small); CheckpointError if it is not a usable one."""
    with open_checked(path) as f, _malformed_is_an_error(path):
        return layout.read_header(path, f)


def load_module(path: str, group: str, module: torch.nn.Module) -> None:
    """Load /model/<group> into ``module``; CheckpointError naming the mismatch otherwise."""
    with open_checked(path) as f, _malformed_is_an_error(path):
        g = f["model"][group]
        expected = module.state_dict()
        missing = sorted(set(expected) - set(g))
        extra = sorted(set(g) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{path}: network mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        sd = {}
        for k, t in expected.items():
            arr = np.asarray(g[k][()])
            if tuple(arr.shape) != tuple(t.shape) or arr.dtype.kind not in "fiub":
                raise CheckpointError(
                    f"{path}: network mismatch at {k}: checkpoint {tuple(arr.shape)} {arr.dtype}, "
                    f"model {tuple(t.shape)}"
                )
            sd[k] = torch.from_numpy(arr)
        module.load_state_dict(sd)


def load_optimizer(path: str, optimizer: Any) -> None:
    with open_checked(path) as f, _malformed_is_an_error(path):
        g = f["optimizer"]
        state: dict[int, dict[str, Any]] = {}
        for idx in g["state"]:
            entry: dict[str, Any] = {k: torch.from_numpy(np.asarray(ds[()])) for k, ds in g["state"][idx].items()}
            entry.update({k: layout.attr(v) for k, v in g["state"][idx].attrs.items()})
            state[int(idx)] = entry
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(g.attrs["param_groups"])})


def restore_shards(
    path: str,
    ctx: dist.DistContext,
    old_rows: list[int],
    begin: Callable[[int, list[dict[str, Any]]], None],
    rows: Callable[[str, int, np.ndarray], None],
) -> None:
    """Collective over point-to-point messages: every rank receives its share of the saved
    replay shards (``shards.restore``); rank 0 reads the file, the others never touch it."""
    if ctx.rank != 0:
        shards.restore(None, ctx, old_rows, begin, rows)  # MPI: receive from rank 0
        return
    with open_checked(path) as f:
        shards.restore(f, ctx, old_rows, begin, rows)  # MPI: send each rank its share
