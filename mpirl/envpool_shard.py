"""EnvPool env shards: one rank's envs stepped by EnvPool's C++ thread pool instead of
gymnasium's Python vector env, behind the interface the collector and the evaluator use
(``reset(seed=[...])``, ``step(actions)``, ``close()``, ``num_envs``).

Same semantics as the gymnasium path (``mpirl.envs.make_vector``):
- next-step autoreset: the step after an episode ends returns the reset observation with
  reward 0 and ignores its action, which is exactly gymnasium's ``AutoresetMode.NEXT_STEP``
  (``envs.EpisodeTracker`` skips that step), so no transition crosses an episode boundary;
- a time limit is ``truncated`` (bootstrapped), a game over ``terminated`` (not);
- ALE games get the recipe the gymnasium path applies (``envs.AtariOptions``): no-op resets of
  up to 30, frame skip 4 with a max-pool of the last two frames, 84x84 grayscale with area
  interpolation, a stack of 4, sticky actions 0.25, the minimal action set as ALE v5 has it, no
  fire reset, no reward clipping or life-loss episodes in the env (the collector applies
  ``--clip-rewards`` and ``--terminal-on-life-loss`` itself from ``lives``, as it does for
  gymnasium), 108,000 emulator frames at most per episode; observations ``(4, 84, 84)`` uint8.

EnvPool seeds its envs when the pool is made (``env_seed``), not at ``reset``: ``reset(seed)``
makes a new pool when the seeds change. Its envs cannot be snapshotted, so a checkpoint holds
no env state for them (a resume restarts the episodes and says so).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any, Iterator, Optional, Sequence

import numpy as np

MAX_EPISODE_FRAMES = 108_000  # ALE v5's limit per episode, in emulator frames


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """EnvPool builds gymnasium Boxes from float64 bounds, which warn on every make: silence that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def installed() -> bool:
    try:
        import envpool  # noqa: F401
    except ImportError:
        return False
    return True


def task_id(env_id: str) -> Optional[str]:
    """EnvPool's id for a gymnasium env id (``ALE/Pong-v5`` -> ``Pong-v5``, ``CartPole-v1`` ->
    itself), or None when EnvPool is missing or does not have that env."""
    if not installed():
        return None
    import envpool

    name = env_id[len("ALE/") :] if env_id.startswith("ALE/") else env_id
    return name if name in envpool.list_all_envs() else None


class EnvPoolVector:
    """A rank's shard of ``num_envs`` envs in one EnvPool (synchronous: every step steps all)."""

    def __init__(self, env_id: str, num_envs: int, atari: Optional[Any], threads: int) -> None:
        """``atari``: the ``envs.AtariOptions`` of an ALE game, None for other envs. ``threads``:
        EnvPool's worker threads (the cores this rank owns)."""
        task = task_id(env_id)
        if task is None:
            raise ValueError(f"EnvPool has no env {env_id!r}")
        self.env_id, self.task, self.num_envs = env_id, task, num_envs
        self.atari, self.threads = atari, max(1, min(threads, num_envs))
        self._pool: Any = None
        self._seeds: list[int] = []

    def _options(self) -> dict[str, Any]:
        a = self.atari
        if a is None:
            return {}
        return dict(stack_num=a.frame_stack, frame_skip=a.frame_skip, noop_max=a.noop_max,
                    img_height=a.screen_size, img_width=a.screen_size, gray_scale=True,
                    use_inter_area_resize=True, repeat_action_probability=a.sticky_actions,
                    full_action_space=False, use_fire_reset=False, episodic_life=False, reward_clip=False,
                    zero_discount_on_life_loss=False, max_episode_steps=MAX_EPISODE_FRAMES // a.frame_skip)  # fmt: skip

    def reset(self, seed: Sequence[int]) -> tuple[np.ndarray, dict[str, Any]]:
        """Start every env's first episode, env ``i`` seeded with ``seed[i]``."""
        import envpool

        seeds = [int(s) for s in seed]
        if len(seeds) != self.num_envs:
            raise ValueError(f"{len(seeds)} seeds for {self.num_envs} envs")
        if self._pool is None or seeds != self._seeds:
            self.close()
            with _quiet():
                self._pool = envpool.make(self.task, env_type="gymnasium", num_envs=self.num_envs,
                                          batch_size=self.num_envs, num_threads=self.threads, env_seed=seeds,
                                          seed=seeds[0], **self._options())  # fmt: skip
            self._seeds = seeds
        with _quiet():  # the first reset builds the spaces
            obs, info = self._pool.reset()
        return obs, self._infos(info)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """One step of every env: (obs, rewards float64, terminated, truncated, infos)."""
        obs, rew, term, trunc, info = self._pool.step(np.asarray(actions, dtype=np.int32))
        return obs, rew.astype(np.float64), term.astype(bool), trunc.astype(bool), self._infos(info)

    @staticmethod
    def _infos(info: dict[str, Any]) -> dict[str, Any]:
        return {"lives": np.asarray(info["lives"])} if "lives" in info else {}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def choose(requested: str, env_id: str, atari: Optional[Any], obs_shape: tuple[int, ...], n_actions: int) -> str:
    """The env backend a run uses: ``requested`` (auto, gymnasium or envpool) resolved for
    ``env_id`` (``atari``: its ``envs.AtariOptions`` for an ALE game, else None). auto: envpool
    for ALE games where it is installed and has the game with the observation and action spaces
    the gymnasium path gives (``obs_shape``, ``n_actions``), else gymnasium. Classic-control envs
    stay on gymnasium under auto: their steps are microseconds next to an update (EnvPool trains
    CartPole no faster: 0.85-0.89x in benchmarks/atari_throughput.py), and gymnasium's envs resume
    exactly, EnvPool's cannot be snapshotted. ALE games under the default sticky actions do not
    resume bitwise on either backend, and their steps are what a GPU waits on. ValueError (one
    line) when envpool is asked for and cannot serve."""
    if requested == "gymnasium" or (requested == "auto" and atari is None):
        return "gymnasium"
    why = _why_not(env_id, atari, obs_shape, n_actions)
    if not why:
        return "envpool"
    if requested == "envpool":
        raise ValueError(f"--env-backend envpool: {why}")
    return "gymnasium"


def _why_not(env_id: str, atari: Optional[Any], obs_shape: tuple[int, ...], n_actions: int) -> str:
    """Why EnvPool cannot step ``env_id`` as the gymnasium path does ("" when it can)."""
    if sys.version_info < (3, 11):
        return "EnvPool's releases for this platform need Python >= 3.11"
    if not installed():
        return "EnvPool is not installed (pip install 'mpirl[envpool]', or MPIRL_EXTRAS=test,envpool)"
    task = task_id(env_id)
    if task is None:
        return f"EnvPool has no env {env_id!r}"
    if atari is not None and atari.noop_max < 1:
        return "EnvPool needs --noop-max >= 1 (it crashes on 0)"
    import envpool

    with _quiet():
        spec = envpool.make_spec(task, num_envs=1, **EnvPoolVector(env_id, 1, atari, 1)._options())
        got_obs, got_n = tuple(spec.observation_space.shape), int(spec.action_space.n)
    if got_obs != tuple(obs_shape) or got_n != n_actions:
        return (f"EnvPool's {task} gives observations {got_obs} and {got_n} actions, the gymnasium env "
                f"{tuple(obs_shape)} and {n_actions}")  # fmt: skip
    return ""
