"""Synchronous data-parallel DQN: the training loop behind ``python -m mpirl.train``.

Launch:
    python -m mpirl.train                                   # 1 process, world size 1
    mpirun -np 2 python -m mpi4py -m mpirl.train            # 2 ranks on this machine
    mpirun -np 8 --oversubscribe python -m mpi4py -m mpirl.train --env CartPole-v1
    srun --mpi=pmix python -m mpi4py -m mpirl.train ...      # inside a SLURM allocation
``python -m mpi4py`` makes an uncaught exception on one rank abort the whole job.

Weak scaling: every rank steps its own ``num_envs_per_rank`` envs, fills its own replay
buffer and contributes ``batch_size_per_rank`` samples to each global update, so N ranks
collect N times the experience per update and average N times as many samples per gradient.
The learning rate follows ``--lr-scaling`` (default: unchanged). Only gradients and a few
metric scalars travel between ranks; all ranks apply the same averaged gradient and so hold
identical weights after every update.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from mpirl import algo, checkpoint, dist, envs, model, replay
from mpirl.config import Config, ConfigError, parse_args
from mpirl.metrics import MetricsWriter


@dataclass
class Summary:
    """What a run did, identical on every rank (global figures)."""

    env_id: str
    run_dir: str
    world_size: int
    global_env_steps: int
    updates: int
    episodes: int
    wall_time_s: float  # training loop, slowest rank
    final_eval_mean: float  # NaN when no final evaluation ran
    final_eval_std: float
    final_eval_episodes: int
    target_return: Optional[float]
    solved: bool  # final evaluation mean >= target_return
    stopped_early: bool  # a periodic evaluation reached target_return
    preempted: bool  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint
    checkpoint_s: float  # seconds spent writing checkpoints (slowest rank), within wall_time_s
    skipped_updates: int  # updates skipped because the averaged gradient was NaN/inf
    param_checksum: float  # float64 sum of the online parameters (same on every rank)
    replicas_identical: bool  # the checksum's min and max over ranks agree

    def line(self) -> str:
        ev = "no final evaluation"
        if self.final_eval_episodes:
            ev = f"greedy eval {self.final_eval_mean:.1f} ± {self.final_eval_std:.1f}"
            ev += f" over {self.final_eval_episodes} episodes"
        target = (
            ""
            if self.target_return is None
            else f" (target {self.target_return:g}: {'solved' if self.solved else 'not solved'})"
        )
        return (
            f"mpirl: done: {self.env_id}, {self.world_size} rank(s), {self.global_env_steps:,} env steps, "
            f"{self.updates:,} updates, {self.episodes:,} episodes in {self.wall_time_s:.1f} s; {ev}{target}"
        )


def atari_options(cfg: Config) -> envs.AtariOptions:
    """The env preprocessing the config asks for (applied to ALE games only)."""
    return envs.AtariOptions(frame_stack=cfg.frame_stack, noop_max=cfg.noop_max, sticky_actions=cfg.sticky_actions)


def _default_run_dir(cfg: Config) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{cfg.env_id.replace('/', '_')}-s{cfg.seed}-{stamp}")


def _probe_writable(path: str) -> None:
    """Write, fsync and remove a 1 MiB file: a read-only or full file system fails here, at
    start-up, rather than at the first checkpoint hours later."""
    probe = os.path.join(path, f".mpirl-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def _checkpoint_bytes_estimate(cfg: Config, replay_bytes_per_rank: int, world_size: int) -> int:
    """Upper bound of one checkpoint with full replay buffers (before compression)."""
    return replay_bytes_per_rank * world_size if cfg.checkpoint_replay else 0


def _agree(result: tuple[Any, str], name: str) -> Any:
    """Collective: rank 0's (value, error) on every rank; raises ConfigError(error) everywhere."""
    value, err = dist.broadcast_object(result, name=name)  # HVD: rank 0 decides, all learn it
    if err:
        raise ConfigError(err)
    return value


def _choose_run_dir(cfg: Config, rank: int) -> str:
    """Collective: rank 0 picks the run directory (creating nothing yet); all ranks get it."""
    result: tuple[str, str] = ("", "")
    if rank == 0:
        path = os.path.abspath(cfg.run_dir or _default_run_dir(cfg))
        if os.path.exists(os.path.join(path, "config.json")) and not (cfg.overwrite or cfg.resume):
            result = (
                "",
                f"run directory {path} already holds a run; pass --overwrite, --resume auto or another --run-dir",
            )
        else:
            result = (path, "")
    return str(_agree(result, "mpirl.run_dir"))


def _create_run_dir(cfg: Config, rank: int, path: str, replay_bytes: int, world_size: int) -> None:
    """Collective: rank 0 creates and probes the run directory and writes config.json."""
    result: tuple[None, str] = (None, "")
    if rank == 0:
        try:
            os.makedirs(path, exist_ok=True)
            _probe_writable(path)
            with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as fh:
                json.dump(cfg.to_dict(), fh, indent=2)
            need, free = _checkpoint_bytes_estimate(cfg, replay_bytes, world_size), shutil.disk_usage(path).free
            if need > free:
                print(
                    f"mpirl: warning: {path} has {free / 2**30:.1f} GiB free; full replay buffers make checkpoints "
                    f"of up to {need / 2**30:.1f} GiB before compression",
                    file=sys.stderr,
                    flush=True,
                )
        except OSError as exc:
            result = (None, f"run directory {path} is not usable: {exc.strerror or exc}")
    _agree(result, "mpirl.run_dir.create")


