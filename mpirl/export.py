"""``python -m mpirl.export``: a recording (``--record-episodes DIR``) as datasets that offline-RL
tools load with their own code: Minari (``minari.load_dataset``) and D4RL's flat HDF5.

    python -m mpirl.export runs/rec                                  # check it, print a summary
    python -m mpirl.export runs/rec --minari mpirl/cartpole-s1-v0    # -> $MINARI_DATASETS_PATH/...
    python -m mpirl.export runs/rec --d4rl cartpole.hdf5 [--stack-frames] [--compression gzip]

Every finished episode of every rank, each once, ordered by the global env step at which it
ended (then rank, env). Episodes still running when the recording ended (a crash, a
preemption, envs restarted at a resume without their states) are skipped and counted.

Minari (format of minari 0.5.4, HDF5 storage, written with h5py: ``minari`` itself is needed only
to load it): ``<root>/<dataset id>/data/main_data.hdf5`` with one group ``episode_<i>`` per
episode holding ``observations`` (N+1: the reset observation first), ``actions``, ``rewards``,
``terminations``, ``truncations`` (N) and ``infos/{epsilon, explored, global_step}`` (N+1: entry
t+1 is about the step that produced observation t+1; entry 0, the reset, has epsilon NaN); its
attributes ``id``, ``total_steps``, ``seed`` (the reset seed, for an env's first episode after
seeding only: later ones followed by autoreset) and ``mpirl/{rank, env, env_seed,
episode_in_env, end_global_step, return}``; ``data/metadata.json`` with the spaces, the env spec
(for envs whose observations mpirl does not preprocess) and ``mpirl``: how the data was made.

D4RL: one file with flat per-step arrays ``observations``, ``next_observations``, ``actions``,
``rewards``, ``terminals`` (terminated), ``timeouts`` (truncated), ``infos/{epsilon, explored,
global_step, episode}``, a per-episode table ``episodes/{first_step, steps, return, rank, env,
env_seed, episode_in_env, end_global_step}`` and the same metadata as JSON in the root attribute
``metadata``.

Atari frames stay uint8 and are compressed (gzip level 4 by default). By default an Atari
observation is its newest single frame (84x84), as the DQN Replay Dataset stores them, with the
stack in the metadata (``frame_stack`` K: the agent saw frames max(0, t-K+1) .. t); this keeps a
frame once on disk instead of K times (Minari: once per step; D4RL: twice, observations and next
observations). ``--stack-frames`` writes the (K, 84, 84) observations the agent saw, for tools
that want the env's own observation space, at about K times the bytes before compression.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shutil
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import h5py
import numpy as np

from mpirl import fsutil, recording
from mpirl.recording import RecordingError

MINARI_FORMAT = "0.5.4"  # the minari version whose HDF5 layout and metadata this writes
OPEN_FILES = 32  # chunk files kept open while episodes are assembled


@dataclass
class Episode:
    """One finished episode: where its fragments are, and who made it."""

    rank: int
    env: int
    seed_step: int
    index: int
    env_seed: int
    end_step: int
    parts: list[tuple[int, int, int]]  # (chunk, first row, rows) in order


@dataclass
class Index:
    """What a recording holds: the manifest, its chunks, and its finished episodes in order."""

    directory: str
    manifest: dict[str, Any]
    chunks: list[recording.Chunk]
    episodes: list[Episode]
    unfinished: int  # episodes that never ended (skipped)


def build_index(directory: str) -> Index:
    """Read the manifest and every chunk's fragment table; join each episode's fragments and
    check that they join (RecordingError, one line, for a damaged, foreign or incomplete one)."""
    manifest = recording.read_manifest(directory)
    chunks = [recording.open_chunk(p, manifest) for p in recording.list_chunks(directory)]
    parts: dict[tuple[int, int, int, int], list[tuple[int, int, int]]] = {}
    ends: dict[tuple[int, int, int, int], int] = {}
    for ci, ch in enumerate(chunks):
        fr = ch.fragments
        with h5py.File(ch.path, "r") as f:
            steps = f["global_step"][:]
        for j in range(len(fr["rows"])):
            key = (ch.rank, int(fr["env"][j]), int(fr["seed_step"][j]), int(fr["index"][j]))
            parts.setdefault(key, []).append((ci, j, int(fr["seed"][j])))
            if fr["last"][j]:
                if key in ends:
                    raise RecordingError(f"{ch.path}: episode {_name(key)} ends twice (a chunk is duplicated)")
                ends[key] = int(steps[ch.offsets[j] + fr["rows"][j] - 1])
    episodes = []
    for key, found in parts.items():
        if key not in ends:
            continue
        found.sort(key=lambda p: (int(chunks[p[0]].fragments["start"][p[1]]), p[0]))
        done = 0
        for n, (ci, j, _) in enumerate(found):
            fr = chunks[ci].fragments
            start, reset, rows = int(fr["start"][j]), bool(fr["reset"][j]), int(fr["rows"][j])
            if start != done or reset != (n == 0) or (fr["last"][j] and n != len(found) - 1):
                raise RecordingError(
                    f"{chunks[ci].path}: episode {_name(key)} does not join (fragment at step {start}, expected "
                    f"{done}): a chunk is missing or left over"
                )
            done += rows - int(reset)
        ep_parts = [(ci, int(chunks[ci].offsets[j]), int(chunks[ci].fragments["rows"][j])) for ci, j, _ in found]
        episodes.append(Episode(key[0], key[1], key[2], key[3], found[0][2], ends[key], ep_parts))
    episodes.sort(key=lambda e: (e.end_step, e.rank, e.env))
    return Index(directory, manifest, chunks, episodes, len(parts) - len(ends))


def _name(key: tuple[int, int, int, int]) -> str:
    return f"(rank {key[0]}, env {key[1]}, seeded at step {key[2]}, #{key[3]})"


class _Files:
    """A small cache of open chunk files (a long recording has more chunks than file handles)."""

    def __init__(self, chunks: list[recording.Chunk]) -> None:
        self.chunks = chunks
        self.open: OrderedDict[int, h5py.File] = OrderedDict()

    def get(self, ci: int) -> h5py.File:
        if ci in self.open:
            self.open.move_to_end(ci)
        else:
            if len(self.open) >= OPEN_FILES:
                self.open.popitem(last=False)[1].close()
            self.open[ci] = h5py.File(self.chunks[ci].path, "r")
        return self.open[ci]

    def close(self) -> None:
        for f in self.open.values():
            f.close()


def iter_episodes(index: Index, stack: bool = False) -> Iterator[tuple[Episode, dict[str, np.ndarray]]]:
    """Each finished episode's arrays: ``obs`` (N+1, ...), and ``actions``, ``rewards``,
    ``terminated``, ``truncated``, ``epsilon``, ``explored``, ``global_step`` (N+1 each: row 0
    is the reset). ``stack``: Atari observations as the K stacked frames the agent saw."""
    files = _Files(index.chunks)
    K = int(index.manifest.get("frame_stack") or 0)
    try:
        for ep in index.episodes:
            try:
                pieces = [recording.read_rows(files.get(ci), first, n) for ci, first, n in ep.parts]
            except (OSError, KeyError, ValueError) as exc:
                where = index.chunks[ep.parts[0][0]].path
                raise RecordingError(f"{where}: damaged chunk ({str(exc).splitlines()[0][:160]})") from None
            rows = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
            ended = rows["terminated"][1:] | rows["truncated"][1:]
            if not ended[-1] or ended[:-1].any():
                raise RecordingError(f"{index.chunks[ep.parts[-1][0]].path}: episode {ep.index} of rank {ep.rank} "
                                     f"env {ep.env} has a damaged end")  # fmt: skip
            if stack and K:
                t = np.arange(len(rows["obs"]))
                rows["obs"] = rows["obs"][np.maximum(t[:, None] + np.arange(-K + 1, 1), 0)]
            yield ep, rows
    finally:
        files.close()


def metadata(index: Index, stack: bool) -> dict[str, Any]:
    """How the data was made and what the export holds (the ``mpirl`` part of both formats)."""
    m, eps = index.manifest, index.episodes
    steps = sum(sum(n for _, _, n in e.parts) - 1 for e in eps)
    K = int(m.get("frame_stack") or 0)
    if K and not stack:
        obs = (f"the newest frame of each observation; the agent saw frames max(0, t-{K - 1}) .. t of its "
               f"episode (frame_stack {K}; a reset is padded with its first frame)")  # fmt: skip
    else:
        obs = "the observations the agent saw"
    keep = ("env_id", "env_spec", "frame_stack", "atari", "atari_preprocessing", "n_actions", "seed",
            "epsilon_schedule", "reward", "versions", "config", "segments")  # fmt: skip
    return {
        **{k: m.get(k) for k in keep},
        "mpirl_version": m.get("versions", {}).get("mpirl"),
        "world_sizes": sorted({s["world_size"] for s in m.get("segments", [])}),
        "observations": obs,
        "observation_shape": list(m["env_obs_shape"] if stack and K else m["obs_shape"]),
        "total_episodes": len(eps),
        "total_steps": steps,
        "episodes_per_rank": {str(r): sum(e.rank == r for e in eps) for r in sorted({e.rank for e in eps})},
        "unfinished_episodes_skipped": index.unfinished,
        "behaviour_policy": "epsilon-greedy over the online Q-network of a synchronous data-parallel DQN",
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _compression(name: str) -> dict[str, Any]:
    choices: dict[str, dict[str, Any]] = {
        "gzip": {"compression": "gzip", "compression_opts": 4},
        "lzf": {"compression": "lzf"},
    }
    return choices.get(name, {})


def _data(group: h5py.Group, name: str, values: np.ndarray, comp: dict[str, Any]) -> None:
    if values.ndim == 0 or len(values) == 0:
        group.create_dataset(name, data=values)
        return
    rows = max(1, min(len(values), (1 << 20) // max(1, values[0].nbytes)))
    group.create_dataset(name, data=values, chunks=(rows, *values.shape[1:]), **comp)


def _space(m: dict[str, Any], stack: bool) -> str:
    """The observation space, serialised as minari does (a JSON string)."""
    box = dict(m["observation_space"])
    if m.get("frame_stack") and not stack:  # one frame of the stacked Box
        box = {**box, "shape": box["shape"][1:], "low": box["low"][-1], "high": box["high"][-1]}
    return json.dumps(box)


@contextlib.contextmanager
def _staged(path: str, overwrite: bool) -> Iterator[str]:
    """A temporary path beside ``path`` to write the output into; moved into place when the block
    ends, removed when it fails (a refused recording leaves no half-written output).
    RecordingError when ``path`` exists and may not be replaced."""
    if os.path.exists(path) and not overwrite:
        raise RecordingError(f"{path} already exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _publish(tmp, path)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _publish(tmp: str, path: str) -> None:
    """Move a finished output into place (the old one, with --overwrite, only then removed)."""
    old = f"{path}.old-{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    fsutil.fsync(os.path.dirname(os.path.abspath(path)))
    _remove(old)


def write_minari(index: Index, root: str, dataset_id: str, stack: bool, compression: str, overwrite: bool) -> str:
    """The Minari dataset ``dataset_id`` under ``root``; returns its directory."""
    namespace, _, _ = _parse_id(dataset_id)
    final = os.path.join(root, dataset_id)
    _some(index)
    with _staged(final, overwrite) as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        steps = _minari_episodes(index, os.path.join(data, "main_data.hdf5"), stack, _compression(compression))
        with open(os.path.join(data, "metadata.json"), "w", encoding="utf-8") as fh:
            json.dump(_minari_metadata(index, dataset_id, steps, stack), fh)
    _namespace_files(root, namespace)
    return final


def _minari_episodes(index: Index, path: str, stack: bool, comp: dict[str, Any]) -> int:
    """Minari's ``main_data.hdf5``: one group per episode; returns the steps written."""
    steps = 0
    with h5py.File(path, "w", track_order=True) as f:
        for i, (ep, rows) in enumerate(iter_episodes(index, stack)):
            g = f.create_group(f"episode_{i}")
            n = len(rows["obs"]) - 1
            g.attrs.update({"id": i, "total_steps": n, "mpirl/rank": ep.rank, "mpirl/env": ep.env,
                            "mpirl/env_seed": ep.env_seed, "mpirl/episode_in_env": ep.index,
                            "mpirl/end_global_step": ep.end_step,
                            "mpirl/return": float(rows["rewards"][1:].sum())})  # fmt: skip
            if ep.index == 0 and ep.env_seed >= 0:  # reset(seed=...) gave it; later ones followed by autoreset
                g.attrs["seed"] = ep.env_seed
            _data(g, "observations", rows["obs"], comp)
            for name, key in (("actions", "actions"), ("rewards", "rewards"), ("terminations", "terminated"),
                              ("truncations", "truncated")):  # fmt: skip
                _data(g, name, rows[key][1:], comp)
            infos = g.create_group("infos")
            for key in ("epsilon", "explored", "global_step"):
                _data(infos, key, rows[key], comp)
            steps += n
    return steps


