"""One rank's episode recorder (``--record-episodes DIR``), fed by its collector every vector
step: per-step rows of this rank's env shard, in bounded memory, written to this rank's chunks
(``mpirl.recording`` has the format and the consistency rules with checkpoints).

Memory: rows go into preallocated arrays of at most ``limit_bytes`` (32 MiB per rank by
default, plus one vector step); when they are full, or when the trainer flushes (every
checkpoint attempt and the end of the run), they are written as one chunk and the arrays are
reused. Episodes longer than a chunk simply continue in the next one (as fragments).

gymnasium's next-step autoreset decides the rows: a valid step of env e gives a row with the
observation after the step (for an episode's last step: its real final observation); the step
after an episode's end is the reset step, whose observation is the next episode's reset
observation (a reset row; the action that step was given was ignored by the env).
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import numpy as np

from mpirl import envs, envstate, recording
from mpirl.config import Config

# Rows held per rank before they are written as one chunk; MPIRL_RECORD_CHUNK_BYTES overrides
# (tests use small chunks, so that episodes span them and chunks fall between checkpoints).
LIMIT_BYTES = int(os.environ.get("MPIRL_RECORD_CHUNK_BYTES", 32 << 20))


class Recorder:
    """The rows of one rank's ``num_envs`` envs since the last flush, and each env's episode."""

    def __init__(
        self, directory: str, rank: int, num_envs: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
        frame_stack: int, attrs: dict[str, Any], limit_bytes: int = LIMIT_BYTES,
    ) -> None:  # fmt: skip
        """``obs_shape``: the env's observation shape (K stacked frames when ``frame_stack`` K > 0,
        of which only the newest is kept); ``attrs``: written into every chunk (env id, ...)."""
        self.directory, self.rank, self.num_envs, self.frame_stack = directory, rank, num_envs, frame_stack
        self.frame_shape = tuple(obs_shape[1:]) if frame_stack else tuple(obs_shape)
        self.attrs = {**attrs, "obs_shape": list(self.frame_shape), "frame_stack": frame_stack}
        row_bytes = int(np.prod(self.frame_shape, dtype=np.int64)) * np.dtype(obs_dtype).itemsize + 48
        self.capacity = max(4 * num_envs, limit_bytes // row_bytes)
        self.obs = np.zeros((self.capacity, *self.frame_shape), dtype=obs_dtype)
        self.cols: dict[str, np.ndarray] = {
            k: np.zeros(self.capacity, dtype=t) for k, t in recording.ROW_COLUMNS.items()
        }
        self.slot = np.zeros(self.capacity, dtype=np.int64)  # row -> fragment (an index into self.frags)
        self.n = 0
        E = num_envs
        # Each env's current episode: its identity, steps already flushed, and whether it is recorded
        # at all (not when it began before recording did: its first steps are nowhere).
        self.seed_step = np.zeros(E, dtype=np.int64)
        self.seed = np.zeros(E, dtype=np.int64)
        self.index = np.zeros(E, dtype=np.int64)
        self.done_steps = np.zeros(E, dtype=np.int64)
        self.active = np.zeros(E, dtype=bool)
        self.frags: list[list[int]] = []  # per fragment: env, seed_step, seed, index, start, reset
        self.current = np.full(E, -1, dtype=np.int64)  # env -> its fragment in this buffer (-1: none)
        self.chunks_written = 0
        self.bytes_written = 0  # on disk, after compression
        self.write_s = 0.0  # seconds in chunk writes (compression, fsync), on this rank's main thread

    # --- rows ---------------------------------------------------------------------------
    def _frames(self, obs: np.ndarray) -> np.ndarray:
        return obs[:, -1] if self.frame_stack else obs

    def _new_fragment(self, e: int, reset: bool) -> None:
        self.current[e] = len(self.frags)
        self.frags.append(
            [e, int(self.seed_step[e]), int(self.seed[e]), int(self.index[e]), int(self.done_steps[e]), int(reset)]
        )

    def begin(self, obs: np.ndarray, seeds: list[int], global_step: int) -> None:
        """Every env was just reset with ``seeds``: each begins episode 0 of that seed."""
        self._room(len(obs))
        self.seed[:] = seeds
        self.seed_step[:] = global_step
        self.index[:] = 0
        self._start_episodes(np.arange(self.num_envs), self._frames(obs), global_step)

    def _start_episodes(self, envs: np.ndarray, frames: np.ndarray, global_step: int) -> None:
        self.done_steps[envs] = 0
        self.active[envs] = True
        for e in envs.tolist():
            self._new_fragment(e, reset=True)
        k = len(envs)
        rows = slice(self.n, self.n + k)
        self.obs[rows] = frames
        self.slot[rows] = self.current[envs]
        c = self.cols
        c["actions"][rows], c["rewards"][rows], c["epsilon"][rows] = -1, 0.0, np.nan
        c["terminated"][rows] = c["truncated"][rows] = c["explored"][rows] = False
        c["global_step"][rows] = global_step
        self.n += k

    def step(
        self, actions: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
        valid: np.ndarray, next_obs: np.ndarray, epsilon: float, explored: np.ndarray, global_step: int,
    ) -> None:  # fmt: skip
        """One vector step: rows for the valid steps of recorded episodes, reset rows for the
        envs whose previous episode had ended (``valid`` False: gymnasium's reset step)."""
        self._room(self.num_envs)
        frames = self._frames(next_obs)
        stepped = np.flatnonzero(valid & self.active)
        k = len(stepped)
        if k:
            rows = slice(self.n, self.n + k)
            self.obs[rows] = frames[stepped]
            self.slot[rows] = self.current[stepped]
            c = self.cols
            c["actions"][rows], c["rewards"][rows] = actions[stepped], rewards[stepped]
            c["terminated"][rows], c["truncated"][rows] = terminated[stepped], truncated[stepped]
            c["epsilon"][rows], c["explored"][rows], c["global_step"][rows] = epsilon, explored[stepped], global_step
            self.n += k
            ended = stepped[(terminated | truncated)[stepped]]
            self.index[ended] += 1  # the next episode of that env
        reset = np.flatnonzero(~valid)
        if len(reset):
            self._start_episodes(reset, frames[reset], global_step)

    def _room(self, rows: int) -> None:
        if self.n + rows > self.capacity:
            self.flush()

    # --- chunks -------------------------------------------------------------------------
    def flush(self) -> Optional[str]:
        """Write the rows held as one chunk (nothing when there are none); returns its path.
        An OSError (disk full) propagates: the run aborts, and the last checkpoint with the
        chunks before it stays a consistent recording."""
        n = self.n
        if n == 0:
            return None
        order = np.argsort(self.slot[:n], kind="stable")  # fragments in order, rows in time order
        slots, counts = np.unique(self.slot[:n], return_counts=True)
        frag = np.asarray(self.frags, dtype=np.int64)[slots]
        rows = {k: v[:n][order] for k, v in self.cols.items()}
        ends = np.cumsum(counts) - 1
        last = rows["terminated"][ends] | rows["truncated"][ends]
        fragments = {
            "rows": counts.astype(np.int64),
            "env": frag[:, 0],
            "seed_step": frag[:, 1],
            "seed": frag[:, 2],
            "index": frag[:, 3],
            "start": frag[:, 4],
            "reset": frag[:, 5].astype(bool),
            "last": last,
        }
        t0 = time.perf_counter()
        path = recording.write_chunk(self.directory, self.rank, self.attrs, self.obs[:n][order], rows, fragments)
        self.write_s += time.perf_counter() - t0
        # Steps each env's current episode has on disk now (reset rows are not steps).
        steps_of = dict(zip(slots.tolist(), (counts - fragments["reset"]).tolist()))
        for e, cur in enumerate(self.current.tolist()):
            if cur in steps_of:
                self.done_steps[e] = self.frags[cur][4] + steps_of[cur]
        self.chunks_written += 1
        self.bytes_written += _size(path)
        self.n = 0
        self.frags = []
        self.current[:] = -1
        for e in np.flatnonzero(self.active).tolist():  # in-flight episodes go on in the next chunk
            self._new_fragment(e, reset=False)
        return path

    # --- checkpoints --------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """Each env's episode, for the collector's env state; call right after ``flush``."""
        if self.n:
            raise RuntimeError("recorder state taken with unflushed rows")
        return {"seed_step": self.seed_step, "seed": self.seed, "index": self.index,
                "done_steps": self.done_steps, "active": self.active}  # fmt: skip

    @staticmethod
    def check_state(state: Any, num_envs: int) -> dict[str, np.ndarray]:
        """``state()`` as read back from a file, checked for ``num_envs`` envs; EnvStateError
        (one line) if it does not fit."""
        kinds = {"seed_step": np.int64, "seed": np.int64, "index": np.int64, "done_steps": np.int64, "active": bool}
        if type(state) is not dict or set(state) != set(kinds):
            raise envstate.EnvStateError("env state: recorder state is not seed_step, seed, index, done_steps, active")
        for name, kind in kinds.items():
            got = state[name]
            if type(got) is not np.ndarray or got.shape != (num_envs,) or got.dtype != np.dtype(kind):
                raise envstate.EnvStateError(f"env state: recorder's {name} is not {np.dtype(kind)}[{num_envs}]")
        return state

    def set_state(self, state: Any) -> None:
        """Continue the episodes of ``state()`` as read back from a checkpoint (checked here)."""
        state = self.check_state(state, self.num_envs)
        for name in state:
            getattr(self, name)[:] = state[name]
        self.n, self.frags = 0, []
        self.current[:] = -1
        for e in np.flatnonzero(self.active).tolist():
            self._new_fragment(e, reset=False)

    def skip_current(self, global_step: int) -> None:
        """The envs are mid-episode and their beginnings were not recorded (recording starts at a
        resume whose checkpoint carried no recorder state): record from each env's next reset.
        Their seeds and episode counts are unknown here: seed -1, episodes numbered from 0 at
        the first recorded one, identified by ``global_step`` (this segment's start)."""
        self.seed[:] = -1
        self.seed_step[:] = global_step
        self.index[:] = 0
        self.active[:] = False
        self.current[:] = -1
        self.frags = []


def _size(path: str) -> int:
    return os.path.getsize(path)


def identity(cfg: Config, info: envs.EnvInfo) -> dict[str, Any]:
    """What every run appending to one recording must share (``recording.IDENTITY``)."""
    K = info.frame_stack
    return {
        "env_id": cfg.env_id,
        "obs_shape": list(info.obs_shape[1:] if K else info.obs_shape),  # as stored: one frame per row
        "obs_dtype": np.dtype(info.obs_dtype).name,
        "frame_stack": K,
        "n_actions": int(info.n_actions),
        "seed": cfg.seed,
    }


def manifest(cfg: Config, info: envs.EnvInfo, versions: dict[str, str]) -> dict[str, Any]:
    """What the manifest says about the whole recording: how the data was made, for the exported
    datasets' metadata. Makes one env (rank 0, at start) for its observation space's bounds."""
    env = envs.make_env(cfg.env_id, envs.atari_options(cfg))
    try:
        space = env.observation_space
        low, high = np.asarray(space.low), np.asarray(space.high)  # type: ignore[attr-defined]  # a Box (inspect_env)
        box = {"type": "Box", "dtype": str(space.dtype), "shape": list(low.shape),  # as minari serialises a Box
               "low": low.tolist(), "high": high.tolist()}  # fmt: skip
    finally:
        env.close()
    return {
        "format": recording.FORMAT,
        "version": recording.VERSION,
        **identity(cfg, info),
        "env_spec": envs.spec_json(cfg.env_id),  # the registered env's EnvSpec (JSON), None if not serialisable
        "observation_space": box,
        "env_obs_shape": list(info.obs_shape),  # what the agent saw (K stacked frames for Atari)
        "atari": bool(info.atari),
        "atari_preprocessing": {
            "noop_max": cfg.noop_max,
            "frame_skip": 4,
            "screen_size": 84,
            "grayscale": True,
            "sticky_actions": cfg.sticky_actions,
        }
        if info.atari
        else None,  # fmt: skip
        "epsilon_schedule": {
            "kind": "linear over global env steps",
            "start": cfg.eps_start,
            "end": cfg.eps_end,
            "decay_steps": cfg.eps_decay_steps,
        },  # fmt: skip
        "reward": "as the env gave it (unclipped; --clip-rewards applies to training only)",
        "versions": versions,
        "config": cfg.to_dict(),  # the first segment's; each segment has its own
        "segments": [],
    }


def prepare(cfg: Config, info: envs.EnvInfo, world_size: int, start_step: int, collector: Any,
            versions: dict[str, str]) -> tuple[str, bool]:  # fmt: skip
    """Rank 0: ready --record-episodes' directory for a run at (resumed) ``start_step`` whose
    ``collector`` is set up (its env seeds go into the manifest's segment): ``recording.prepare``'s
    note for the log and whether the recording continues there."""
    seeds = seeds_note(cfg, collector.fresh, collector.seed_step)
    segment = recording.new_segment(start_step, world_size, cfg.to_dict(), seeds)
    segment["env_backend"] = versions.pop("env_backend", "")
    made = manifest(cfg, info, versions)
    return recording.prepare(cfg.record_episodes, made, segment, bool(cfg.resume), cfg.overwrite)


def seeds_note(cfg: Config, fresh: bool, seed_step: int) -> str:
    """How the env shards of a (re)started segment were seeded, for the manifest."""
    if not fresh:
        return "env shards restored from the checkpoint's env states (episodes continue)"
    return f"env i of rank r reset with seed {cfg.seed + seed_step} + r * {cfg.num_envs_per_rank} + i"
