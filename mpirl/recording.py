"""A recording of a run's episodes on disk (``--record-episodes DIR``): the format, its
manifest, and the checks that every reader and the resuming run make (h5py, numpy).

Layout of ``DIR``::

    recording.json           the manifest (rank 0 writes it, atomically): format, env, spaces,
                             versions, the epsilon schedule and one segment per start or resume
                             (start step, world size, envs per rank, how env seeds were given)
    chunks/<first step>-r<rank>-s<segment>.h5
                             one rank's rows between two flushes, written by that rank alone
                             (write .tmp, fsync, rename, fsync the folder); <segment>: the step
                             at which the run that wrote it started or resumed

A chunk holds rows in fragment order. A row is one observation: an episode's reset observation
(its first row), or the observation after one env step with that step's action, reward (as the
env gave it, unclipped), terminated and truncated flags, the policy's epsilon and whether the
action was a random one. Atari frame stacks are stored as their newest frame only (the stack at
step t is frames max(0, t-K+1) .. t: gymnasium's FrameStackObservation pads a reset with its
first frame), so a frame is stored once, not K times. A fragment is one episode's consecutive
rows in one chunk; an episode longer than a chunk, or in flight at a checkpoint, spans several
chunks; ``mpirl.export`` joins them and checks that they join.

Why a file per rank and not rank 0 alone: rows never travel between ranks (the trainer's rule
for experience), and each rank compresses its own frames in parallel; rank 0 writing every
rank's frames would put N times the compression on the rank that the others wait for at the
next allreduce (``benchmarks/recording_overhead.py`` measures a rank's share).

Consistency with checkpoints: every checkpoint attempt flushes every rank's rows first, so no
chunk holds rows from both sides of a checkpoint's step S. A run resumed from S deletes the
chunks whose first row is later than S, and those of runs that started at S or later (their reset
rows are stamped with their start step), rank 0 alone before any rank writes again; it continues the
episodes in flight at S from their saved position (the env shards resume exactly), so each
finished episode is in the dataset exactly once. Without exact env states (EnvPool, another
world size) the envs restart: the episodes in flight at S never finish, and readers skip them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import h5py
import numpy as np

from mpirl import fsutil
from mpirl.config import ConfigError

FORMAT = "mpirl-recording"
CHUNK_FORMAT = "mpirl-recording-chunk"
VERSION = 1
MANIFEST = "recording.json"
CHUNKS = "chunks"
# Per-row columns of a chunk besides ``obs``: name -> dtype. Reset rows hold action -1,
# reward 0, both flags False, epsilon NaN, explored False.
ROW_COLUMNS = {
    "actions": np.int64,
    "rewards": np.float64,
    "terminated": np.bool_,
    "truncated": np.bool_,
    "epsilon": np.float32,
    "explored": np.bool_,
    "global_step": np.int64,  # global env steps when the row's observation was produced
}
# Per-fragment columns: the episode (env, seed_step, index: unique within a rank), the env's seed,
# how many steps of the episode earlier fragments hold, whether the fragment starts with the reset
# observation and whether the episode ended in it.
FRAGMENT_COLUMNS = {
    "rows": np.int64,
    "env": np.int64,
    "seed_step": np.int64,  # global env step at which the env was (re)seeded
    "seed": np.int64,
    "index": np.int64,  # the episode's number in its env since that seed (0: the seeded reset)
    "start": np.int64,
    "reset": np.bool_,
    "last": np.bool_,
}


class RecordingError(ConfigError):
    """A recording that cannot be used (bad input: exit 2); the message is one line naming the file."""


def chunk_dir(directory: str) -> str:
    return os.path.join(directory, CHUNKS)


def chunk_name(first_step: int, rank: int, segment: int) -> str:
    """Chunks sort by their first row's global step, then rank."""
    return f"{first_step:013d}-r{rank:05d}-s{segment:013d}.h5"