def _minari_metadata(index: Index, dataset_id: str, steps: int, stack: bool) -> dict[str, Any]:
    """Minari's ``metadata.json``, with mpirl's account of how the data was made under ``mpirl``."""
    m = index.manifest
    own_obs = not m.get("atari") and not str(m["env_id"]).startswith("MinAtar/")
    meta = {
        "dataset_id": dataset_id,
        "total_episodes": len(index.episodes),
        "total_steps": steps,
        "data_format": "hdf5",
        "jpeg_encoding": False,  # frames stay lossless uint8
        "observation_space": _space(m, stack),
        "action_space": json.dumps({"type": "Discrete", "dtype": "int64", "start": 0, "n": int(m["n_actions"])}),
        "minari_version": MINARI_FORMAT,
        "algorithm_name": "mpirl DQN (epsilon-greedy)",
        "description": f"Episodes of an mpirl run on {m['env_id']}: every rank's env shard, step by step",
        "mpirl": metadata(index, stack),
    }
    if own_obs and m.get("env_spec"):  # recover_environment() gives these observations only without preprocessing
        meta["env_spec"] = m["env_spec"]
    return meta


def _some(index: Index) -> None:
    if not index.episodes:
        raise RecordingError(f"{index.directory}: no finished episode to export ({index.unfinished} unfinished)")


