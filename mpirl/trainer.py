"""Synchronous data-parallel DQN: ``fit(cfg)``, the training run behind ``python -m mpirl.train``.

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

Every rank issues the same collectives in the same order, each tagged ``# HVD:``/``# MPI:`` here.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from mpirl import (
    __version__,
    algo,
    checkpoint,
    dist,
    dryrun,
    envs,
    greedy_eval,
    jobcheck,
    model,
    preemption,
    recorder,
    recording,
    resume,
    rundir,
    watchdog,
)
from mpirl.collector import Collector
from mpirl.config import Config, ConfigError, parse_args
from mpirl.learner import Learner
from mpirl.metrics import MetricsWriter, fmt_time
from mpirl.records import CheckpointHeader, Counters, Summary

__all__ = ["CheckpointWriteError", "Summary", "fit", "main"]


class CheckpointWriteError(dist.AgreedError):
    """The run's last checkpoint failed (disk full, ...): the job ends non-zero, on every rank."""

    exit_code = 4


@dataclass
class RunState:
    """What the loop carries besides the learner and the collector: the saved counters, and
    what only this run needs. Identical on every rank, except the timers and the loss sums."""

    counters: Counters
    loss_sum: torch.Tensor  # this rank's losses since the last progress line (on the device)
    loss_n: int = 0
    stopped_early: bool = False  # a periodic evaluation reached the target return (and the final one did)
    final_eval: Optional[tuple[float, float]] = None  # (mean, std) of the final evaluation, run by an early stop
    preempted: bool = False  # a stop signal was agreed
    last_ckpt_step: int = 0  # global env steps of the latest checkpoint attempt
    last_ckpt_error: str = ""  # the latest save's error ("" if it worked)
    checkpoint_s: float = 0.0  # this rank's seconds in checkpoint saves
    last_ckpt_s: float = 0.0  # this rank's seconds in the latest checkpoint save
    t_start: float = field(default_factory=time.perf_counter)
    t_last: float = 0.0  # time, env steps and updates at the last progress line
    steps_last: int = 0
    updates_last: int = 0


@dataclass
class Run:
    """One rank's view of the job: options, place in the job, and the long-lived parts."""

    cfg: Config
    ctx: dist.DistContext
    info: envs.EnvInfo
    run_dir: str
    collector: Collector
    learner: Learner
    state: RunState
    target_return: Optional[float]
    writer: Optional[MetricsWriter] = None  # rank 0 only
    io_allowance_s: float = 0.0  # the stall watchdog's extra seconds for a checkpoint of the whole job

    def log(self, msg: str) -> None:
        """A line on rank 0's stdout (the other ranks stay quiet)."""
        if self.ctx.rank == 0:
            print(msg, flush=True)

    def warmed_up(self) -> bool:
        """Has each rank taken learning_starts_per_rank env steps since its replay (re)started?"""
        c = self.state.counters
        return (c.iteration - c.warmup_from) * self.cfg.num_envs_per_rank >= self.cfg.learning_starts_per_rank


def fit(cfg: Config) -> Summary:
    """Train with ``cfg`` on every rank of the job (a plain process is a job of one rank).

    Call it on every rank (e.g. a script started with mpirun). Raises ConfigError,
    envs.EnvError or checkpoint.CheckpointError for bad input, on every rank alike, before
    any collective that could hang. Returns the run's Summary (global figures, identical on
    every rank). A rank that makes no progress for ``cfg.stall_timeout`` seconds ends the job
    with exit code 5, naming itself and its phase (mpirl.watchdog).
    """
    # 1. Options and env, checked on every rank alike before MPI could hang on them; then agreed.
    cfg.validate()
    envs.import_env_modules(cfg.env_modules)
    info = envs.inspect_env(cfg.env_id, envs.atari_options(cfg))
    env_backend = envs.choose_backend(cfg.env_backend, cfg.env_id, info, envs.atari_options(cfg))
    ctx = dist.init(cfg.device, cfg.torch_threads, cfg.backend)
    counters = Counters(steps_per_iter=cfg.num_envs_per_rank * ctx.size)
    # From here on a rank that makes no progress ends the job; stopped on every way out of the run.
    with watchdog.running(cfg.stall_timeout, ctx.rank, dist.abort, counters.progress):
        return _run(cfg, info, env_backend, ctx, counters)