def _chunk_steps(name: str) -> Optional[tuple[int, int]]:
    """(first step, segment) of a chunk's file name; None for any other name."""
    parts = name[:-3].split("-") if name.endswith(".h5") else []
    if len(parts) != 3 or not parts[0].isdigit() or parts[1][:1] != "r" or parts[2][:1] != "s":
        return None
    if not parts[1][1:].isdigit() or not parts[2][1:].isdigit():
        return None
    return int(parts[0]), int(parts[2][1:])


def list_chunks(directory: str) -> list[str]:
    """Every finished chunk of ``directory`` (temporaries excluded), in (step, rank) order."""
    folder = chunk_dir(directory)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if _chunk_steps(n) is not None]


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of ``directory``; RecordingError when it is missing or not one."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise RecordingError(f"{directory} is not an mpirl recording (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise RecordingError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RecordingError(f"{path}: not an mpirl recording manifest")
    if manifest.get("version") != VERSION:
        raise RecordingError(f"{path}: recording format version {manifest.get('version')}, this mpirl reads {VERSION}")
    return manifest


IDENTITY = ("env_id", "obs_shape", "obs_dtype", "frame_stack", "n_actions", "seed")  # what one recording shares


def check(directory: str, identity: dict[str, Any], resumed: bool, overwrite: bool) -> bool:
    """Rank 0, before the run creates anything: can this run record into ``directory``? True if
    it holds a recording already. RecordingError (one line) when that recording is of another
    env, observations or seed, or holds chunks while this run is fresh (neither --resume nor
    --overwrite: a new run would mix its episodes into another run's)."""
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        if os.path.isfile(directory):
            raise RecordingError(f"--record-episodes {directory} is a file, not a directory")
        return False
    old = read_manifest(directory)
    for key in IDENTITY:
        if old.get(key) != identity.get(key):
            raise RecordingError(
                f"{directory} holds a recording of another run ({key}: {old.get(key)!r}, this run "
                f"{identity.get(key)!r}); choose another --record-episodes directory"
            )
    if list_chunks(directory) and not resumed and not overwrite:
        raise RecordingError(
            f"{directory} already holds a recording; pass --resume auto to continue its run, "
            "--overwrite to start it again, or another --record-episodes directory"
        )
    return True


def prepare(
    directory: str, manifest: dict[str, Any], segment: dict[str, Any], resumed: bool, overwrite: bool
) -> tuple[str, bool]:
    """Rank 0, before any rank records: make ``directory`` ready for a run starting (or resuming)
    at global step ``segment['start_step']`` (``check`` first); returns a note for the log and
    whether chunks before the start were kept (then episodes in flight at a resume continue in
    this directory; otherwise their beginnings are elsewhere, and each env starts at its next reset).
    Chunks later than the start step, and those of runs that started at it or later, are deleted
    (this run redoes their steps; a fresh run, step 0, discards them all), temporaries of an
    interrupted write too; the manifest keeps the segments before the start and adds this one."""
    start = int(segment["start_step"])
    folder = chunk_dir(directory)
    existing = check(directory, manifest, resumed, overwrite)
    try:
        os.makedirs(folder, exist_ok=True)
        if existing:
            old = read_manifest(directory)
            manifest = {**old, "segments": [s for s in old.get("segments", []) if s["start_step"] < start]}
        dropped = 0
        for name in os.listdir(folder):
            steps = _chunk_steps(name)
            if name.endswith(".tmp") or (steps is not None and (steps[0] > start or steps[1] >= start)):
                os.remove(os.path.join(folder, name))
                dropped += name.endswith(".h5")
        manifest = {**manifest, "segments": list(manifest.get("segments", [])) + [segment]}
        fsutil.fsync(folder)
        fsutil.write_text_atomic(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1))
    except OSError as exc:
        raise RecordingError(f"--record-episodes {directory} is not usable: {exc.strerror or exc}") from None
    kept = len(list_chunks(directory))
    verb = "continues" if existing else "starts"
    dropped_note = f", {dropped} chunk(s) after step {start:,} discarded" if dropped else ""
    note = f"mpirl: recording episodes to {directory} ({verb} at step {start:,}: {kept} chunk(s) kept{dropped_note})"
    return note, kept > 0