class CheckpointWriteError(dist.AgreedError):
    """The run's last checkpoint failed (disk full, ...): the job ends non-zero, on every rank."""

    exit_code = 4


class NonFiniteError(dist.AgreedError):
    """Too many consecutive non-finite gradients; raised on every rank at the same update."""


class Agent:
    """Online and target networks, the wrapped optimizer and the update rule of one rank."""

    def __init__(self, cfg: Config, info: envs.EnvInfo, ctx: dist.DistContext) -> None:
        self.cfg = cfg
        self.device = ctx.device
        self.n_actions = info.n_actions
        # Initial weights: rank 0's, broadcast; the seed only makes rank 0's reproducible.
        torch.manual_seed(cfg.seed)
        self.online = model.build(info.obs_shape, info.n_actions, cfg.hidden_sizes, cfg.dueling).to(self.device)
        dist.broadcast_model(self.online)  # HVD: rank 0's initial weights to all
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        # fused: one kernel for all parameters; per-tensor Adam was the largest cost of an update.
        base = torch.optim.Adam(self.online.parameters(), lr=cfg.lr_for(ctx.size), eps=cfg.adam_eps, fused=True)
        self._params = list(self.online.parameters())
        # --sync-every K > 1 (local SGD): a plain Adam applies each rank's own gradients and
        # sync_replicas() averages the replicas every K updates. One rank has nobody to average
        # with, so it takes the K = 1 path: the same code and results as --sync-every 1.
        self.local_sgd = cfg.sync_every > 1 and ctx.size > 1
        # One rank has nobody to average with either: it skips Horovod's optimizer, whose
        # background cycle would only add latency to every update (benchmarks/throughput.py).
        self.allreduce_gradients = ctx.size > 1 and not self.local_sgd
        # A plain Adam, or Horovod's DistributedOptimizer around it. A fresh Adam is identical on
        # every rank already; see dist.broadcast_optimizer.
        self.optimizer: Any = (
            dist.wrap_optimizer(base, self.online, cfg.fp16_allreduce, cfg.backward_passes_per_step)
            if self.allreduce_gradients
            else base
        )
        if self.local_sgd:
            # Create Adam's state (zero moments, step 0) now instead of at the first step(): a rank
            # whose first gradients were all non-finite would otherwise have no state to average and
            # pack a shorter buffer than its peers. load_state_dict puts `step` where fused Adam wants it.
            zero = {i: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                    for i, p in enumerate(self._params)}  # fmt: skip
            base.load_state_dict({"state": zero, "param_groups": base.state_dict()["param_groups"]})
        self.updates = 0  # applied updates (agreed: identical on every rank)
        self.skipped_updates = 0  # updates skipped for a non-finite averaged gradient (K > 1: on some rank)
        self.nonfinite_streak = 0
        # Local SGD only: update() calls since the last averaging (identical on every rank, since
        # every rank calls update() alike), and this rank's non-finite flag for each of them.
        self._since_sync = 0
        self._window_nonfinite = torch.zeros(cfg.sync_every, device=self.device)

    def restore(self, path: str, has_optimizer_state: bool, updates: int, is_root: bool) -> None:
        """Collective: rank 0 loads the networks (and optimizer) from a checkpoint; every rank
        gets them by broadcast, or the same CheckpointError."""
        err = ""
        if is_root:
            try:
                checkpoint.load_module(path, "online", self.online)
                checkpoint.load_module(path, "target", self.target)
                if has_optimizer_state:
                    checkpoint.load_optimizer(path, self.optimizer)
            except checkpoint.CheckpointError as exc:
                err = str(exc)
        err = dist.broadcast_object(err, name="mpirl.resume.load")  # HVD: agree it loaded
        if err:
            raise checkpoint.CheckpointError(err)
        dist.broadcast_model(self.online)  # HVD: rank 0's restored weights to all
        dist.broadcast_model(self.target)  # HVD
        if has_optimizer_state:  # a fresh Adam is identical everywhere already (see dist)
            dist.broadcast_optimizer(self.optimizer)  # HVD
        self.updates = updates

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            # Page-locked staging (torch's caching host allocator reuses it) lets the copy run
            # asynchronously (DMA) while the host goes on queueing kernels.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions for a batch of observations."""
        return self.online(self._tensor(obs)).argmax(dim=1).cpu().numpy()

    def act(self, obs: np.ndarray, epsilon: float, rng: np.random.Generator) -> np.ndarray:
        """Epsilon-greedy actions for the whole shard, batched in one forward pass."""
        n = len(obs)
        explore = rng.random(n) < epsilon
        random_actions = rng.integers(0, self.n_actions, size=n)
        if explore.all():  # skip the forward pass; same RNG draws either way
            return random_actions
        return np.where(explore, random_actions, self.greedy(obs))

    def update(
        self,
        buffer: replay.Replay,
        rng: np.random.Generator,
        beta: float,
        overlap: Optional[Callable[[], None]] = None,
    ) -> torch.Tensor:
        """One global update: local TD gradients, averaged across ranks, clipped, applied. With
        local SGD (``sync_every > 1``): the local gradient, clipped and applied on this rank
        alone; every ``sync_every``-th call then averages the weights (see sync_replicas).

        ``overlap``: work to do while the gradient allreduce is in flight (the trainer steps
        the env shard there), after the backward pass and before the averaged gradient is
        waited for; it must not touch the online network's gradients or weights.

        Returns the mean local loss (a detached scalar tensor, not synchronised).
        """
        cfg = self.cfg
        passes = cfg.backward_passes_per_step
        total_loss = torch.zeros((), device=self.device)
        for _ in range(passes):
            b = buffer.sample(cfg.batch_size_per_rank, rng, beta)
            obs, next_obs = self._tensor(b.obs), self._tensor(b.next_obs)
            with torch.no_grad():
                next_q_target = self.target(next_obs)
                next_q_online = self.online(next_obs) if cfg.double_dqn else None
                targets = algo.td_targets(
                    self._tensor(b.rewards), self._tensor(b.discounts), next_q_target, next_q_online
                )
            loss, td = algo.td_loss(self.online(obs), self._tensor(b.actions), targets, self._tensor(b.weights))
            # Horovod sums nothing across passes itself; average them so the step size
            # does not depend on backward_passes_per_step.
            (loss / passes).backward()  # HVD (K = 1): hooks start the gradient allreduce (after the last pass)
            if cfg.prioritized:  # a device->host copy per update only where priorities exist
                buffer.update_priorities(b.indices, td.cpu().numpy())
            total_loss += loss.detach()
        if overlap is not None:
            overlap()  # runs while Horovod's background thread averages the gradients
        if self.local_sgd:
            self._local_step()
            return total_loss / passes
        if self.allreduce_gradients:
            self.optimizer.synchronize()  # HVD: wait for the averaged gradients
        # Same averaged gradient on every rank -> same norm, same clip, same finite check, so
        # every rank skips (or applies) an update alike without another collective.
        norm = self._clip_gradients()
        if not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad()
            self._count_skip("a non-finite averaged gradient", "weights unchanged since the last finite update")
            return total_loss / passes
        self.nonfinite_streak = 0
        if self.allreduce_gradients:
            with self.optimizer.skip_synchronize():
                self.optimizer.step()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()  # torch >= 2 sets grads to None
        self.updates += 1
        if self.updates % cfg.target_update_interval == 0:
            algo.update_target(self.target, self.online, cfg.tau)  # local, identical on all ranks
        return total_loss / passes

    def _count_skip(self, what: str, where: str) -> None:
        """Count one update skipped on every rank alike; raise NonFiniteError (on every rank) once
        ``max_nonfinite_updates`` were skipped in a row."""
        self.skipped_updates += 1
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= self.cfg.max_nonfinite_updates:
            raise NonFiniteError(
                f"{self.nonfinite_streak} updates in a row had {what} (NaN/inf in rewards, observations or the "
                f"loss?); stopped after {self.updates:,} updates, {where}; the latest checkpoint in the run "
                "directory is intact"
            )

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradients in place to ``max_grad_norm`` (0: no clip); return their L2 norm
        before clipping (non-finite when any gradient entry is NaN/inf)."""
        params = self._params
        if self.cfg.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)

    def _local_step(self) -> None:
        """Local SGD: apply this rank's own (clipped) gradient unless it is non-finite; average
        the replicas every ``sync_every``-th call.

        The skip must be agreed, yet the gradient is local. Agreeing at every update would take
        an allreduce per update, which costs about what the gradient allreduce that local SGD
        saves does (~0.25 ms for 1 KiB or 256 KiB at 2 ranks: latency-bound; see
        benchmarks/results/allreduce_cycle005.json). So a rank only withholds its own
        non-finite gradient (its weights stay finite) and flags the update; the flags ride in
        the averaging allreduce, where sync_replicas() counts an update as skipped on every rank
        when any rank flagged it, as K = 1 skips when the averaged gradient is non-finite.
        """
        if bool(torch.isfinite(self._clip_gradients())):
            self.optimizer.step()
        else:
            self._window_nonfinite[self._since_sync] = 1.0
        self.optimizer.zero_grad()
        self._since_sync += 1
        if self._since_sync == self.cfg.sync_every:
            self.sync_replicas()

    def sync_replicas(self) -> None:
        """Collective under local SGD (``--sync-every K > 1`` on several ranks): average the
        replicas, agree on the window's skipped updates, then update the target network.

        Afterwards every rank holds identical online weights and Adam state: the mean over
        ranks of the weights, of ``exp_avg`` and ``exp_avg_sq``, and of the step count. The
        moments are averaged too, not only the weights: otherwise each rank's Adam would keep
        its own history, a checkpoint (rank 0's optimizer) could not resume the run exactly,
        and the mean moments estimate the gradient statistics from N times the samples. The
        cost is 3x the bytes of the weights, once per K updates, in the same single allreduce.

        The window's updates are counted here (an update is skipped when some rank's local
        gradient was non-finite), so ``updates`` and the skip counters agree on every rank and
        lag by at most K - 1 in between; too long a non-finite streak raises NonFiniteError on
        every rank alike. The target network changes only here, from the averaged (identical)
        online weights: once if the window crossed a multiple of ``target_update_interval``,
        soft updates compounded over the crossings (tau' = 1 - (1 - tau)^crossings).

        A no-op (no collective) with K = 1, on one rank, or when no update happened since the
        last averaging: the window's length is the same on every rank, so all skip alike. The
        trainer calls it before every evaluation and checkpoint and at the end, so evaluated,
        saved and final weights are the consensus model and a resumed run continues exactly.
        """
        n = self._since_sync
        if not self.local_sgd or n == 0:
            return
        cfg = self.cfg
        states = [self.optimizer.state[p] for p in self._params]  # created in __init__, so never empty
        tensors = [*self._params, *(st[k] for st in states for k in ("exp_avg", "exp_avg_sq", "step"))]
        dist.average_tensors_([*tensors, self._window_nonfinite], name="mpirl.sync")  # HVD: one allreduce
        for st in states:
            st["step"].round_()  # a rank that skipped an update stepped once less; keep counts integral
        # Each flag is now the fraction of ranks whose i-th local gradient was non-finite.
        skipped = [f > 0 for f in self._window_nonfinite[:n].tolist()]
        self._window_nonfinite.zero_()
        self._since_sync = 0
        before = self.updates
        for skip in skipped:
            if not skip:
                self.updates += 1
                self.nonfinite_streak = 0
                continue
            self._count_skip("a non-finite gradient on some rank", "stopped at a weight averaging")
        crossings = self.updates // cfg.target_update_interval - before // cfg.target_update_interval
        if crossings:
            tau = 1.0 - (1.0 - cfg.tau) ** crossings
            algo.update_target(self.target, self.online, tau)  # local, from identical weights


def _evaluate_global(
    agent: Agent, cfg: Config, ctx: dist.DistContext, episodes: int, seed_base: int, name: str
) -> tuple[float, float, float]:
    """Collective: ``episodes`` greedy episodes split over ranks (episode i on rank i % size);
    returns the global (mean, std, min) return (game scores), identical on every rank."""
    agent.sync_replicas()  # HVD (local SGD): evaluate the averaged weights, the ones a checkpoint saves
    mine = [seed_base + i for i in range(ctx.rank, episodes, ctx.size)]
    rets = np.asarray(envs.evaluate(agent.greedy, cfg.env_id, mine, atari=atari_options(cfg)), dtype=np.float64)
    local_min = rets.min() if len(rets) else np.inf
    s = dist.allreduce_sum(np.array([rets.sum(), (rets**2).sum(), len(rets)]), name=name)  # HVD: allreduce
    lo, _ = dist.allreduce_min_max(float(local_min), name=name + ".min")  # HVD: allreduce
    n = max(s[2], 1.0)
    mean = s[0] / n
    std = math.sqrt(max(s[1] / n - mean**2, 0.0))
    return float(mean), float(std), float(lo)


def _crossed(step: int, step_size: int, interval: int) -> bool:
    """Did the last ``step_size`` steps up to ``step`` cross a multiple of ``interval``?"""
    return interval > 0 and step // interval > (step - step_size) // interval


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RankState:
    """Everything one rank owns besides the networks: env shard, current observations,
    replay buffer, n-step accumulator, episode tracker, its RNG and local counters."""

    def __init__(self, cfg: Config, info: envs.EnvInfo, ctx: dist.DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        E = cfg.num_envs_per_rank
        self.vec = envs.make_vector(cfg.env_id, E, atari_options(cfg))
        self.rng = np.random.default_rng([cfg.seed, ctx.rank])  # own generator; no global RNG relied on
        # Frame stacks are stored as references to single frames (see replay.FrameStackReplay).
        K = info.frame_stack
        shape, dtype = ((K,), np.dtype(np.int64)) if K else (info.obs_shape, info.obs_dtype)
        if cfg.prioritized:
            inner: replay.ReplayBuffer = replay.PrioritizedReplayBuffer(
                cfg.buffer_size_per_rank, shape, dtype, cfg.gamma, cfg.per_alpha, cfg.per_eps
            )
        else:
            inner = replay.ReplayBuffer(cfg.buffer_size_per_rank, shape, dtype, cfg.gamma)
        self.frames: Optional[replay.FrameStackReplay] = (
            replay.FrameStackReplay(inner, info.obs_shape[1:], E, cfg.n_step) if K else None
        )
        self.buffer: replay.Replay = inner if self.frames is None else self.frames
        self.clip_rewards = cfg.clip_rewards == "on" or (cfg.clip_rewards == "auto" and info.atari)
        self.life_loss = cfg.terminal_on_life_loss
        self._reset(envs.shard_seeds(cfg.seed, ctx.rank, E))
        self.nstep = replay.NStepAccumulator(E, cfg.n_step, cfg.gamma)
        self.tracker = envs.EpisodeTracker(E)
        self.episodes = 0  # episodes finished on this rank
        self.win = np.zeros(5)  # progress window: sum return, sum length, episodes, sum loss, loss count

    def _reset(self, seeds: list[int]) -> None:
        obs, infos = self.vec.reset(seed=seeds)  # type: ignore[arg-type]  # one seed per env
        self.obs = obs  # what the network sees: (E, *obs_shape)
        self.keys = self._encode(obs)  # what transitions store: obs, or frame references
        self.lives = np.asarray(infos.get("lives", np.zeros(len(obs))))

    def _encode(self, obs: np.ndarray) -> np.ndarray:
        return self.frames.encode_obs(obs) if self.frames is not None else obs

    def step(self, actions: np.ndarray) -> None:
        """One vector step of this rank's shard; stores the n-step transitions it completes."""
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
            self.buffer.add(ready)
        if fin_r:
            self.episodes += len(fin_r)
            self.win[0] += sum(fin_r)
            self.win[1] += sum(fin_l)
            self.win[2] += len(fin_r)
        self.obs, self.keys = next_obs, next_keys

    def snapshot(self) -> checkpoint.RankShard:
        """This rank's part of a checkpoint."""
        meta = {
            "rank": self.ctx.rank,
            "replay": self.buffer.state(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state().numpy().tobytes().hex(),
            "episodes": self.episodes,
            "win": self.win.tolist(),
        }
        vec_state = envs.vector_state(self.vec)
        env_blob = b""
        if vec_state is not None:
            env_blob = pickle.dumps(
                {
                    "vec": vec_state,
                    "obs": self.obs,
                    "keys": self.keys,
                    "lives": self.lives,
                    "tracker": self.tracker,
                    "nstep": self.nstep.state(),
                }
            )
        arrays = self.buffer.export_arrays() if self.cfg.checkpoint_replay else {}
        return checkpoint.RankShard(meta=meta, replay=arrays, env_state=env_blob)

    def restore(self, path: str, old_rows: list[int], global_steps: int) -> str:
        """Collective: take this rank's share of the saved shards. Returns a note for the log."""
        same = len(old_rows) == self.ctx.size
        got: dict[str, Any] = {"metas": [], "env": bytearray()}

        # Frame references cannot be split or merged across shards: at another world size a
        # frame-stack replay starts empty (weights, optimizer and counters still resume), so no
        # rows are sent at all.
        skip = self.frames is not None and not same

        def begin(total: int, metas: list[dict[str, Any]]) -> None:
            got["metas"], got["total"] = metas, total
            self.buffer.begin_import(total)

        def rows(name: str, first: int, chunk: np.ndarray) -> None:
            if name == "env_state":
                got["env"] += chunk.tobytes()
            else:
                self.buffer.import_rows(name, first, chunk)

        checkpoint.restore_shards(path, self.ctx, [0] * len(old_rows) if skip else old_rows, begin, rows)
        metas = got["metas"]
        self.buffer.end_import(got["total"], metas[0]["replay"] if same and metas else None)
        if same and metas:
            m = metas[0]
            self.rng.bit_generator.state = m["numpy_rng"]
            torch.set_rng_state(torch.from_numpy(np.frombuffer(bytes.fromhex(m["torch_rng"]), dtype=np.uint8).copy()))
            self.episodes, self.win = int(m["episodes"]), np.asarray(m["win"], dtype=np.float64)
            if got["env"]:
                blob = pickle.loads(bytes(got["env"]))
                envs.restore_vector_state(self.vec, blob["vec"])
                self.obs, self.keys, self.lives, self.tracker = (
                    blob["obs"],
                    blob["keys"],
                    blob["lives"],
                    blob["tracker"],
                )
                self.nstep.set_state(blob["nstep"])
                return "exact resume: replay, RNG and env states restored"
        # Another world size (or envs that could not be pickled): fresh envs and RNG, seeded
        # apart from the first run's by the step count.
        self.rng = np.random.default_rng([self.cfg.seed, self.ctx.rank, global_steps])
        self._reset(envs.shard_seeds(self.cfg.seed + global_steps, self.ctx.rank, self.cfg.num_envs_per_rank))
        self.tracker = envs.EpisodeTracker(self.cfg.num_envs_per_rank)
        self.nstep = replay.NStepAccumulator(self.cfg.num_envs_per_rank, self.cfg.n_step, self.cfg.gamma)
        if not same:
            moved = (
                "frame-stack replay starts empty"
                if skip
                else f"replay shards redistributed ({sum(old_rows):,} transitions)"
            )
            return f"world size changed {len(old_rows)} -> {self.ctx.size}: {moved}, env shards and RNGs start fresh"
        return "env states were not saved (not picklable): env shards restart; replay and weights restored"


class _Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption) set a flag; the
    ranks agree on it by a collective every CHECK_EVERY iterations and stop together."""

    CHECK_EVERY = 16
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum  # a second signal changes nothing: the stop is under way

    def agreed(self, iteration: int) -> bool:
        """Collective every CHECK_EVERY iterations (same iterations on every rank)."""
        if iteration % self.CHECK_EVERY:
            return False
        votes = dist.allreduce_sum(np.array([1.0 if self.signum else 0.0]), name="mpirl.preempt")  # HVD
        return bool(votes[0] > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def ignore_further(self) -> None:
        """Once a stop is agreed, ignore repeats at the OS level: Python resets its own handlers
        to the default (terminate) at interpreter exit, when a late repeat would still kill us."""
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)


def _resolve_resume(cfg: Config, ctx: dist.DistContext, run_dir: str, info: envs.EnvInfo) -> Optional[dict[str, Any]]:
    """Rank 0 finds and checks the checkpoint to resume from; every rank gets its header
    (None for a fresh start) or raises the same CheckpointError."""
    result: tuple[Optional[dict[str, Any]], str] = (None, "")
    if ctx.rank == 0 and cfg.resume:
        try:
            path = checkpoint.latest(run_dir) if cfg.resume == "auto" else cfg.resume
            if path is not None:
                header = checkpoint.read_header(path)
                mismatch = [
                    f"{what}: checkpoint {theirs}, this run {ours}"
                    for what, theirs, ours in (
                        ("env", header["env_id"], cfg.env_id),
                        ("observation shape", header["obs_shape"], list(info.obs_shape)),
                        ("actions", header["n_actions"], info.n_actions),
                    )
                    if theirs != ours
                ]
                if mismatch:
                    raise checkpoint.CheckpointError(f"{path} does not fit this run: {'; '.join(mismatch)}")
                result = (header, "")
        except checkpoint.CheckpointError as exc:
            result = (None, str(exc))
    agreed, err = dist.broadcast_object(result, name="mpirl.resume")  # HVD: agree on what to resume
    if err:
        raise checkpoint.CheckpointError(err)
    return agreed


def train(cfg: Config) -> Summary:
    """Train with ``cfg`` on every rank of the job (a plain process is a job of one rank).

    Call it on every rank (e.g. a script started with mpirun). Raises ConfigError,
    envs.EnvError or checkpoint.CheckpointError for bad input, on every rank alike, before
    any collective that could hang.
    """
    cfg.validate()
    envs.import_env_modules(cfg.env_modules)
    info = envs.inspect_env(cfg.env_id, atari_options(cfg))  # same outcome on every rank: fails before MPI collectives
    ctx = dist.init(cfg.device, cfg.torch_threads)
    if cfg.expect_world_size and ctx.size != cfg.expect_world_size:
        # Every process sees the same size, so all raise alike (N singletons raise on their own).
        raise ConfigError(
            f"this job has {ctx.size} rank(s), {cfg.expect_world_size} expected: the launcher and MPI did not "
            "wire up (with srun, pick the PMI your MPI was built with, e.g. srun --mpi=pmix)"
        )
    run_dir = _choose_run_dir(cfg, ctx.rank)
    is_root = ctx.rank == 0

    def log(msg: str) -> None:
        if is_root:
            print(msg, flush=True)

    target_return = cfg.target_return if cfg.target_return is not None else info.reward_threshold
    E, N = cfg.num_envs_per_rank, ctx.size
    steps_per_iter = E * N  # global env steps per vector step of every rank
    rs = RankState(cfg, info, ctx)
    agent = Agent(cfg, info, ctx)
    beta_steps = cfg.per_beta_steps or cfg.total_env_steps

    # Counters. Every control-flow decision below depends only on these (identical on all
    # ranks) or on the result of a collective, so no rank branches alone.
    global_steps = iteration = eval_round = 0
    warmup_from = 0  # iteration from which learning_starts_per_rank counts (reset by an empty resume)

    def warmed_up() -> bool:
        """Has this rank taken learning_starts_per_rank env steps since the (re)start of its replay?"""
        return (iteration - warmup_from) * E >= cfg.learning_starts_per_rank

    last_eval = float("nan")
    resume = _resolve_resume(cfg, ctx, run_dir, info)  # before creating anything: a bad file leaves no trace
    _create_run_dir(cfg, ctx.rank, run_dir, rs.buffer.nbytes, N)
    if resume is not None:
        agent.restore(resume["path"], resume["optimizer_has_state"], resume["updates"], is_root)
        c = resume["counters"]
        global_steps, iteration, eval_round = c["global_env_steps"], c["iteration"], c["eval_round"]
        warmup_from = int(c.get("warmup_from", 0))
        last_eval = c["last_eval"] if c["last_eval"] is not None else float("nan")
        if resume["world_size"] == N and c["steps_per_iter"] != steps_per_iter:
            raise ConfigError("--num-envs-per-rank differs from the checkpoint's; keep it to resume exactly")
        note = rs.restore(resume["path"], resume["shard_rows"], global_steps)
        fewest, _ = dist.allreduce_min_max(float(len(rs.buffer)), name="mpirl.resume.replay")  # HVD
        if fewest == 0:  # some rank's replay was not carried over: all warm up again, alike
            warmup_from = iteration
        log(f"mpirl: resumed from {resume['path']} at {global_steps:,} env steps, {agent.updates:,} updates; {note}")

    writer = MetricsWriter(run_dir, cfg.tensorboard) if is_root else None
    log(
        f"mpirl: {cfg.env_id} on {N} rank(s), device {ctx.device}, {E} envs/rank "
        f"({steps_per_iter} global env steps per iteration), global batch {cfg.global_batch_size(N)}, "
        f"lr {cfg.lr_for(N):g}, torch threads/rank {torch.get_num_threads()}, run dir {run_dir}"
    )

    checkpoint_s = 0.0  # time spent in save_checkpoint, this rank
    last_ckpt_error = ""  # the last save's error, identical on every rank

    def save_checkpoint() -> None:
        """Collective: rank 0 writes the job's state; a failure keeps the previous file."""
        agent.sync_replicas()  # HVD (local SGD): save averaged weights (and counters), identical on all ranks
        header = {
            "global_env_steps": global_steps,
            "updates": agent.updates,
            "env_id": cfg.env_id,
            "obs_shape": list(info.obs_shape),
            "n_actions": info.n_actions,
            "config": cfg.to_dict(),
            "counters": {
                "global_env_steps": global_steps,
                "iteration": iteration,
                "eval_round": eval_round,
                "last_eval": None if math.isnan(last_eval) else last_eval,
                "steps_per_iter": steps_per_iter,
                "warmup_from": warmup_from,
            },  # fmt: skip
        }
        nonlocal checkpoint_s
        if not model.all_finite(agent.online) or not model.all_finite(agent.target):
            # Identical weights on every rank -> every rank takes this branch alike.
            log("mpirl: warning: weights are not finite; checkpoint not written, the previous one is kept")
            return
        t0 = time.perf_counter()
        path, err = checkpoint.save(
            run_dir, ctx, header, agent.online, agent.target, agent.optimizer, rs.snapshot(), cfg.keep_checkpoints
        )
        checkpoint_s += time.perf_counter() - t0
        nonlocal last_ckpt_error
        last_ckpt_error = err
        if err:
            log(f"mpirl: warning: {err}; the previous checkpoint is kept")
        else:
            log(f"ckpt  {global_steps:>9,} | {path} ({time.perf_counter() - t0:.2f} s)")

    preemption = _Preemption()
    preempted = stopped_early = False
    last_ckpt = global_steps
    loss_acc = torch.zeros((), device=ctx.device)
    loss_n = 0
    t_start = time.perf_counter()
    t_last, steps_last, updates_last = t_start, global_steps, agent.updates
    epsilon = algo.linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps, global_steps)

    while global_steps < cfg.total_env_steps:
        epsilon = algo.linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps, global_steps)

        def act_and_step(eps: float = epsilon) -> None:
            rs.step(agent.act(rs.obs, eps, rs.rng))

        # The training phase that the last env step made due runs now, overlapped with the
        # next env step: the shard steps while the gradient allreduce is in flight, so acting
        # uses the weights of one update earlier (benchmarks/throughput.py measures the gain).
        if warmed_up() and iteration % cfg.train_every == 0:
            beta = algo.linear_schedule(cfg.per_beta0, 1.0, beta_steps, global_steps)
            for g in range(cfg.gradient_steps):
                last = g == cfg.gradient_steps - 1
                loss_acc += agent.update(rs.buffer, rs.rng, beta, overlap=act_and_step if last else None)
                loss_n += 1
        else:
            act_and_step()
        iteration += 1
        global_steps += steps_per_iter

        if _crossed(global_steps, steps_per_iter, cfg.log_interval) or global_steps >= cfg.total_env_steps:
            rs.win[3] += float(loss_acc)
            rs.win[4] += loss_n
            loss_acc.zero_()
            loss_n = 0
            # HVD: one allreduce of the window sums and the cumulative episode count
            tot = dist.allreduce_sum(np.append(rs.win, rs.episodes), name="mpirl.metrics")
            rs.win[:] = 0
            now = time.perf_counter()
            sps = (global_steps - steps_last) / max(now - t_last, 1e-9)
            ups = (agent.updates - updates_last) / max(now - t_last, 1e-9)
            t_last, steps_last, updates_last = now, global_steps, agent.updates
            record = {
                "global_env_steps": global_steps,
                "updates": agent.updates,
                "episodes": int(tot[5]),
                "wall_time_s": now - t_start,
                "sps": sps,
                "updates_per_s": ups,
                "mean_return": tot[0] / tot[2] if tot[2] else float("nan"),
                "mean_length": tot[1] / tot[2] if tot[2] else float("nan"),
                "loss": tot[3] / tot[4] if tot[4] else float("nan"),
                "epsilon": epsilon,
                "eval_mean_return": last_eval,
            }
            if writer is not None:
                writer.write("train", record)
            eta = (cfg.total_env_steps - global_steps) / max(sps, 1e-9)
            log(
                f"step {global_steps:>9,}/{cfg.total_env_steps:,} | {sps:7,.0f} sps | {ups:6,.0f} upd/s | "
                f"return {record['mean_return']:7.1f} | loss {record['loss']:.4f} | eps {epsilon:.3f} | "
                f"eval {last_eval:6.1f} | eta {_fmt_time(eta)}"
            )

        if _crossed(global_steps, steps_per_iter, cfg.eval_interval) and warmed_up():
            seed_base = cfg.seed + 1_000_000 + eval_round * cfg.eval_episodes
            mean, std, lo = _evaluate_global(agent, cfg, ctx, cfg.eval_episodes, seed_base, name="mpirl.eval")
            eval_round += 1
            last_eval = mean
            if writer is not None:
                writer.write("eval", {"global_env_steps": global_steps, "updates": agent.updates,
                                      "eval_mean_return": mean, "eval_std_return": std, "eval_min_return": lo,
                                      "wall_time_s": time.perf_counter() - t_start})  # fmt: skip
            log(
                f"eval  {global_steps:>9,} | greedy return {mean:.1f} ± {std:.1f} (min {lo:.1f}) "
                f"over {cfg.eval_episodes} episodes"
            )
            if cfg.early_stop and target_return is not None and mean >= target_return:
                stopped_early = True  # same mean on every rank -> every rank stops here
                log(f"mpirl: evaluation reached the target return {target_return:g}; stopping")
                break

        if _crossed(global_steps, steps_per_iter, cfg.checkpoint_interval) and global_steps < cfg.total_env_steps:
            save_checkpoint()
            last_ckpt = global_steps

        if preemption.agreed(iteration):
            preempted = True
            preemption.ignore_further()
            log(f"mpirl: stop signal received; checkpointing at {global_steps:,} env steps, then exiting")
            break

    if last_ckpt != global_steps or resume is None or global_steps == 0:
        save_checkpoint()  # the end of the run (or of this allocation) is always on disk
    if not preempted:
        preemption.restore()
    wall = time.perf_counter() - t_start  # includes the final checkpoint
    rs.vec.close()
    if cfg.final_eval_episodes > 0 and not preempted:
        f_mean, f_std, _ = _evaluate_global(
            agent, cfg, ctx, cfg.final_eval_episodes, cfg.seed + 2_000_000, name="mpirl.final_eval"
        )
    else:
        f_mean, f_std = float("nan"), float("nan")
    episodes = int(dist.allreduce_sum(np.array([rs.episodes]), name="mpirl.episodes")[0])  # HVD
    _, wall = dist.allreduce_min_max(wall, name="mpirl.wall_time")  # HVD: the slowest rank's time
    _, checkpoint_s = dist.allreduce_min_max(checkpoint_s, name="mpirl.checkpoint_time")  # HVD
    agent.sync_replicas()  # HVD (local SGD): end on averaged weights (a no-op if nothing changed)
    checksum = model.parameter_checksum(agent.online)
    lo, hi = dist.allreduce_min_max(checksum, name="mpirl.checksum")  # HVD: replicas still identical?
    summary = Summary(
        env_id=cfg.env_id,
        run_dir=run_dir,
        world_size=N,
        global_env_steps=global_steps,
        updates=agent.updates,
        episodes=episodes,
        wall_time_s=wall,
        final_eval_mean=f_mean,
        final_eval_std=f_std,
        final_eval_episodes=0 if preempted else cfg.final_eval_episodes,
        target_return=target_return,
        solved=bool(target_return is not None and not math.isnan(f_mean) and f_mean >= target_return),
        stopped_early=stopped_early,
        preempted=preempted,
        checkpoint_s=checkpoint_s,
        skipped_updates=agent.skipped_updates,
        param_checksum=checksum,
        replicas_identical=lo == hi,
    )
    if writer is not None:
        writer.write("final", asdict(summary))
        writer.close()
        try:
            with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as fh:
                json.dump(asdict(summary), fh, indent=2)
        except OSError as exc:  # a full disk must not turn a finished run into a crash
            print(f"mpirl: warning: summary.json not written: {exc}", file=sys.stderr, flush=True)
    log(summary.line())
    if not summary.replicas_identical:
        log("mpirl: warning: ranks ended with different parameters (a non-deterministic GPU op?)")
    if last_ckpt_error:
        latest = checkpoint.latest(run_dir) if is_root else None
        raise CheckpointWriteError(
            f"the final checkpoint could not be written ({last_ckpt_error}); newest intact checkpoint: {latest}"
            if is_root
            else f"the final checkpoint could not be written ({last_ckpt_error})"
        )
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: exit 0 on success, 2 on bad input (every rank), abort on a crash."""

    def run() -> int:
        train(parse_args(argv))
        return 0

    return dist.run_or_abort(run, user_errors=(ConfigError, envs.EnvError, checkpoint.CheckpointError))
