"""The collector of one rank: its env shard, ε-greedy acting, n-step assembly into its own
replay, episode statistics, and its state for checkpoints. It never sends data: experience
stays on the rank that collected it (a checkpoint streams the replay to rank 0 through
``mpirl.checkpoint``, driven by the trainer).

Per vector step (``step``): ε-greedy actions for the whole shard from this rank's own
``np.random.Generator`` (one forward pass of the greedy policy, skipped when every env
explores; the RNG draws are the same either way), one env step, the episode bookkeeping of
gymnasium's next-step autoreset (``envs.EpisodeTracker``: the step after an episode's end is
a reset, not a transition), optional reward clipping and life-loss terminals (training only:
episode returns stay game scores), then the n-step transitions that step completed go into
the replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from mpirl import envs, envstate, frame_replay, recorder, replay, watchdog
from mpirl.config import Config

GreedyPolicy = Callable[[np.ndarray], np.ndarray]  # observations (E, *obs_shape) -> actions (E,)
_PICKLE_PROTO = b"\x80"  # first byte of a pickle of protocol >= 2: schema 1's env state (protocol 4)


@dataclass
class EpisodeStats:
    """Episodes this rank finished: a cumulative count, and sums over the current progress
    window (since the trainer last took them for a progress line). Per rank, not global."""

    episodes: int = 0  # finished on this rank since the run started (resumes with the run)
    window_return_sum: float = 0.0  # game scores
    window_length_sum: float = 0.0  # env steps
    window_episodes: int = 0
    # Each episode finished since the trainer last took them (``take_finished``), for the run's
    # episode log: (global env steps at its end, env index, return, length). Never checkpointed:
    # the trainer takes them at every progress line and before every checkpoint.
    finished: list[tuple[int, int, float, int]] = field(default_factory=list, compare=False)

    def add(self, returns: list[float], lengths: list[int], env_ids: Sequence[int] = (), global_step: int = 0) -> None:
        self.episodes += len(returns)
        self.window_return_sum += sum(returns)
        self.window_length_sum += sum(lengths)
        self.window_episodes += len(returns)
        self.finished += [(global_step, int(e), float(r), int(n)) for e, r, n in zip(env_ids, returns, lengths)]

    def take_finished(self) -> list[tuple[int, int, float, int]]:
        """The episodes finished since the last call (which starts anew)."""
        out, self.finished = self.finished, []
        return out

    def take_window(self) -> tuple[float, float, float]:
        """(return sum, length sum, episodes) of the window, which starts anew."""
        out = (self.window_return_sum, self.window_length_sum, float(self.window_episodes))
        self.window_return_sum = self.window_length_sum = 0.0
        self.window_episodes = 0
        return out

    def to_meta(self) -> list[float]:
        """Checkpoint schema 1's ``win``: the window's sums, then the loss window's sum and count,
        which are always 0 here (the trainer flushes losses into each progress line)."""
        return [self.window_return_sum, self.window_length_sum, float(self.window_episodes), 0.0, 0.0]

    @classmethod
    def from_meta(cls, episodes: int, win: list[float]) -> EpisodeStats:
        return cls(int(episodes), float(win[0]), float(win[1]), int(win[2]))


@dataclass
class CollectorState:
    """A collector's part of a checkpoint: small JSON-able facts, replay arrays, env state."""

    replay_state: dict[str, Any]  # ring position, size, (PER: max priority)
    numpy_rng: Mapping[str, Any]  # bit generator state
    stats: EpisodeStats
    replay_arrays: dict[str, np.ndarray]  # empty when checkpoint_replay is off
    env_state: bytes  # mpirl.envstate.pack of the env shard; empty when it could not be captured