def _parse_id(dataset_id: str) -> tuple[Optional[str], str, int]:
    """Minari's rule: (namespace/)name-v<version>."""
    head, _, version = dataset_id.rpartition("-v")
    if not head or not version.isdigit() or not all(c.isalnum() or c in "-_/" for c in head) or "//" in head:
        raise RecordingError(
            f"--minari {dataset_id!r}: a dataset id is (namespace/)name-v<version>, e.g. mpirl/pong-v0"
        )
    namespace, _, name = head.rpartition("/")
    return namespace or None, name, int(version)


def _namespace_files(root: str, namespace: Optional[str]) -> None:
    """minari lists a dataset's namespaces by their namespace_metadata.json."""
    parts = namespace.split("/") if namespace else []
    for depth in range(1, len(parts) + 1):
        path = os.path.join(root, *parts[:depth], "namespace_metadata.json")
        if not os.path.exists(path):
            fsutil.write_text_atomic(path, "{}")


def write_d4rl(index: Index, path: str, stack: bool, compression: str, overwrite: bool) -> str:
    """D4RL's flat HDF5 file at ``path``; returns it."""
    _some(index)
    with _staged(path, overwrite) as tmp:
        _d4rl_file(index, tmp, stack, _compression(compression))
        fsutil.fsync(tmp)
    return path