def _run(cfg: Config, info: envs.EnvInfo, env_backend: str, ctx: dist.DistContext, counters: Counters) -> Summary:
    """``fit`` after the backend started, under the stall watchdog: steps 1 (agreement) to 4."""
    memory = jobcheck.memory_shortfall(Collector.replay_bytes(cfg, info), ctx.local_size)  # before allocating
    bf16 = model.bf16_support(ctx.device) if cfg.precision == "bf16" else ("", "")
    gathered = dist.allgather_object((cfg.to_dict(), memory, bf16))  # MPI: every rank's options and verdicts, first
    jobcheck.same_everywhere(cfg, [options for options, _, _ in gathered])
    jobcheck.world(cfg, ctx.size, [verdict for _, verdict, _ in gathered])  # the same on every rank: all raise alike
    precision_warning = jobcheck.precision([verdict for _, _, verdict in gathered])

    # 2. Run directory, collector, learner and what to resume from: rank 0 decides, all learn it.
    run_dir = dist.rank0_decides(lambda: rundir.choose(cfg), name="mpirl.run_dir", errors=ConfigError)  # HVD
    collector = Collector(cfg, info, ctx.rank, env_backend, dist.cores_per_rank(ctx.local_size))
    learner = Learner(cfg, info.obs_shape, info.n_actions, ctx)  # HVD: broadcasts rank 0's weights
    target = cfg.target_return if cfg.target_return is not None else info.reward_threshold
    state = RunState(counters, loss_sum=torch.zeros((), device=ctx.device))
    run = Run(cfg, ctx, info, run_dir, collector, learner, state, target)
    stored = dist.rank0_decides(  # HVD: before creating anything, so a bad file leaves no trace
        lambda: resume.find(cfg, run_dir, info, ctx.size), name="mpirl.resume", errors=checkpoint.CheckpointError
    )
    if cfg.record_episodes:  # HVD: a recording this run cannot continue stops it before anything is created
        check = functools.partial(recording.check, cfg.record_episodes, recorder.identity(cfg, info), bool(cfg.resume),
                                  cfg.overwrite)  # fmt: skip
        dist.rank0_decides(check, name="mpirl.record.check", errors=ConfigError)
    replay_bytes = collector.replay.nbytes * ctx.size if cfg.checkpoint_replay else 0
    need = checkpoint.bytes_needed(replay_bytes, checkpoint.module_bytes(learner.online))
    run.io_allowance_s = watchdog.io_seconds(need)  # the same on every rank
    create = functools.partial(rundir.create, cfg, run_dir, need)
    dist.rank0_decides(create, name="mpirl.run_dir.create", errors=ConfigError)  # HVD: rank 0 creates it
    if stored is not None:
        with watchdog.allowance("checkpoint restore", run.io_allowance_s):
            for line in resume.restore(stored, ctx, learner, collector, counters):  # HVD + MPI: weights, replay shards
                run.log(line)

    if cfg.record_episodes:  # HVD: rank 0 readies the recording (drops chunks after this step) before any rank writes
        prepare = functools.partial(recorder.prepare, cfg, info, ctx.size, counters.global_env_steps, collector,
                                    {**_versions(), "env_backend": env_backend})  # fmt: skip
        note, continuing = dist.rank0_decides(prepare, name="mpirl.record", errors=ConfigError)
        run.log(note)
        collector.start_recording(cfg.record_episodes, counters.global_env_steps, continuing)

    # 3. Train: act and learn, with progress lines, evaluations, checkpoints and stop votes.
    resumed_at = None if stored is None else counters.global_env_steps
    run.writer = MetricsWriter(run_dir, cfg.tensorboard, resumed_at) if ctx.rank == 0 else None
    if ctx.note:
        run.log(f"mpirl: {ctx.note}")
    if precision_warning:
        run.log(f"mpirl: warning: {precision_warning}")
    run.log(
        f"mpirl: {cfg.env_id} on {ctx.size} rank(s), {dryrun.backend_words(ctx)}, device {ctx.device}, "
        f"{cfg.num_envs_per_rank} {env_backend} envs/rank "
        f"({counters.steps_per_iter} global env steps per iteration), global batch {cfg.global_batch_size(ctx.size)}, "
        f"lr {cfg.lr_for(ctx.size):g}, {cfg.precision}, torch threads/rank {torch.get_num_threads()}, run dir {run_dir}"
    )
    stop = preemption.StopFlag()
    _train_loop(run, stop)

    # 4. The end: the final checkpoint, a greedy evaluation and the summary, agreed by every rank.
    st, steps = run.state, run.state.counters.global_env_steps
    if st.last_ckpt_step != steps or stored is None or steps == 0:
        _save_checkpoint(run)  # HVD + MPI: the end of the run (or of this allocation) is always on disk
    _flush_episode_log(run)  # MPI: episodes an early stop left unlogged
    if not st.preempted:
        stop.restore()
    wall = time.perf_counter() - st.t_start  # includes the final checkpoint
    collector.close()
    summary = _summarise(run, wall)  # HVD: final evaluation, sums, min/max over ranks
    if run.writer is not None:
        run.writer.write("final", asdict(summary))
        run.writer.close()
        rundir.write_summary(run_dir, asdict(summary))
    run.log(summary.line())
    if not summary.replicas_identical:
        run.log("mpirl: warning: ranks ended with different parameters (a non-deterministic GPU op?)")
    if st.last_ckpt_error:
        newest = f"; newest intact checkpoint: {checkpoint.latest(run_dir)}" if ctx.rank == 0 else ""
        raise CheckpointWriteError(f"the final checkpoint could not be written ({st.last_ckpt_error}){newest}")
    return summary