class Collector:
    """One rank's env shard, replay buffer, n-step accumulator and RNG."""

    def __init__(
        self, cfg: Config, info: envs.EnvInfo, rank: int, env_backend: str = "gymnasium", env_threads: int = 1
    ) -> None:
        """``env_backend``: gymnasium or envpool (``envs.choose_backend``); ``env_threads``:
        EnvPool's threads for this rank's envs (its cores)."""
        self.cfg, self.rank, self.env_backend = cfg, rank, env_backend
        self.n_actions = info.n_actions
        E = cfg.num_envs_per_rank
        self.vec = envs.make_vector(cfg.env_id, E, envs.atari_options(cfg), env_backend, env_threads)
        self.rng = np.random.default_rng([cfg.seed, rank])  # own generator; no global RNG relied on
        # Frame stacks are stored as references to single frames (see frame_replay.FrameStackReplay).
        K = info.frame_stack
        shape, dtype = ((K,), np.dtype(np.int64)) if K else (info.obs_shape, info.obs_dtype)
        if cfg.prioritized:
            inner: replay.ReplayBuffer = replay.PrioritizedReplayBuffer(
                cfg.buffer_size_per_rank, shape, dtype, cfg.gamma, cfg.per_alpha, cfg.per_eps
            )
        else:
            inner = replay.ReplayBuffer(cfg.buffer_size_per_rank, shape, dtype, cfg.gamma)
        self.frames: Optional[frame_replay.FrameStackReplay] = (
            frame_replay.FrameStackReplay(inner, info.obs_shape[1:], E, cfg.n_step) if K else None
        )
        self.replay: replay.Replay = inner if self.frames is None else self.frames
        self.clip_rewards = cfg.clip_rewards == "on" or (cfg.clip_rewards == "auto" and info.atari)
        self.life_loss = cfg.terminal_on_life_loss
        self.info = info
        self.recorder: Optional[recorder.Recorder] = None  # with --record-episodes (start_recording)
        self._saved_record: Optional[Any] = None  # a checkpoint's recorder state, until recording starts
        self.explored = np.zeros(E, dtype=bool)  # which of the last actions were random (epsilon)
        self._reset(envs.shard_seeds(cfg.seed, rank, E))
        self.nstep = replay.NStepAccumulator(E, cfg.n_step, cfg.gamma)
        self.tracker = envs.EpisodeTracker(E)
        self.stats = EpisodeStats()
        self._import: dict[str, Any] = {}

    @staticmethod
    def replay_bytes(cfg: Config, info: envs.EnvInfo) -> int:
        """Bytes the replay of one rank will hold (per rank, allocated at construction): checked
        against the node's memory before any rank allocates (``jobcheck.memory_shortfall``)."""
        C, E, K = cfg.buffer_size_per_rank, cfg.num_envs_per_rank, info.frame_stack
        row = int(np.prod(info.obs_shape, dtype=np.int64)) * np.dtype(info.obs_dtype).itemsize
        obs_row = K * 8 if K else row  # frame references (int64), or whole observations
        total = C * (2 * obs_row + 8 + 4 + 1 + 1 + 1)  # obs, next_obs, action, reward, steps, 2 flags
        if cfg.prioritized:
            total += 2 * 2 * (1 << max(0, (C - 1).bit_length())) * 8  # sum and min trees, float64
        if K:  # the frame ring (frame_replay.FrameStackReplay)
            total += (C + C // 8 + E * (cfg.n_step + 2 * K + 2)) * (row // K)
        return total

    def _reset(self, seeds: list[int], seed_step: int = 0) -> None:
        obs, infos = self.vec.reset(seed=seeds)  # one seed per env
        self.env_seeds, self.seed_step, self.fresh = seeds, seed_step, True  # for the recorder
        self.obs = obs  # what the network sees: (E, *obs_shape)
        self.keys = self._encode(obs)  # what transitions store: obs, or frame references
        self.lives = np.asarray(infos.get("lives", np.zeros(len(obs))))

    def _encode(self, obs: np.ndarray) -> np.ndarray:
        return self.frames.encode_obs(obs) if self.frames is not None else obs

    @property
    def frame_stacked(self) -> bool:
        """Does the replay hold frame references (which cannot move between shards)?"""
        return self.frames is not None

    def act(self, greedy: GreedyPolicy, epsilon: float) -> np.ndarray:
        """ε-greedy actions for the whole shard, the greedy ones in one batched forward pass."""
        n = len(self.obs)
        explore = self.rng.random(n) < epsilon
        self.explored = explore
        random_actions = self.rng.integers(0, self.n_actions, size=n)
        if explore.all():  # skip the forward pass; same RNG draws either way
            return random_actions
        return np.where(explore, random_actions, greedy(self.obs))

    def step(self, greedy: GreedyPolicy, epsilon: float, global_step: int = 0) -> None:
        """One vector step of this rank's shard; stores the n-step transitions it completes.
        ``global_step``: the global env steps the job has after this step (it stamps the
        episode log and the recording; 0 where nobody reads them)."""
        watchdog.beat("env step")  # a heartbeat per vector step: an env that never returns is named
        actions = self.act(greedy, epsilon)
        next_obs, rewards, terminated, truncated, infos = self.vec.step(actions)
        valid, fin_r, fin_l = self.tracker.step(rewards, terminated, truncated)  # game scores
        ends = terminated
        if self.life_loss and "lives" in infos:
            lives = np.asarray(infos["lives"])
            ends = terminated | (valid & (lives < self.lives))  # ends the return, not the game
            self.lives = lives
        next_keys = self._encode(next_obs)
        stored = np.sign(rewards) if self.clip_rewards else rewards
        ready = self.nstep.push(self.keys, actions, stored, next_keys, ends, truncated, valid)
        if ready is not None:
            self.replay.add(ready)
        if fin_r:
            self.stats.add(fin_r, fin_l, self.tracker.finished(), global_step)
        if self.recorder is not None:  # the rewards as the env gave them (unclipped)
            self.recorder.step(
                actions, rewards, terminated, truncated, valid, next_obs, epsilon, self.explored, global_step
            )
        self.obs, self.keys, self.fresh = next_obs, next_keys, False

    def start_recording(
        self, directory: str, global_step: int, continuing: bool = True, limit_bytes: int = recorder.LIMIT_BYTES
    ) -> None:
        """Record this rank's episodes into ``directory`` from now on (after any restore, at
        ``global_step``; ``limit_bytes``: rows held before they are written). The envs' current
        episodes are recorded when they began here (a fresh reset), or when their checkpoint
        carried the recorder's state and the directory holds their beginnings (``continuing``);
        otherwise from each env's next reset."""
        E, info = self.cfg.num_envs_per_rank, self.info
        attrs = {"env_id": self.cfg.env_id, "obs_dtype": info.obs_dtype.name, "segment": global_step}
        rec = recorder.Recorder(directory, self.rank, E, info.obs_shape, info.obs_dtype, info.frame_stack, attrs,
                                limit_bytes)  # fmt: skip
        if self._saved_record is not None and continuing:
            rec.set_state(self._saved_record)
        elif self.fresh:
            rec.begin(self.obs, self.env_seeds, self.seed_step)
        else:
            rec.skip_current(global_step)
        self.recorder, self._saved_record = rec, None

    def close(self) -> None:
        """Close the envs; write the recorder's last rows (those after the last checkpoint)."""
        if self.recorder is not None:
            self.recorder.flush()
        self.vec.close()

    # --- checkpoints ------------------------------------------------------------------------
    def state(self) -> CollectorState:
        """This collector's part of a checkpoint (the replay arrays only with checkpoint_replay).
        A recording writes its rows first, so the checkpoint's step divides its chunks, and its
        in-flight episodes go with the env state that continues them."""
        if self.recorder is not None:
            self.recorder.flush()
        vec_state = envs.vector_state(self.vec)
        env_blob = b""
        if vec_state is not None:  # data only (mpirl.envstate): loading it runs no code from the file
            tree = {
                "vec": vec_state,
                "obs": self.obs,
                "keys": self.keys,
                "lives": self.lives,
                "tracker": self.tracker.state(),
                "nstep": self.nstep.state(),
            }
            if self.recorder is not None:
                tree["record"] = self.recorder.state()
            env_blob = envstate.pack(tree)
        arrays = self.replay.export_arrays() if self.cfg.checkpoint_replay else {}
        return CollectorState(self.replay.state(), self.rng.bit_generator.state, self.stats, arrays, env_blob)

    def begin_restore(self, total_rows: int, metas: list[dict[str, Any]]) -> None:
        """Restore, first call: ``total_rows`` replay rows will arrive, from the shards of ``metas``."""
        self._import = {"metas": metas, "total": total_rows, "env": bytearray()}
        self.replay.begin_import(total_rows)

    def restore_rows(self, name: str, first: int, chunk: np.ndarray) -> None:
        """Restore: one chunk of a replay field (or of the packed env state, 'env_state')."""
        if name == "env_state":
            self._import["env"] += chunk.tobytes()
        else:
            self.replay.import_rows(name, first, chunk)

    def end_restore(self, same_world: bool, global_steps: int) -> tuple[str, Optional[dict[str, Any]]]:
        """Restore, last call. At the same world size this rank took its own shard back: its RNG,
        statistics and (when saved) env states resume exactly. Otherwise, or without saved env
        states, the envs and RNG start fresh, seeded apart from the first run's by the step
        count. Returns a note for the log and the taken shard's meta (None if not the same
        world size), whose remaining fields (torch RNG) the caller restores. Raises
        envstate.EnvStateError (one line, this rank only) for a malformed env state."""
        got, self._import = self._import, {}
        metas = got["metas"]
        self.replay.end_import(got["total"], metas[0]["replay"] if same_world and metas else None)
        meta = metas[0] if same_world and metas else None
        note = ""
        if meta is not None:
            self.rng.bit_generator.state = meta["numpy_rng"]
            self.stats = EpisodeStats.from_meta(meta["episodes"], meta["win"])
            blob = bytes(got["env"])
            if blob and not envstate.has_magic(blob) and blob[:1] == _PICKLE_PROTO:
                # A schema-1 checkpoint's pickle: never unpickled (it could run any code).
                note = "env state in the old pickle form is not loaded: env shards restart; replay and weights restored"
            elif blob and self.env_backend == "envpool":
                note = "gymnasium env states cannot go into EnvPool envs: env shards restart; replay, weights restored"
            elif blob:
                self._restore_envs(envstate.unpack(blob))
                return "exact resume: replay, RNG and env states restored", meta
            elif self.env_backend == "envpool":
                note = ("EnvPool envs cannot be snapshotted: env shards restart with new episodes; weights, optimizer, "
                        "replay and counters restored exactly")  # fmt: skip
            else:
                note = "env states were not saved (no data encoding): env shards restart; replay and weights restored"
        if meta is None:  # another world size: count each old shard's episodes once (on its first taker)
            self.stats = EpisodeStats(episodes=sum(int(m["episodes"]) for m in metas if m.get("first_piece", True)))
        cfg, E = self.cfg, self.cfg.num_envs_per_rank
        self.rng = np.random.default_rng([cfg.seed, self.rank, global_steps])
        self._reset(envs.shard_seeds(cfg.seed + global_steps, self.rank, E), seed_step=global_steps)
        self.tracker = envs.EpisodeTracker(E)
        self.nstep = replay.NStepAccumulator(E, cfg.n_step, cfg.gamma)
        return note, meta

    def _restore_envs(self, state: Any) -> None:
        """Put an unpacked env state (data from a file, checked here) into this collector."""
        keys = {"vec", "obs", "keys", "lives", "tracker", "nstep"}
        if type(state) is not dict or not keys <= set(state) or not set(state) <= keys | {"record"}:
            raise envstate.EnvStateError("env state: not a collector's env state")
        for name in ("obs", "keys", "lives"):
            mine, got = getattr(self, name), state[name]
            if type(got) is not np.ndarray or got.shape != mine.shape or got.dtype != mine.dtype:
                raise envstate.EnvStateError(f"env state: {name} is not {mine.dtype}{list(mine.shape)}")
        pending = state["nstep"]
        if type(pending) is not list or len(pending) != self.nstep.num_envs:
            raise envstate.EnvStateError(f"env state: n-step queues are not a list of {self.nstep.num_envs}")
        for queue in pending:
            if (
                type(queue) is not list
                or len(queue) >= self.nstep.n
                or not all(_nstep_entry(x, self.keys[0]) for x in queue)
            ):
                raise envstate.EnvStateError("env state: an n-step queue is not a list of (obs, action, reward)")
        saved = state.get("record")  # the recorder's episodes (a recorded run's checkpoint)
        saved = None if saved is None else recorder.Recorder.check_state(saved, self.nstep.num_envs)
        tracker = envs.EpisodeTracker(self.nstep.num_envs)
        tracker.set_state(state["tracker"])
        envs.restore_vector_state(self.vec, state["vec"])  # checks all, then changes the envs
        self.obs, self.keys, self.lives, self.tracker = state["obs"], state["keys"], state["lives"], tracker
        self.nstep.set_state(pending)
        self.fresh, self._saved_record = False, saved


def _nstep_entry(x: Any, like: np.ndarray) -> bool:
    """Is ``x`` one pending n-step step: (obs or frame keys shaped ``like``, action, reward)?"""
    return (
        type(x) is tuple
        and len(x) == 3
        and type(x[0]) is np.ndarray
        and x[0].shape == like.shape
        and x[0].dtype == like.dtype
        and type(x[1]) is int
        and type(x[2]) is float
    )
