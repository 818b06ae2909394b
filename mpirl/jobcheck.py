"""Checks of a run's options against the job and its checkpoint, once the job is known: the
world size, the other ranks' options, the node's memory, a checkpoint's stored config. Each raises ConfigError
(or lists conflicts) alike on every rank. Stdlib only, like mpirl.config.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from mpirl.config import Config, ConfigError, option_flag

MEMORY_SHARE = 0.9  # of the memory available at start that the replays of one node may take


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


def world(cfg: Config, world_size: int, memory_verdicts: Sequence[str] = ()) -> None:
    """What depends on the job: ConfigError when its size is not --expect-world-size (N
    singletons each raise on their own), when no rank could ever update, or when any rank's
    node lacks the memory for its ranks' replays (``memory_verdicts``: every rank's
    ``memory_shortfall``, gathered, so all raise alike)."""
    if cfg.expect_world_size and world_size != cfg.expect_world_size:
        raise ConfigError(
            f"this job has {world_size} rank(s), {cfg.expect_world_size} expected: the launcher and MPI did not "
            "wire up (with srun, pick the PMI your MPI was built with, e.g. srun --mpi=pmix)"
        )
    if cfg.total_env_steps // world_size <= cfg.learning_starts_per_rank:
        per_rank, starts = cfg.total_env_steps // world_size, cfg.learning_starts_per_rank
        raise ConfigError(f"--total-env-steps over {world_size} rank(s) is {per_rank} env steps per rank, not more "
                          f"than --learning-starts-per-rank ({starts}): the run could never update (lower "
                          f"--learning-starts-per-rank below {per_rank}, or raise --total-env-steps)")  # fmt: skip
    short = [(r, v) for r, v in enumerate(memory_verdicts) if v]
    if short:
        raise ConfigError(f"{short[0][1]} (rank {short[0][0]}'s node)")


def precision(verdicts: Sequence[tuple[str, str]]) -> str:
    """Every rank's (error, warning) about its device and ``--precision``, gathered: ConfigError,
    alike on every rank, when any rank's device cannot run it; else the first warning with its
    rank ("" when none)."""
    for rank, (error, _) in enumerate(verdicts):
        if error:
            raise ConfigError(f"{error} (rank {rank})")
    return next((f"{warning} (rank {rank})" for rank, (_, warning) in enumerate(verdicts) if warning), "")


def available_memory() -> tuple[int, str]:
    """Bytes this process may still allocate, and where that figure comes from: the kernel's
    MemAvailable, or less when a memory cgroup (SLURM's, a container's) limits the job."""
    best, source = _meminfo_available(), "MemAvailable"
    for limit_file, usage_file in _cgroup_files():
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60 and limit - usage < best:
            best, source = max(0, limit - usage), f"memory cgroup limit ({limit_file})"
            break
    return best, source


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 1 << 62  # unknown (not Linux): no refusal on a guess


def _cgroup_files() -> list[tuple[str, str]]:
    """(limit, usage) file pairs of this process's memory cgroup, v2 then v1, as mounted here
    (inside a container the mount is the cgroup itself, not the path /proc/self/cgroup names)."""
    paths = {"v2": "", "v1": ""}
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            for line in fh:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    paths["v2"] = path
                elif "memory" in controllers.split(","):
                    paths["v1"] = path
    except (OSError, ValueError):
        pass
    root = "/sys/fs/cgroup"
    out = []
    for base in (os.path.join(root, paths["v2"].lstrip("/")), root):
        out.append((os.path.join(base, "memory.max"), os.path.join(base, "memory.current")))
    for base in (os.path.join(root, "memory", paths["v1"].lstrip("/")), os.path.join(root, "memory")):
        out.append((os.path.join(base, "memory.limit_in_bytes"), os.path.join(base, "memory.usage_in_bytes")))
    return [(lim, use) for lim, use in out if os.path.isfile(lim)]


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read().strip()
        return 1 << 62 if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def memory_shortfall(replay_bytes_per_rank: int, ranks_on_node: int) -> str:
    """ "" when the replays of this node's ranks fit in MEMORY_SHARE of the memory available
    now; otherwise the one-line reason (the caller gathers every rank's verdict, so that all
    refuse alike before any replay is allocated)."""
    need = replay_bytes_per_rank * ranks_on_node
    have, source = available_memory()
    if need <= MEMORY_SHARE * have:
        return ""
    gib = 2**30
    return (f"--buffer-size-per-rank: the replay needs {replay_bytes_per_rank / gib:,.2f} GiB per rank x "
            f"{ranks_on_node} rank(s) on this node = {need / gib:,.2f} GiB, more than {MEMORY_SHARE:.0%} of the "
            f"{have / gib:,.2f} GiB available ({source}); lower it or use fewer ranks per node")  # fmt: skip