def _train_loop(run: Run, stop: preemption.StopFlag) -> None:
    """Until the env-step budget is spent, a target return is reached or a stop is agreed."""
    cfg, c, st, learner, collector = run.cfg, run.state.counters, run.state, run.learner, run.collector
    beta_steps = cfg.per_beta_steps or cfg.total_env_steps
    watchdog.begin("training")  # the start-up stage's allowance ends here
    st.t_start = st.t_last = time.perf_counter()
    st.steps_last, st.updates_last, st.last_ckpt_step = c.global_env_steps, learner.updates, c.global_env_steps
    while c.global_env_steps < cfg.total_env_steps:
        epsilon = algo.linear_schedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps, c.global_env_steps)
        # 3a. Act and learn. The update that the last env step made due runs now, overlapped with
        # the next env step: the shard steps while the gradient allreduce is in flight, so acting
        # uses the weights of one update earlier (benchmarks/throughput.py measures the gain).
        if run.warmed_up() and c.iteration % cfg.train_every == 0:
            beta = algo.linear_schedule(cfg.per_beta0, 1.0, beta_steps, c.global_env_steps)
            for g in range(cfg.gradient_steps):
                learner.start(collector.replay, collector.rng, beta)  # HVD (K = 1): the gradient allreduce starts
                if g == cfg.gradient_steps - 1:
                    collector.step(learner.greedy, epsilon, c.global_env_steps + c.steps_per_iter)  # during allreduce
                st.loss_sum += learner.finish()  # HVD (K = 1): wait for the averaged gradient; K > 1: averaging
                st.loss_n += 1
        else:
            collector.step(learner.greedy, epsilon, c.global_env_steps + c.steps_per_iter)
        c.iteration += 1
        c.global_env_steps += c.steps_per_iter
        last = c.global_env_steps >= cfg.total_env_steps

        # 3b. Progress line, 3c. evaluation (may stop early), 3d. checkpoint, 3e. stop vote.
        if algo.crossed(c.global_env_steps, c.steps_per_iter, cfg.log_interval) or last:
            _log_progress(run, epsilon)  # HVD: one allreduce of the window's sums
        if algo.crossed(c.global_env_steps, c.steps_per_iter, cfg.eval_interval) and run.warmed_up():
            if greedy_eval.periodic(run):  # HVD: evaluation sums; the same mean on every rank
                break
        if algo.crossed(c.global_env_steps, c.steps_per_iter, cfg.checkpoint_interval) and not last:
            _save_checkpoint(run)  # HVD + MPI
            st.last_ckpt_step = c.global_env_steps
        if stop.vote_due(c.iteration):
            mine = [1.0 if stop.signum else 0.0, 1.0 if stop.name in ("SIGTERM", "SIGINT") else 0.0]
            votes = dist.allreduce_sum(np.array(mine), name="mpirl.preempt")  # HVD: vote (any stop, any TERM/INT)
            if votes[0] > 0:
                st.preempted = True
                stop.ignore_further()
                run.log(f"mpirl: stop signal received; checkpointing at {c.global_env_steps:,} env steps, then exiting")
                _warn_if_cut_off(run, "SIGTERM/SIGINT" if votes[1] > 0 else "SIGUSR1")
                break


