"""Gymnasium vector-env shards per rank: checking, seeding, episode tracking, greedy evaluation.

gymnasium 1.x autoreset (next-step mode, the default): when sub-env ``e`` ends at step t, the
step returns its real final observation; the *next* call to ``step`` resets it, ignores the
action and returns the reset observation with reward 0. That step is not a transition, so
callers mask it out with ``prev_done`` (see ``EpisodeTracker``). No ``final_observation``
info key is used (that was gymnasium 0.29).

Atari (any ALE game, e.g. ``ALE/Pong-v5``, with the ``atari`` extra: ale-py ships the ROMs,
opencv does the resizing) gets the standard DQN pipeline of Mnih et al. 2015 / Machado et al.
2018 through gymnasium's wrappers: up to 30 no-op actions at reset, the action repeated over 4
frames with the last two max-pooled, 84x84 grayscale uint8, and a stack of the last 4 frames,
observations (4, 84, 84) uint8. The base env is made with ``frameskip=1`` (the skipping is the
wrapper's); sticky actions (ALE v5's p = 0.25) stay on unless ``--sticky-actions`` says
otherwise. Reward clipping and terminal-on-life-loss belong to training only, so the trainer
applies them (evaluation reports game scores).

MinAtar games (``MinAtar/Breakout-v1`` ..., with the ``minatar`` extra) register on first use and
give ``(C, 10, 10)`` uint8 planes of 0/1 through ``minatar_env.ChannelsFirst``, with the
package's sticky actions (p = 0.1) and unclipped rewards; their game objects are saved as data
(``minatar_env.game_state``), so they resume exactly.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import gymnasium as gym
import numpy as np

from mpirl import envpool_shard, envstate, minatar_env
from mpirl.config import Config


class EnvError(ValueError):
    """An environment that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class AtariOptions:
    """Preprocessing of ALE games (ignored for every other env)."""

    frame_stack: int = 4  # frames per observation
    noop_max: int = 30  # at most this many no-op actions after each reset
    frame_skip: int = 4  # emulator frames per agent step (action repeat)
    screen_size: int = 84  # square grayscale frames of this side
    sticky_actions: float = 0.25  # ALE repeat_action_probability (Machado et al. 2018; Nature DQN: 0)


@dataclass(frozen=True)
class EnvInfo:
    """What the model and replay need to know about an environment."""

    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    n_actions: int
    reward_threshold: Optional[float]
    frame_stack: int = 0  # K when observations are K stacked frames made by mpirl (Atari), else 0
    atari: bool = False  # an ALE game with mpirl's preprocessing


def atari_options(cfg: Config) -> AtariOptions:
    """The preprocessing a config asks for (applied to ALE games only)."""
    return AtariOptions(frame_stack=cfg.frame_stack, noop_max=cfg.noop_max, sticky_actions=cfg.sticky_actions)


def library_versions() -> dict[str, str]:
    """The env library's version, for a checkpoint's provenance."""
    return {"gymnasium": gym.__version__}