def _d4rl_file(index: Index, tmp: str, stack: bool, comp: dict[str, Any]) -> None:
    table: dict[str, list[Any]] = {k: [] for k in ("first_step", "steps", "return", "rank", "env", "env_seed",
                                                   "episode_in_env", "end_global_step")}  # fmt: skip
    with h5py.File(tmp, "w") as f:
        grow: dict[str, h5py.Dataset] = {}
        total = 0
        for i, (ep, rows) in enumerate(iter_episodes(index, stack)):
            n = len(rows["obs"]) - 1
            flat = {"observations": rows["obs"][:-1], "next_observations": rows["obs"][1:],
                    "actions": rows["actions"][1:], "rewards": rows["rewards"][1:],
                    "terminals": rows["terminated"][1:], "timeouts": rows["truncated"][1:],
                    "infos/epsilon": rows["epsilon"][1:], "infos/explored": rows["explored"][1:],
                    "infos/global_step": rows["global_step"][1:], "infos/episode": np.full(n, i, np.int64)}  # fmt: skip
            for name, values in flat.items():
                if name not in grow:
                    rows_per_chunk = max(1, (1 << 20) // max(1, values[0].nbytes))
                    grow[name] = f.create_dataset(name, shape=(0, *values.shape[1:]), dtype=values.dtype,
                                                  maxshape=(None, *values.shape[1:]),
                                                  chunks=(rows_per_chunk, *values.shape[1:]), **comp)  # fmt: skip
                grow[name].resize(total + n, axis=0)
                grow[name][total:] = values
            for key, value in zip(table, (total, n, float(rows["rewards"][1:].sum()), ep.rank, ep.env, ep.env_seed,
                                          ep.index, ep.end_step)):  # fmt: skip
                table[key].append(value)
            total += n
        for key, column in table.items():
            f.create_dataset(
                f"episodes/{key}", data=np.asarray(column, dtype=np.float64 if key == "return" else np.int64)
            )
        f.attrs["metadata"] = json.dumps(metadata(index, stack))
        f.attrs["env_id"] = index.manifest["env_id"]


def summary_line(index: Index) -> str:
    meta = metadata(index, False)
    size = sum(os.path.getsize(c.path) for c in index.chunks)
    return (f"{index.directory}: {meta['env_id']}, {meta['total_episodes']:,} finished episodes, "
            f"{meta['total_steps']:,} steps from {len(meta['episodes_per_rank'])} rank(s) in {len(index.chunks)} "
            f"chunk(s) ({size / 2**20:,.1f} MiB); {index.unfinished} unfinished episode(s) skipped")  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: exit 0, or 2 with ``mpirl: error: <one line>`` for a recording or option it cannot use."""
    p = argparse.ArgumentParser(prog="python -m mpirl.export", description=__doc__.split("\n\n")[0])
    p.add_argument("recording", help="the --record-episodes directory of a run")
    p.add_argument("--minari", metavar="DATASET_ID", help="write a Minari dataset, e.g. mpirl/cartpole-s1-v0")
    p.add_argument("--minari-root", metavar="DIR", help="where Minari datasets live "
                   "(default: $MINARI_DATASETS_PATH, else ~/.minari/datasets, as minari looks)")  # fmt: skip
    p.add_argument("--d4rl", metavar="FILE", help="write D4RL's flat HDF5 file")
    p.add_argument("--stack-frames", action="store_true", help="Atari: stacked (K, 84, 84) observations")
    p.add_argument("--compression", choices=("gzip", "lzf", "none"), default="gzip", help="of the outputs' arrays")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--json", action="store_true", help="print the dataset metadata as JSON")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return 2 if exc.code else 0
    try:
        if args.minari:
            _parse_id(args.minari)
        index = build_index(args.recording)
        if args.minari:
            root = (
                args.minari_root or os.environ.get("MINARI_DATASETS_PATH") or os.path.expanduser("~/.minari/datasets")
            )
            print(
                f"minari: {write_minari(index, root, args.minari, args.stack_frames, args.compression, args.overwrite)}"
            )
        if args.d4rl:
            print(f"d4rl: {write_d4rl(index, args.d4rl, args.stack_frames, args.compression, args.overwrite)}")
        print(json.dumps(metadata(index, args.stack_frames), indent=1) if args.json else summary_line(index))
    except (RecordingError, OSError) as exc:
        msg = str(exc) if isinstance(exc, RecordingError) else f"{exc.filename or ''}: {exc.strerror or exc}"
        print(f"mpirl: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