def _warn_if_cut_off(run: Run, signame: str) -> None:
    """Say when the stop checkpoint may outlast the launcher's grace before SIGKILL (its
    duration: the latest checkpoint's, or before the first, the filled replay at 100 MB/s)."""
    grace_s, rule = preemption.launcher_grace()
    rep = run.collector.replay
    estimate = run.state.last_ckpt_s or rep.nbytes * len(rep) / run.cfg.buffer_size_per_rank * run.ctx.size / 100e6
    note = preemption.stop_note(signame, estimate, grace_s, rule)
    if note:
        run.log(note)


def _save_checkpoint(run: Run) -> None:
    """Collective: rank 0 writes the job's state; a failure keeps the previous file and is
    remembered (identical on every rank) for the end of the run."""
    cfg, learner, st = run.cfg, run.learner, run.state
    _flush_episode_log(run)  # MPI: the episode log holds every episode up to the checkpoint's step
    learner.sync_replicas()  # HVD (local SGD): save averaged weights (and counters), identical on all ranks
    if not learner.weights_finite():  # identical weights on every rank -> every rank returns here
        run.log("mpirl: warning: weights are not finite; checkpoint not written, the previous one is kept")
        return
    c = st.counters
    header = CheckpointHeader(
        global_env_steps=c.global_env_steps,
        updates=learner.updates,
        env_id=cfg.env_id,
        obs_shape=list(run.info.obs_shape),
        n_actions=run.info.n_actions,
        config=cfg.to_dict(),
        counters=Counters(**asdict(c)),
        versions=_versions(),
    )
    s = run.collector.state()
    meta = {"rank": run.ctx.rank, "replay": s.replay_state, "numpy_rng": s.numpy_rng,
            "torch_rng": torch.get_rng_state().numpy().tobytes().hex(),
            "episodes": s.stats.episodes, "win": s.stats.to_meta()}  # fmt: skip
    shard = checkpoint.RankShard(meta=meta, replay=s.replay_arrays, env_state=s.env_state)
    t0 = time.perf_counter()
    with watchdog.allowance("checkpoint write", run.io_allowance_s):  # the same on every rank
        path, err = checkpoint.save(  # HVD + MPI: space check, shard streaming, status
            run.run_dir, run.ctx, header, learner.online, learner.target, learner.optimizer, shard, cfg.keep_checkpoints
        )
    st.last_ckpt_s = time.perf_counter() - t0
    st.checkpoint_s += st.last_ckpt_s
    st.last_ckpt_error = err
    if err:
        run.log(f"mpirl: warning: {err}; the previous checkpoint is kept")
    else:
        run.log(f"ckpt  {c.global_env_steps:>9,} | {path} ({time.perf_counter() - t0:.2f} s)")


def _flush_episode_log(run: Run) -> None:
    """Collective: every rank's episodes finished since the last call -> rank 0's episodes.csv."""
    by_rank = dist.gather_to_root(run.collector.stats.take_finished())  # MPI: gather (small)
    if run.writer is not None:
        run.writer.write_episodes(by_rank)


def _versions() -> dict[str, str]:
    """The writer's library versions, for a checkpoint's provenance (schema 1's key order)."""
    return {"mpirl": __version__, "torch": torch.__version__, "numpy": np.__version__,
            **envs.library_versions(), **checkpoint.library_versions(), **dist.versions()}  # fmt: skip


