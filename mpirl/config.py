"""Every option of mpirl: one frozen dataclass, its validation, CLI and TOML parsing.

Scale is in the names: ``*_per_rank`` is what one MPI rank does or holds; ``global_*`` and
``total_env_steps`` count across all ranks. Weak scaling is the rule: adding ranks adds
environments and samples per update; the per-rank work stays the same.

Options come from, lowest precedence first: the defaults below, a TOML file
(``--config run.toml``, keys named as the fields, with ``-`` or ``_``), and CLI flags.
Stdlib only, so the config can be parsed and validated before MPI is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on older clusters only
    import tomli as tomllib


MAX_SEED = 2**31 - 10_000_000  # room for every env's and evaluation's offset (see validate)
MAX_N_STEP = 255  # replay stores the step count of a transition in a uint8


class ConfigError(ValueError):
    """A bad option: the message is one line, meant for the user as it stands."""


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Config:
    """All options of a training run. Derived values are properties, never stored."""

    # --- environment -----------------------------------------------------------------
    env_id: str = _opt("CartPole-v1", "any registered gymnasium id with a Discrete action space", flag="env")
    env_module: str = _opt(
        "", "comma-separated modules to import first, so that their environments register themselves"
    )
    num_envs_per_rank: int = _opt(8, "environments in each rank's vector env shard")
    seed: int = _opt(1, "base seed; env i of rank r gets seed + r * num_envs_per_rank + i")
    frame_stack: int = _opt(4, "Atari: frames stacked into each observation (stored once each in replay)")
    noop_max: int = _opt(30, "Atari: at most this many no-op actions after each reset")
    sticky_actions: float = _opt(
        0.25, "Atari: probability that the emulator repeats the previous action each frame (ALE v5: 0.25)"
    )
    terminal_on_life_loss: bool = _opt(
        False, "Atari: a lost life ends the n-step return (no bootstrap) without resetting the game"
    )
    clip_rewards: str = _opt(
        "auto", "store sign(reward) in replay: on, off, or auto (on for Atari)", choices=("auto", "on", "off")
    )
    env_backend: str = _opt(
        "auto",
        "what steps each rank's envs: gymnasium (Python vector env), envpool (C++ thread pool, ALE games and "
        "classic control; pip install 'mpirl[envpool]'), or auto (envpool where it is installed and has the env)",
        choices=("auto", "gymnasium", "envpool"),
    )

    # --- run length and evaluation ---------------------------------------------------
    total_env_steps: int = _opt(
        300_000, "budget of environment steps summed over all ranks (the run may stop earlier on target_return)"
    )
    eval_interval: int = _opt(5_000, "global env steps between greedy evaluations during training; 0 disables them")
    eval_episodes: int = _opt(20, "episodes per greedy evaluation, split across ranks")
    target_return: Optional[float] = _opt(
        None, "return that counts as solved; default (or 'auto'): the env's reward_threshold, 475 for CartPole-v1"
    )
    early_stop: bool = _opt(
        True, "stop once a periodic evaluation's mean return reaches target_return and the final evaluation confirms it"
    )
    final_eval_episodes: int = _opt(20, "episodes of the greedy evaluation that ends the run; 0 skips it")

    # --- replay ----------------------------------------------------------------------
    buffer_size_per_rank: int = _opt(100_000, "transitions held in each rank's replay buffer")
    learning_starts_per_rank: int = _opt(
        1_000, "env steps each rank takes (random-ish, eps-greedy) before the first update"
    )
    prioritized: bool = _opt(False, "prioritized replay (sum tree) instead of uniform")
    per_alpha: float = _opt(0.6, "PER priority exponent alpha, in [0, 1]")
    per_beta0: float = _opt(0.4, "PER importance-weight exponent at the start, annealed linearly to 1")
    per_beta_steps: int = _opt(0, "global env steps over which PER beta reaches 1; 0 means total_env_steps")
    per_eps: float = _opt(1e-6, "added to |TD error| so no priority is zero")

    # --- DQN -------------------------------------------------------------------------
    gamma: float = _opt(0.99, "discount factor per env step")
    n_step: int = _opt(3, "n-step returns; 1 is one-step TD")
    double_dqn: bool = _opt(True, "double DQN targets (online net picks, target net evaluates)")
    dueling: bool = _opt(False, "dueling value/advantage head")
    hidden_sizes: tuple[int, ...] = _opt((128, 128), "MLP hidden layer widths, comma-separated")
    batch_size_per_rank: int = _opt(128, "samples each rank contributes to every global update")
    lr: float = _opt(5e-3, "Adam learning rate at world size 1 (see lr_scaling)")
    lr_scaling: str = _opt(
        "none",
        "how lr changes with N ranks (global batch grows N-fold): none, linear (lr*N) or sqrt (lr*sqrt(N))",
        choices=("none", "linear", "sqrt"),
    )
    adam_eps: float = _opt(1e-8, "Adam epsilon")
    max_grad_norm: float = _opt(10.0, "clip the averaged gradient to this global L2 norm; 0 disables")
    max_nonfinite_updates: int = _opt(
        10, "updates in a row whose averaged gradient is NaN/inf (each is skipped) before the run stops"
    )
    train_every: int = _opt(1, "vector-env steps per rank between training phases")
    gradient_steps: int = _opt(1, "global updates per training phase")
    target_update_interval: int = _opt(1, "updates between target-network updates")
    tau: float = _opt(0.01, "target update: target <- tau*online + (1-tau)*target; 1.0 is a hard copy")
    eps_start: float = _opt(1.0, "epsilon-greedy: initial epsilon")
    eps_end: float = _opt(0.05, "epsilon-greedy: final epsilon")
    eps_decay_steps: int = _opt(10_000, "global env steps over which epsilon decays linearly")

    # --- distribution ----------------------------------------------------------------
    fp16_allreduce: bool = _opt(False, "compress gradients to fp16 for the allreduce")
    backward_passes_per_step: int = _opt(
        1, "batches per rank whose gradients are accumulated locally before each allreduce"
    )
    sync_every: int = _opt(
        1,
        "updates between synchronisations: 1 averages gradients every update (all ranks identical "
        "always); K > 1 is local SGD: each rank applies its own gradients and every K-th update the "
        "ranks average their weights and Adam moments (fewer collectives, replicas differ in between)",
    )
    backend: str = _opt(
        "auto",
        "collectives: horovod (ring-allreduce over MPI/NCCL), mpi (MPI's own collectives on CPU tensors, no "
        "background thread), torch (torch.distributed: NCCL for CUDA, Gloo for CPU; gloo or nccl force one), or "
        "auto (Horovod where it can serve the device, else torch)",
        choices=("auto", "horovod", "mpi", "torch", "gloo", "nccl"),
    )
    device: str = _opt(
        "auto", "auto (cuda:local_rank when CUDA is available), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    precision: str = _opt(
        "fp32",
        "fp32, or bf16: the networks' convolutions and matrix products in bfloat16 (torch autocast; weights, "
        "gradients, optimizer state and Q-values stay float32); faster where the CPU or GPU has bf16 arithmetic",
        choices=("fp32", "bf16"),
    )
    torch_threads: int = _opt(0, "torch intra-op threads per rank; 0 = cores / ranks on this node")
    stall_timeout: float = _opt(
        600.0,
        "seconds a rank may make no progress (an env step that never returns) before the job ends "
        "with exit code 5, naming the rank and its phase; checkpoints get more by their size; 0: off",
    )
    expect_world_size: int = _opt(
        0,
        "fail unless the job has exactly this many ranks (guards against a launcher/PMI mismatch "
        "starting N independent 1-rank jobs); 0: no check",
    )

    # --- checkpoints -----------------------------------------------------------------
    checkpoint_interval: int = _opt(
        50_000, "global env steps between checkpoints (HDF5 in <run_dir>/checkpoints); 0: only at the end"
    )
    keep_checkpoints: int = _opt(3, "how many recent checkpoints to keep; 0 keeps all")
    resume: str = _opt(
        "", "'auto': continue from the run directory's latest checkpoint if there is one; or a checkpoint path"
    )
    checkpoint_replay: bool = _opt(True, "include every rank's replay shard in checkpoints (needed for exact resume)")

    # --- output ----------------------------------------------------------------------
    run_dir: str = _opt("", "run directory; default runs/<env>-s<seed>-<timestamp>")
    log_interval: int = _opt(10_000, "global env steps between progress lines")
    record_episodes: str = _opt(
        "", "record every rank's episodes step by step into this directory (python -m mpirl.export makes "
        "Minari and D4RL datasets of it); '' records nothing"
    )  # fmt: skip
    tensorboard: bool = _opt(True, "also write TensorBoard scalars when tensorboard is installed")
    overwrite: bool = _opt(False, "allow writing into a run directory that already holds a run")
    dry_run: bool = _opt(
        False, "start the job's communication, print each rank's device, backend and collective library, then exit"
    )

    # --- derived values (never stored) -----------------------------------------------
    def lr_for(self, world_size: int) -> float:
        """Adam learning rate for ``world_size`` ranks, following ``lr_scaling``."""
        factor = {"none": 1.0, "linear": float(world_size), "sqrt": world_size**0.5}[self.lr_scaling]
        return self.lr * factor

    def global_batch_size(self, world_size: int) -> int:
        return self.batch_size_per_rank * self.backward_passes_per_step * world_size

    @property
    def env_modules(self) -> list[str]:
        return [m.strip() for m in self.env_module.split(",") if m.strip()]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> Config:
        """A Config from ``to_dict()``'s form (a checkpoint's or config.json's), validated;
        options this version does not know are ignored, missing ones take their defaults.
        ConfigError naming ``source`` for a malformed value."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the stored config is not a JSON object")
        try:
            values = {k: _coerce(k, v) for k, v in d.items() if k in cls.__dataclass_fields__}
            return cls(**values).validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: stored config: {exc}") from None

    # --- validation ------------------------------------------------------------------
    def validate(self) -> Config:
        """Raise ConfigError for any bad value or combination; return self."""
        self._check_values()
        self._check_combinations()
        return self

    def _check_values(self) -> None:
        """Each option on its own: finite, in range, of a usable sign."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # inf or NaN in any float (--lr inf applied one update, then stopped; --max-grad-norm
            # nan switched clipping off without a word)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{option_flag(f.name)} must be a finite number, got {value}")
        positive = (
            "num_envs_per_rank", "total_env_steps", "eval_episodes", "buffer_size_per_rank",
            "batch_size_per_rank", "n_step", "train_every", "gradient_steps",
            "target_update_interval", "backward_passes_per_step", "log_interval", "max_nonfinite_updates",
            "sync_every",
            "frame_stack",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{option_flag(name)} must be positive, got {getattr(self, name)}")
        non_negative = (
            "eval_interval", "final_eval_episodes", "learning_starts_per_rank", "eps_decay_steps",
            "per_beta_steps", "torch_threads", "max_grad_norm", "checkpoint_interval", "keep_checkpoints",
            "expect_world_size", "noop_max", "stall_timeout",
        )  # fmt: skip
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{option_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            # env i of rank r is seeded seed + r * envs + i, evaluations seed + 2,000,000 + i: all
            # must stay valid seeds for numpy, torch and gymnasium
            raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.n_step > MAX_N_STEP:
            raise ConfigError(f"--n-step must be at most {MAX_N_STEP} (stored in one byte), got {self.n_step}")
        if not self.env_id.strip():
            raise ConfigError("--env must name a gymnasium environment id")
        for name in ("gamma", "eps_start", "eps_end", "sticky_actions", "per_alpha", "per_beta0"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{option_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"--tau must be in (0, 1], got {self.tau}")
        for name in ("lr", "adam_eps", "per_eps"):
            if not getattr(self, name) > 0.0:
                raise ConfigError(f"{option_flag(name)} must be positive, got {getattr(self, name)}")
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise ConfigError(f"--hidden-sizes must be positive widths, got {self.hidden_sizes}")

    def _check_combinations(self) -> None:
        """Options that are fine alone but cannot work together."""
        if self.buffer_size_per_rank < self.batch_size_per_rank:
            raise ConfigError(
                f"--buffer-size-per-rank ({self.buffer_size_per_rank}) is smaller than "
                f"--batch-size-per-rank ({self.batch_size_per_rank})"
            )
        if self.learning_starts_per_rank < self.batch_size_per_rank:
            raise ConfigError(
                f"--learning-starts-per-rank ({self.learning_starts_per_rank}) is below "
                f"--batch-size-per-rank ({self.batch_size_per_rank})"
            )
        if self.learning_starts_per_rank > self.buffer_size_per_rank:
            raise ConfigError(
                f"--learning-starts-per-rank ({self.learning_starts_per_rank}) exceeds "
                f"--buffer-size-per-rank ({self.buffer_size_per_rank})"
            )
        if self.learning_starts_per_rank // self.num_envs_per_rank < self.n_step:
            # each env needs n steps before its first n-step transition: the replay would still
            # be empty when the first update samples it
            raise ConfigError(
                f"--learning-starts-per-rank ({self.learning_starts_per_rank}) gives each of the "
                f"{self.num_envs_per_rank} envs fewer steps than --n-step ({self.n_step}) before the first update"
            )
        if self.sync_every > 1 and self.fp16_allreduce:
            # fp16 compresses the gradient allreduce, which local SGD does not issue; averaging the
            # weights themselves in fp16 would round them at every sync point.
            raise ConfigError("--fp16-allreduce compresses gradients, which --sync-every > 1 does not allreduce")


# --- CLI and TOML --------------------------------------------------------------------


def option_flag(name: str) -> str:
    """The command-line flag of a Config field, e.g. --num-envs-per-rank."""
    f = Config.__dataclass_fields__[name]
    return "--" + f.metadata.get("flag", name).replace("_", "-")


def _base_type(f: dataclasses.Field[Any]) -> Any:
    hints = typing.get_type_hints(Config)
    tp = hints[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        return args[0]
    return tp


def _coerce(name: str, raw: Any) -> Any:
    """Turn a CLI string or TOML value into the field's type, or raise ConfigError."""
    f = Config.__dataclass_fields__[name]
    tp = _base_type(f)
    flag = option_flag(name)
    try:
        if name == "target_return":
            if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("none", "auto", "")):
                return None
            return float(raw)
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp == tuple[int, ...]:
            items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
            return tuple(int(str(x).strip()) for x in items if str(x).strip())
        if tp is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            if isinstance(raw, str):
                raw = raw.replace("_", "")
                value = float(raw) if any(c in raw for c in ".eE") else int(raw)
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)
            return int(raw)
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if tp is str:
            if not isinstance(raw, str):
                raise ValueError
            choices = f.metadata.get("choices")
            if choices and raw not in choices:
                raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {raw!r}")
            return raw
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(tp, "a list of integers")
    raise ConfigError(f"{flag} must be {kind}, got {raw!r}")


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file of options (keys as field names, '-' or '_'), or raise ConfigError."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML in {path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    # Allow the options at the top level or under a [train] table.
    if isinstance(data.get("train"), dict):
        data = {**{k: v for k, v in data.items() if k != "train"}, **data["train"]}
    out: dict[str, Any] = {}
    by_flag = {f.metadata.get("flag", f.name): f.name for f in dataclasses.fields(Config)}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = by_flag.get(name, name)
        if name not in Config.__dataclass_fields__:
            raise ConfigError(f"unknown option {key!r} in {path}")
        out[name] = _coerce(name, value)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser; every option shows its default in --help."""
    p = _Parser(
        prog="python -m mpirl.train",
        description=(
            "Data-parallel DQN across MPI ranks with Horovod. Each rank runs its own env shard and "
            "replay buffer; gradients are averaged with ring-allreduce. "
            "Example: mpirun -np 2 python -m mpi4py -m mpirl.train --env CartPole-v1"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="TOML", default=None, help="read options from a TOML file; flags override it")
    for f in dataclasses.fields(Config):
        flag = option_flag(f.name)
        tp = _base_type(f)
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(str(x) for x in default)
        metavar = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(tp, "INTS")
        help_text = f.metadata["help"]
        if tp is bool:
            p.add_argument(
                flag,
                dest=f.name,
                nargs="?",
                const="true",
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=f"{help_text} (default: {default})",
            )
            p.add_argument(
                "--no-" + flag[2:],
                dest=f.name,
                action="store_const",
                const="false",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        else:
            p.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, metavar=metavar, help=f"{help_text} (default: {default})"
            )
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> Config:
    """Defaults <- TOML (--config) <- flags; validated. Raises ConfigError on bad input."""
    ns = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_path = ns.pop("config", None)
    if config_path:
        values.update(load_toml(config_path))
    for name, raw in ns.items():
        values[name] = _coerce(name, raw)
    return Config(**values).validate()
