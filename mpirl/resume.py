"""Resuming a run. ``find``: which checkpoint, picked by rank 0, its checksums verified and
checked to fit this run before anything in the run directory is touched (the trainer
broadcasts the verdict); ``--resume auto`` skips damaged checkpoints, newest first, and says
so. ``restore``: the collective that puts it back into the learner, the counters and every
rank's collector.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from mpirl import checkpoint, dist, envs, envstate, jobcheck
from mpirl.collector import Collector
from mpirl.config import Config
from mpirl.learner import Learner
from mpirl.records import Counters, StoredCheckpoint


def find(cfg: Config, run_dir: str, info: envs.EnvInfo, world_size: int) -> Optional[StoredCheckpoint]:
    """Rank 0: the checkpoint to resume from (None for a fresh start), verified and checked
    against this run; CheckpointError naming what is damaged or does not fit. With
    ``--resume auto``, damaged checkpoints are skipped for the newest intact one (its
    ``note`` says which were skipped); when every one is damaged, the run stops rather than
    start afresh over them."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        return _fitting(cfg, cfg.resume, info, world_size, _verified(cfg.resume))
    damaged: list[str] = []
    for path in checkpoint.newest_first(run_dir):
        try:
            note = _verified(path)
        except checkpoint.CheckpointError as exc:
            damaged.append(str(exc))
            continue
        if damaged:
            note = f"skipped {len(damaged)} damaged newer checkpoint(s) ({'; '.join(damaged)}); {note}"
        return _fitting(cfg, path, info, world_size, note)
    if damaged:
        raise checkpoint.CheckpointError(
            f"every checkpoint in {checkpoint.checkpoint_dir(run_dir)} is damaged ({'; '.join(damaged)}); "
            "nothing to resume from (move them aside to start afresh)"
        )
    return None


def _verified(path: str) -> str:
    """Verify every checksum of ``path`` (CheckpointError if one fails); a note for the log."""
    checked, nbytes = checkpoint.verify(path)
    if not checked:
        return "a schema-1 checkpoint: it carries no checksums, not verified"
    return f"{checked} checksums verified ({nbytes / 2**20:,.1f} MiB)"


def _fitting(cfg: Config, path: str, info: envs.EnvInfo, world_size: int, note: str) -> StoredCheckpoint:
    """The header of ``path``, if the checkpoint fits this run; CheckpointError naming the misfits."""
    stored = checkpoint.read_header(path)
    h = stored.header
    mismatch = [
        f"{what}: checkpoint {theirs}, this run {ours}"
        for what, theirs, ours in (
            ("env", h.env_id, cfg.env_id),
            ("observation shape", h.obs_shape, list(info.obs_shape)),
            ("actions", h.n_actions, info.n_actions),
        )
        if theirs != ours
    ]
    mismatch += jobcheck.resume_conflicts(cfg, h.config, same_world=stored.world_size == world_size)
    if mismatch:
        raise checkpoint.CheckpointError(f"{path} does not fit this run: {'; '.join(mismatch)}")
    return dataclasses.replace(stored, note=note)


def restore(
    stored: StoredCheckpoint, ctx: dist.DistContext, learner: Learner, collector: Collector, c: Counters
) -> list[str]:
    """Collective: resume the learner, the counters ``c`` (in place) and this rank's collector
    from ``stored``; returns the lines for the log. CheckpointError, on every rank alike, when
    a rank's env state is malformed."""
    path = stored.path

    def load() -> None:  # rank 0 reads the networks; the others get them by broadcast
        checkpoint.load_module(path, "online", learner.online)
        checkpoint.load_module(path, "target", learner.target)
        if stored.optimizer_has_state:
            checkpoint.load_optimizer(path, learner.optimizer)

    dist.rank0_decides(load, name="mpirl.resume.load", errors=checkpoint.CheckpointError)  # HVD: agree it loaded
    learner.adopt_root_state(stored.optimizer_has_state, stored.header.updates)  # HVD: broadcasts
    saved = stored.header.counters
    # The saved counters, in place (this run keeps its own steps_per_iter; find refused
    # another --num-envs-per-rank at the same world size).
    c.global_env_steps, c.iteration, c.eval_round = saved.global_env_steps, saved.iteration, saved.eval_round
    c.last_eval, c.warmup_from = saved.last_eval, saved.warmup_from
    rows = stored.shard_rows
    same = len(rows) == ctx.size
    # Frame references cannot be split or merged across shards: at another world size a
    # frame-stack replay starts empty (weights, optimizer and counters still resume).
    skip = collector.frame_stacked and not same
    checkpoint.restore_shards(  # MPI: rank 0 streams each rank its share of the saved shards
        path, ctx, [0] * len(rows) if skip else rows, collector.begin_restore, collector.restore_rows
    )
    try:
        note, meta = collector.end_restore(same, c.global_env_steps)
        broken = ""
    except envstate.EnvStateError as exc:  # raised on one rank: agree on it before anyone leaves
        note, meta, broken = "", None, str(exc)
    bad = [f"rank {r}'s env state: {e}" for r, e in enumerate(dist.allgather_object(broken)) if e]  # MPI: allgather
    if bad:
        raise checkpoint.CheckpointError(f"{path}: {bad[0]}")
    if meta is not None:
        torch.set_rng_state(torch.from_numpy(np.frombuffer(bytes.fromhex(meta["torch_rng"]), dtype=np.uint8).copy()))
    if not same:
        moved = f"replay shards redistributed ({sum(rows):,} transitions)"
        moved = "frame-stack replay starts empty" if skip else moved
        note = f"world size changed {len(rows)} -> {ctx.size}: {moved}, env shards and RNGs start fresh"
    fewest, _ = dist.allreduce_min_max(float(len(collector.replay)), name="mpirl.resume.replay")  # HVD
    if fewest == 0:  # some rank's replay was not carried over: all warm up again, alike
        c.warmup_from = c.iteration
    lines = [f"mpirl: resumed from {path} at {c.global_env_steps:,} env steps, {learner.updates:,} updates; {note}"]
    return lines + ([f"mpirl: checkpoint {stored.note}"] if stored.note else [])
