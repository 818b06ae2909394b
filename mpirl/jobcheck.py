"""Checks of a run's options against the job and its checkpoint, once the job is known: the
world size, the other ranks' options, a checkpoint's stored config. Each raises ConfigError
(or lists conflicts) alike on every rank. Stdlib only, like mpirl.config.
"""

from __future__ import annotations

from typing import Any

from mpirl.config import Config, ConfigError, option_flag


def resume_conflicts(cfg: Config, stored: dict[str, Any], same_world: bool) -> list[str]:
    """The options whose change would make a checkpoint's replay mean something else (n-step
    returns discounted with another gamma, clipped or not, ...), as "--flag: checkpoint X,
    this run Y"; empty when resuming with this config is safe."""
    out = []
    names = ["n_step", "gamma", "prioritized", "frame_stack", "clip_rewards", "terminal_on_life_loss"]
    if cfg.prioritized:
        names.append("per_alpha")  # stored priorities are |TD|^alpha
    if same_world:
        names.append("num_envs_per_rank")  # env shards, n-step queues and counters per env
    for name in names:
        if name in stored and stored[name] != cfg.to_dict()[name]:
            out.append(f"{option_flag(name)}: checkpoint {stored[name]}, this run {cfg.to_dict()[name]}")
    theirs = stored.get("buffer_size_per_rank", 0)
    if isinstance(theirs, int) and cfg.buffer_size_per_rank < theirs:
        out.append(f"--buffer-size-per-rank: checkpoint {theirs}, this run {cfg.buffer_size_per_rank} (smaller)")
    return out


def same_everywhere(cfg: Config, every_ranks: list[dict[str, Any]]) -> None:
    """ConfigError naming the options in which ranks differ (an MPMD launch, a rank given
    other flags): they would hang or crash in the first collective whose shapes differ."""
    differ = sorted({k for d in every_ranks for k in d if any(o.get(k) != d.get(k) for o in every_ranks)})
    if differ:
        flags = ", ".join(option_flag(k) if k in Config.__dataclass_fields__ else k for k in differ)
        raise ConfigError(f"the ranks were started with different options ({flags}); give every rank the same")


def world(cfg: Config, world_size: int) -> None:
    """What depends on the job's size: ConfigError when it is not --expect-world-size (N
    singletons each raise on their own), or when no rank could ever update."""
    if cfg.expect_world_size and world_size != cfg.expect_world_size:
        raise ConfigError(
            f"this job has {world_size} rank(s), {cfg.expect_world_size} expected: the launcher and MPI did not "
            "wire up (with srun, pick the PMI your MPI was built with, e.g. srun --mpi=pmix)"
        )
    if cfg.total_env_steps // world_size <= cfg.learning_starts_per_rank:
        per_rank, starts = cfg.total_env_steps // world_size, cfg.learning_starts_per_rank
        raise ConfigError(f"--total-env-steps over {world_size} rank(s) is {per_rank} env steps per rank, not more "
                          f"than --learning-starts-per-rank ({starts}): the run could never update")  # fmt: skip