def _log_progress(run: Run, epsilon: float) -> None:
    """Collective: the window's episode and loss sums over all ranks -> one progress record."""
    _flush_episode_log(run)  # MPI: gather
    st, c, updates = run.state, run.state.counters, run.learner.updates
    ret_sum, len_sum, n_ep = run.collector.stats.take_window()
    window = [ret_sum, len_sum, n_ep, float(st.loss_sum), float(st.loss_n), float(run.collector.stats.episodes)]
    st.loss_sum.zero_()
    st.loss_n = 0
    tot = dist.allreduce_sum(np.array(window), name="mpirl.metrics")  # HVD: window sums, cumulative episodes
    now = time.perf_counter()
    sps = (c.global_env_steps - st.steps_last) / max(now - st.t_last, 1e-9)
    ups = (updates - st.updates_last) / max(now - st.t_last, 1e-9)
    st.t_last, st.steps_last, st.updates_last = now, c.global_env_steps, updates
    record = {
        "global_env_steps": c.global_env_steps,
        "updates": updates,
        "episodes": int(tot[5]),
        "wall_time_s": now - st.t_start,
        "sps": sps,
        "updates_per_s": ups,
        "mean_return": tot[0] / tot[2] if tot[2] else float("nan"),
        "mean_length": tot[1] / tot[2] if tot[2] else float("nan"),
        "loss": tot[3] / tot[4] if tot[4] else float("nan"),
        "epsilon": epsilon,
        "eval_mean_return": c.last_eval,
    }
    if run.writer is not None:
        run.writer.write("train", record)
    eta = (run.cfg.total_env_steps - c.global_env_steps) / max(sps, 1e-9)
    run.log(
        f"step {c.global_env_steps:>9,}/{run.cfg.total_env_steps:,} | {sps:7,.0f} sps | {ups:6,.0f} upd/s | "
        f"return {record['mean_return']:7.1f} | loss {record['loss']:.4f} | eps {epsilon:.3f} | "
        f"eval {c.last_eval:6.1f} | eta {fmt_time(eta)}"
    )


def _summarise(run: Run, wall: float) -> Summary:
    """Collective: the final greedy evaluation and the run's global figures."""
    cfg, ctx, st, learner = run.cfg, run.ctx, run.state, run.learner
    f_mean = f_std = float("nan")
    if cfg.final_eval_episodes > 0 and not st.preempted:
        f_mean, f_std = st.final_eval or greedy_eval.final(run)  # HVD (unless an early stop ran it already)
    local_episodes = np.array([run.collector.stats.episodes])
    episodes = int(dist.allreduce_sum(local_episodes, name="mpirl.episodes")[0])  # HVD
    _, wall = dist.allreduce_min_max(wall, name="mpirl.wall_time")  # HVD: the slowest rank's time
    _, checkpoint_s = dist.allreduce_min_max(st.checkpoint_s, name="mpirl.checkpoint_time")  # HVD
    learner.sync_replicas()  # HVD (local SGD): end on averaged weights (a no-op if nothing changed)
    checksum = model.parameter_checksum(learner.online)
    lo, hi = dist.allreduce_min_max(checksum, name="mpirl.checksum")  # HVD: replicas still identical?
    target = run.target_return
    return Summary(
        env_id=cfg.env_id,
        run_dir=run.run_dir,
        world_size=ctx.size,
        global_env_steps=st.counters.global_env_steps,
        updates=learner.updates,
        episodes=episodes,
        wall_time_s=wall,
        final_eval_mean=f_mean,
        final_eval_std=f_std,
        final_eval_episodes=0 if st.preempted else cfg.final_eval_episodes,
        target_return=target,
        solved=bool(target is not None and not math.isnan(f_mean) and f_mean >= target),
        stopped_early=st.stopped_early,
        preempted=st.preempted,
        checkpoint_s=checkpoint_s,
        skipped_updates=learner.skipped_updates,
        param_checksum=checksum,
        replicas_identical=lo == hi,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: exit 0 on success, 2 on bad input (every rank), abort on a crash."""

    def run() -> int:
        cfg = parse_args(argv)
        if cfg.dry_run:
            dryrun.dry_run(cfg)
        else:
            fit(cfg)
        return 0

    errors: tuple[type[BaseException], ...] = (ConfigError, envs.EnvError, checkpoint.CheckpointError, dist.DistError)
    return dist.run_or_abort(run, user_errors=errors)