def import_env_modules(modules: Sequence[str]) -> None:
    """Import user modules so their ``gymnasium.register`` calls run."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import failure is a user error here
            raise EnvError(f"--env-module {name}: import failed: {type(exc).__name__}: {exc}") from None


def _register_ale(env_id: str) -> None:
    """ALE games register themselves only once ale_py is imported (gymnasium >= 1.0)."""
    if env_id in gym.registry:
        return
    try:
        import ale_py
    except ImportError:
        if env_id.startswith("ALE/"):
            raise EnvError(
                f"{env_id} needs the atari extra (ale-py, opencv): pip install 'mpirl[atari]', "
                "or MPIRL_EXTRAS=test,atari launch/install.sh"
            ) from None
        return
    gym.register_envs(ale_py)


def _register_minatar(env_id: str) -> None:
    """MinAtar's games register only once ``minatar.gym.register_envs()`` has run (gymnasium
    1.x loads no plugins); the first use of a ``MinAtar/`` id runs it."""
    if not minatar_env.is_minatar(env_id) or env_id in gym.registry:
        return
    try:
        import minatar.gym
    except ImportError:
        raise EnvError(
            f"{env_id} needs the minatar extra: pip install 'mpirl[minatar]', or MPIRL_EXTRAS=test,minatar "
            "launch/install.sh"
        ) from None
    minatar.gym.register_envs()


def is_atari(env_id: str) -> bool:
    """True for games of the Arcade Learning Environment (ale_py's entry point)."""
    _register_ale(env_id)
    spec = gym.registry.get(env_id)
    return spec is not None and "ale_py" in str(spec.entry_point)


def make_env(env_id: str, atari: AtariOptions = AtariOptions(), render_mode: Optional[str] = None) -> gym.Env:
    """One env as mpirl trains on it (Atari: preprocessed and frame-stacked)."""
    return _make_one(env_id, atari, render_mode)


def _make_one(env_id: str, atari: AtariOptions = AtariOptions(), render_mode: Optional[str] = None) -> gym.Env:
    kwargs: dict[str, Any] = {} if render_mode is None else {"render_mode": render_mode}
    try:
        if is_atari(env_id):
            from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

            env = AtariPreprocessing(
                # frameskip=1: the wrapper repeats actions and max-pools
                gym.make(env_id, frameskip=1, repeat_action_probability=atari.sticky_actions, **kwargs),
                noop_max=atari.noop_max,
                frame_skip=atari.frame_skip,
                screen_size=atari.screen_size,
                grayscale_obs=True,
                scale_obs=False,  # uint8 through replay; the network scales
            )
            return FrameStackObservation(env, atari.frame_stack)  # pads a reset with the first frame
        _register_minatar(env_id)
        if minatar_env.is_minatar(env_id):
            return minatar_env.ChannelsFirst(gym.make(env_id, **kwargs))  # sticky p = 0.1: the package's
        return gym.make(env_id, **kwargs)
    except gym.error.Error as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EnvError(f"unknown or unusable environment {env_id!r}: {msg}") from None
    except (ModuleNotFoundError, ImportError) as exc:
        raise EnvError(f"environment {env_id!r} needs a package that is not installed: {exc}") from None


def inspect_env(env_id: str, atari: AtariOptions = AtariOptions()) -> EnvInfo:
    """Build one env, check its spaces, close it. Raises EnvError for what mpirl cannot train."""
    env = _make_one(env_id, atari)
    try:
        act, obs = env.action_space, env.observation_space
        if not isinstance(act, gym.spaces.Discrete):
            raise EnvError(f"{env_id}: DQN needs a Discrete action space, got {act}")
        if not isinstance(obs, gym.spaces.Box):
            raise EnvError(f"{env_id}: observation space must be a Box (vector or image), got {obs}")
        if len(obs.shape) not in (1, 3):
            raise EnvError(f"{env_id}: observation shape {obs.shape} is neither a vector nor a (C, H, W) image")
        dtype = np.dtype(np.uint8) if obs.dtype == np.uint8 else np.dtype(np.float32)
        spec = env.spec
        return EnvInfo(
            obs_shape=tuple(int(s) for s in obs.shape),
            obs_dtype=dtype,
            n_actions=int(act.n),
            reward_threshold=None if spec is None else spec.reward_threshold,
            frame_stack=atari.frame_stack if is_atari(env_id) else 0,
            atari=is_atari(env_id),
        )
    finally:
        env.close()


def spec_json(env_id: str) -> Optional[str]:
    """The registered env's gymnasium EnvSpec as JSON (datasets' metadata: id, version, kwargs,
    time limit); None when it is not registered here or not serialisable."""
    try:
        return gym.spec(env_id).to_json()
    except (gym.error.Error, TypeError, ValueError):
        return None


def shard_seeds(seed: int, rank: int, num_envs: int) -> list[int]:
    """Env ``i`` of rank ``r`` gets ``seed + r * num_envs + i``: distinct over ranks and envs."""
    return [seed + rank * num_envs + i for i in range(num_envs)]


def make_vector(
    env_id: str, num_envs: int, atari: AtariOptions = AtariOptions(), backend: str = "gymnasium", threads: int = 1
) -> Any:
    """A synchronous vector env in next-step autoreset mode: gymnasium's (below) or, with
    ``backend="envpool"``, an EnvPool of ``threads`` threads with the same semantics and
    preprocessing (``mpirl.envpool_shard``; ``choose_backend`` says which).

    gymnasium's is sync, not async: a rank already owns a core, and worker processes per env
    would oversubscribe the node.
    """
    if backend == "envpool":
        return envpool_shard.EnvPoolVector(env_id, num_envs, atari if is_atari(env_id) else None, threads)
    fns: list[Callable[[], gym.Env]] = [lambda: _make_one(env_id, atari) for _ in range(num_envs)]
    kwargs: dict[str, Any] = {}
    if "autoreset_mode" in inspect.signature(gym.vector.SyncVectorEnv.__init__).parameters:
        kwargs["autoreset_mode"] = gym.vector.AutoresetMode.NEXT_STEP
    return gym.vector.SyncVectorEnv(fns, **kwargs)


def choose_backend(requested: str, env_id: str, info: EnvInfo, atari: AtariOptions = AtariOptions()) -> str:
    """The env backend of a run: ``--env-backend`` resolved for this env (auto: EnvPool where
    it is installed and gives the spaces the gymnasium env has). EnvError when EnvPool is
    asked for and cannot serve."""
    try:
        return envpool_shard.choose(requested, env_id, atari if info.atari else None, info.obs_shape, info.n_actions)
    except ValueError as exc:
        raise EnvError(str(exc)) from None


def _layers(env: gym.Env) -> list[Any]:
    """The wrapper chain, outermost first, down to the unwrapped env."""
    out = [env]
    while hasattr(out[-1], "env"):
        out.append(out[-1].env)
    return out


def _is_ale_env(env: gym.Env) -> bool:
    return hasattr(env.unwrapped, "ale") and hasattr(env.unwrapped.ale, "cloneState")


# Attributes a fresh env made with the same id and options already holds, identical, so the
# state leaves them out (and a saved state may not set them):
_STATIC = frozenset(
    {
        "env",  # the link to the next layer: the fresh chain, whose class names must match
        "ale",  # the emulator interface: its state travels as cloneState (below)
        "_saved_kwargs", "_ezpickle_args", "_ezpickle_kwargs",  # constructor arguments (same options)
        "spec", "_cached_spec", "metadata", "_metadata",  # registration data of the env id
    }
)  # fmt: skip
# gymnasium Spaces (mpirl never samples an env's own space: random actions come from the
# collector's Generator), EnvSpecs (the registry's), and code (functions, methods, classes).
_STATIC_TYPES = (gym.Space, gym.envs.registration.EnvSpec, type, functools.partial)


def _static_name(layer: Any, name: str) -> bool:
    return (
        name in _STATIC
        or (name == "_action_set" and hasattr(layer, "ale"))  # ALE: the ROM's actions
        # MinAtar: the game object graph travels as minatar_env.game_state; action_set is the game's
        or (name in ("game", "action_set") and minatar_env.is_base_env(layer))
    )


def _is_static(layer: Any, name: str, value: Any) -> bool:
    return _static_name(layer, name) or isinstance(value, _STATIC_TYPES) or inspect.isroutine(value)


def _class_name(layer: Any) -> str:
    return f"{type(layer).__module__}.{type(layer).__qualname__}"  # compared on restore, never imported


def _env_state(env: gym.Env) -> dict[str, Any]:
    """One sub-env: each layer's class name and dynamic attributes, the ALE emulator's state
    (with its RNG), and a MinAtar game's objects (key ``minatar``, only for MinAtar envs). ALE's
    state lacks the last emulator action, which a sticky action repeats: with sticky actions on,
    the first frames after a restore can differ (bitwise-exact resume needs ``--sticky-actions
    0``). MinAtar's state holds its last action: exact with its sticky actions on."""
    layers = _layers(env)
    state = {
        "classes": [_class_name(layer) for layer in layers],
        "layers": [{k: v for k, v in vars(layer).items() if not _is_static(layer, k, v)} for layer in layers],
        "ale": env.unwrapped.ale.cloneState(include_rng=True) if _is_ale_env(env) else None,  # type: ignore[attr-defined]
    }
    if minatar_env.is_base_env(env.unwrapped):
        state["minatar"] = minatar_env.game_state(env.unwrapped)
    return state


def vector_state(vec: gym.vector.VectorEnv) -> Optional[dict[str, Any]]:
    """The state of a sync vector env as a data-only tree (``mpirl.envstate`` encodes it): its
    sub-envs with their RNGs, and which envs autoreset on the next step. None when it cannot be
    captured (another vector env, or an attribute with no data encoding: a handle, a custom
    object). The tree shares arrays with the live envs: pack it before the next step."""
    subs, autoreset = getattr(vec, "envs", None), getattr(vec, "_autoreset_envs", None)
    if subs is None or autoreset is None:
        return None
    tree = {"envs": [_env_state(e) for e in subs], "autoreset": np.array(autoreset, dtype=bool)}
    try:
        envstate.check(tree)
    except envstate.UnsupportedValue:
        return None
    return tree


def restore_vector_state(vec: gym.vector.VectorEnv, tree: Any) -> None:
    """Put a ``vector_state`` tree (read back from a file: checked here) into the fresh vector
    env of the same id, options and size. EnvStateError (one line) if it does not fit."""
    fresh = vec.envs  # type: ignore[attr-defined]
    saved = _field(tree, "envs", list)
    autoreset = _field(tree, "autoreset", np.ndarray)
    if len(saved) != len(fresh) or autoreset.shape != (len(fresh),) or autoreset.dtype != bool:
        raise envstate.EnvStateError(f"env state: saved shard has {len(saved)} envs, this one {len(fresh)}")
    plans = [_check_env(env, state, i) for i, (env, state) in enumerate(zip(fresh, saved))]  # all before any change
    for env, (attrs, ale_state, game) in zip(fresh, plans):
        for layer, values in zip(_layers(env), attrs):
            vars(layer).update(values)
        if game is not None:
            minatar_env.restore_game_state(env.unwrapped, game)
        if ale_state is not None:
            try:
                env.unwrapped.ale.restoreState(ale_state)
            except Exception as exc:  # the emulator's C++ errors arrive as SystemError/RuntimeError
                raise envstate.EnvStateError(f"env state: the emulator refused it ({type(exc).__name__})") from None
    vec._autoreset_envs = autoreset  # type: ignore[attr-defined]


def _field(tree: Any, key: str, kind: type) -> Any:
    if type(tree) is not dict or not isinstance(tree.get(key), kind):
        raise envstate.EnvStateError(f"env state: {key!r} missing or not a {kind.__name__}")
    return tree[key]


def _check_env(env: gym.Env, state: Any, i: int) -> tuple[list[dict[str, Any]], Any, Any]:
    """Env ``i``'s saved (attributes per layer, emulator state, MinAtar game), checked against
    the fresh env."""
    layers, classes = _layers(env), _field(state, "classes", list)
    if classes != [_class_name(layer) for layer in layers]:
        raise envstate.EnvStateError(f"env state: env {i} was saved with another wrapper chain: {classes}")
    attrs = _field(state, "layers", list)
    if len(attrs) != len(layers) or not all(type(a) is dict for a in attrs):
        raise envstate.EnvStateError(f"env state: env {i} has no attributes per layer")
    for layer, a in zip(layers, attrs):
        bad = [k for k in a if type(k) is not str or _static_name(layer, k) or k.startswith("__")]
        if bad:
            raise envstate.EnvStateError(f"env state: env {i} sets attributes it may not: {bad[:3]}")
    ale_state = state.get("ale")
    if (ale_state is None) == _is_ale_env(env):
        raise envstate.EnvStateError(
            f"env state: env {i}: emulator state {'missing' if ale_state is None else 'unexpected'}"
        )
    game = state.get("minatar")
    if (game is None) == minatar_env.is_base_env(env.unwrapped):
        raise envstate.EnvStateError(f"env state: env {i}: MinAtar game {'missing' if game is None else 'unexpected'}")
    if game is not None:
        try:
            game = minatar_env.check_game_state(env.unwrapped, game)
        except minatar_env.GameStateError as exc:
            raise envstate.EnvStateError(f"env state: env {i}: {exc}") from None
    return attrs, ale_state, game


class EpisodeTracker:
    """Per-env running returns/lengths and the autoreset mask of a vector env shard."""

    def __init__(self, num_envs: int) -> None:
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.prev_done = np.zeros(num_envs, dtype=bool)

    def step(
        self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray
    ) -> tuple[np.ndarray, list[float], list[int]]:
        """Account one vector step. Returns (valid mask, finished returns, finished lengths)."""
        valid = ~self.prev_done
        self.returns[self.prev_done] = 0.0
        self.lengths[self.prev_done] = 0
        self.returns[valid] += rewards[valid]
        self.lengths[valid] += 1
        done = (terminated | truncated) & valid
        finished_r = self.returns[done].tolist()
        finished_l = self.lengths[done].tolist()
        self.prev_done = done
        return valid, finished_r, finished_l

    def finished(self) -> list[int]:
        """The envs whose episodes the last ``step`` finished, ascending: the order of its lists."""
        return np.flatnonzero(self.prev_done).tolist()

    def state(self) -> dict[str, np.ndarray]:
        """The arrays (returns, lengths, prev_done), for checkpoints."""
        return {"returns": self.returns, "lengths": self.lengths, "prev_done": self.prev_done}

    def set_state(self, state: Any) -> None:
        """Take back ``state()`` as read from a file; EnvStateError if it does not fit."""
        if type(state) is not dict or set(state) != {"returns", "lengths", "prev_done"}:
            raise envstate.EnvStateError("env state: episode tracker is not returns, lengths, prev_done")
        for name, mine in self.state().items():
            got = state[name]
            if type(got) is not np.ndarray or got.shape != mine.shape or got.dtype != mine.dtype:
                raise envstate.EnvStateError(
                    f"env state: episode tracker's {name} is not {mine.dtype}{list(mine.shape)}"
                )
        self.returns, self.lengths, self.prev_done = state["returns"], state["lengths"], state["prev_done"]


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    env_id: str,
    seeds: Sequence[int],
    max_steps: int = 108_000,
    atari: AtariOptions = AtariOptions(),
) -> list[float]:
    """Play one greedy episode per seed (batched over a vector env); return their returns
    (unclipped game scores for Atari)."""
    if not seeds:
        return []
    envs = make_vector(env_id, len(seeds), atari)
    try:
        obs, _ = envs.reset(seed=list(seeds))  # vector envs take one seed per env
        returns = np.zeros(len(seeds))
        active = np.ones(len(seeds), dtype=bool)
        for _ in range(max_steps):
            obs, rew, term, trunc, _ = envs.step(policy(obs))
            returns[active] += rew[active]
            active &= ~(term | trunc)
            if not active.any():
                break
        return returns.tolist()
    finally:
        envs.close()
