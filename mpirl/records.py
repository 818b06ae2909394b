"""Typed records of a run, with one definition each: what a checkpoint's header holds, the
run's counters, and the summary a run ends with.

Stdlib only. ``checkpoint`` writes and reads these, ``trainer`` fills them, ``inspect``
prints them; their JSON forms are checkpoint schema 1 as written since the first release, so
old checkpoints load and new ones read the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Counters:
    """A run's progress, identical on every rank: every control-flow decision of the training
    loop depends only on these or on the result of a collective, so no rank branches alone."""

    steps_per_iter: int  # global env steps per iteration: num_envs_per_rank x world size
    global_env_steps: int = 0  # env steps summed over all ranks
    iteration: int = 0  # vector-env steps each rank has taken
    eval_round: int = 0  # periodic evaluations done (seeds each round's episodes apart)
    last_eval: float = math.nan  # mean return of the latest periodic evaluation; NaN: none yet
    warmup_from: int = 0  # iteration from which learning_starts_per_rank counts (an empty resume resets it)

    def progress(self) -> str:
        """Where the run is, for messages: ``iteration 1,234, 5,000 global env steps``."""
        return f"iteration {self.iteration:,}, {self.global_env_steps:,} global env steps"

    def to_json(self) -> dict[str, Any]:
        """Schema 1's ``counters`` attribute (key order kept, NaN as null)."""
        return {
            "global_env_steps": self.global_env_steps,
            "iteration": self.iteration,
            "eval_round": self.eval_round,
            "last_eval": None if math.isnan(self.last_eval) else self.last_eval,
            "steps_per_iter": self.steps_per_iter,
            "warmup_from": self.warmup_from,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Counters:
        """Inverse of ``to_json``; KeyError/TypeError/ValueError on a malformed dict."""
        last = d["last_eval"]
        return cls(
            steps_per_iter=int(d["steps_per_iter"]),
            global_env_steps=int(d["global_env_steps"]),
            iteration=int(d["iteration"]),
            eval_round=int(d["eval_round"]),
            last_eval=math.nan if last is None else float(last),
            warmup_from=int(d.get("warmup_from", 0)),  # written since schema 1's third release
        )


@dataclass
class CheckpointHeader:
    """The global facts of one checkpoint (the file's root attributes), the same for every rank."""

    global_env_steps: int
    updates: int  # applied global updates
    env_id: str
    obs_shape: list[int]
    n_actions: int
    config: dict[str, Any]  # Config.to_dict() of the run that wrote it
    counters: Counters
    versions: dict[str, str] = field(default_factory=dict)  # library versions of the writer


@dataclass
class StoredCheckpoint:
    """A checkpoint as read back: its header and what its layout says about the job that wrote it."""

    path: str
    header: CheckpointHeader
    world_size: int  # ranks of the job that wrote it
    optimizer_has_state: bool  # False before the first update (a fresh Adam)
    shard_rows: list[int]  # replay transitions saved per rank, in rank order
    created: str = ""  # ISO 8601 UTC
    note: str = ""  # how it was chosen and checked (checksums verified, damaged newer files skipped)


@dataclass
class Summary:
    """What a run did: global figures, identical on every rank (``summary.json``)."""

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
        """The one-line summary rank 0 prints at the end."""
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