def new_segment(start_step: int, world_size: int, config: dict[str, Any], seeds: str) -> dict[str, Any]:
    """One start or resume of the recorded run, for the manifest."""
    return {
        "start_step": int(start_step),
        "world_size": int(world_size),
        "num_envs_per_rank": int(config["num_envs_per_rank"]),
        "env_seeds": seeds,
        "config": config,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_chunk(
    directory: str, rank: int, attrs: dict[str, Any], obs: np.ndarray, rows: dict[str, np.ndarray],
    fragments: dict[str, np.ndarray],
) -> str:  # fmt: skip
    """Write one chunk atomically (``.tmp``, fsync, rename, fsync the folder); returns its path.
    Every dataset is lzf-compressed (fast enough for a rank's main thread) with HDF5's
    Fletcher-32 checksum, so a damaged or truncated chunk fails to read instead of giving data."""
    first = int(rows["global_step"][0])
    path = os.path.join(chunk_dir(directory), chunk_name(first, rank, int(attrs["segment"])))
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"format": CHUNK_FORMAT, "version": VERSION, "rank": rank, **attrs})
        f.attrs["first_step"], f.attrs["last_step"] = first, int(rows["global_step"][-1])
        _dataset(f, "obs", obs)
        for name, values in rows.items():
            _dataset(f, name, values)
        group = f.create_group("fragments")
        for name, values in fragments.items():
            _dataset(group, name, values)
    fsutil.fsync(tmp)
    os.replace(tmp, path)
    fsutil.fsync(chunk_dir(directory))
    return path


def _dataset(group: h5py.Group, name: str, values: np.ndarray) -> None:
    row_bytes = max(1, values.nbytes // max(1, len(values)))
    chunk_rows = max(1, min(len(values), (1 << 20) // row_bytes))  # ~1 MiB HDF5 chunks
    group.create_dataset(name, data=values, chunks=(chunk_rows, *values.shape[1:]), compression="lzf", fletcher32=True)


@dataclass
class Chunk:
    """A chunk's fragment table and where its rows are (rows are read on demand)."""

    path: str
    rank: int
    fragments: dict[str, np.ndarray]
    offsets: np.ndarray  # first row of each fragment


def open_chunk(path: str, manifest: dict[str, Any]) -> Chunk:
    """Read a chunk's header and fragment table, checked against the manifest; RecordingError
    (one line) for a truncated, damaged or foreign file."""
    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if a.get("format") != CHUNK_FORMAT or a.get("version") != VERSION:
                raise RecordingError(f"{path}: not a chunk of an mpirl recording (format {VERSION})")
            if a.get("env_id") != manifest["env_id"] or list(a.get("obs_shape", [])) != manifest["obs_shape"]:
                raise RecordingError(
                    f"{path}: a chunk of another env ({a.get('env_id')}, observations {list(a.get('obs_shape', []))}); "
                    f"this recording is {manifest['env_id']}, {manifest['obs_shape']}"
                )
            frags = {name: f["fragments"][name][:] for name in FRAGMENT_COLUMNS}
            n_rows = {name: f[name].shape[0] for name in ("obs", *ROW_COLUMNS)}
            rank = int(a["rank"])
    except RecordingError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise RecordingError(f"{path}: damaged or truncated chunk ({str(exc).splitlines()[0][:160]})") from None
    counts = frags["rows"]
    if len(set(n_rows.values())) != 1 or int(counts.sum()) != n_rows["obs"] or (counts <= 0).any():
        raise RecordingError(f"{path}: damaged chunk (fragment rows do not add up to its {n_rows['obs']} rows)")
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return Chunk(path, rank, frags, offsets)


def read_rows(f: h5py.File, first: int, count: int) -> dict[str, np.ndarray]:
    """Rows ``first .. first+count`` of an open chunk: obs and every row column."""
    return {name: f[name][first : first + count] for name in ("obs", *ROW_COLUMNS)}
