"""MinAtar games (Young & Tian 2019) as mpirl trains on them: channels-first uint8 observations,
and the game's state as data for checkpoints.

MinAtar (``pip install 'mpirl[minatar]'``) keeps five Atari games' dynamics on a 10x10 grid:
``MinAtar/Breakout-v1``, ``SpaceInvaders-v1``, ``Asterix-v1``, ``Freeway-v1``, ``Seaquest-v1``
(v1: the minimal action set; v0: all 6 actions). Its envs give ``(10, 10, C)`` bool planes;
``ChannelsFirst`` makes them ``(C, 10, 10)`` uint8 of 0/1, the image layout mpirl's networks and
replay take (one byte per cell, stored once per transition: 400-1,000 B for the 4-10 channels).
Sticky actions are the package's: each step repeats the previous action with p = 0.1, as in the
paper (``sticky_action_prob`` of ``minatar.Environment``); ``--sticky-actions`` is ALE's and
does not apply. Rewards are the game's (0 or 1 per step), so nothing clips them. Episodes end
only by the game (no time limit).

A MinAtar env is a plain Python object graph: ``BaseEnv.game`` (``minatar.Environment``: sticky
action, RNG) holds ``game.env`` (the game: ints, bools, small arrays and lists of them), and both
share one ``numpy.random.RandomState`` once seeded. ``game_state`` captures that graph as data
(``mpirl.envstate`` encodes it; the RNG as its state dict), ``restore_game_state`` sets it back
into a fresh env of the same game, checking names and classes first. The shared RNG stays one
object on restore, so a resumed game draws exactly what the uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

PREFIX = "MinAtar/"
RENDER_SCALE = 16  # --video: each grid cell becomes a 16x16 block (160x160 frames)
RENDER_FPS = 10  # --video: MinAtar declares none (RecordVideo would play 30 steps a second)
# Constants of a game object, fixed by its game and constructor (a fresh env holds the same):
_GAME_CONSTANTS = frozenset({"random", "channels", "action_map"})
_ENV_CONSTANTS = frozenset({"random", "env", "env_name", "n_channels", "sticky_action_prob", "visualized", "closed"})


class GameStateError(ValueError):
    """A saved MinAtar game state that does not fit the fresh env; one line."""


def is_minatar(env_id: str) -> bool:
    return env_id.startswith(PREFIX)


def is_base_env(layer: Any) -> bool:
    """Is ``layer`` MinAtar's gymnasium env (``minatar.gym.BaseEnv``), which holds the game?"""
    return type(layer).__module__ == "minatar.gym" and hasattr(layer, "game")


class ChannelsFirst(gym.ObservationWrapper):
    """``(H, W, C)`` bool planes -> ``(C, H, W)`` uint8 of 0/1; ``render()`` gives uint8 RGB
    frames scaled up ``RENDER_SCALE`` times (MinAtar's own are 10x10 float64)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        h, w, c = env.observation_space.shape  # type: ignore[misc]
        self.observation_space = gym.spaces.Box(0, 1, (c, h, w), np.uint8)
        self.metadata = {**env.metadata, "render_fps": RENDER_FPS}

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.moveaxis(observation, -1, 0), dtype=np.uint8)

    def render(self) -> Any:
        frame = self.env.render()
        if not isinstance(frame, np.ndarray) or frame.ndim != 3:
            return frame  # "human" or None: MinAtar's own
        rgb = np.clip(np.asarray(frame) * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(np.repeat(rgb, RENDER_SCALE, axis=0), RENDER_SCALE, axis=1)


def _class_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"  # compared on restore, never imported


def _fields(obj: Any, constants: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if k not in constants}


def game_state(base: Any) -> dict[str, Any]:
    """The state of ``base`` (a ``minatar.gym.BaseEnv``) as data: the game's class and fields,
    the sticky-action wrapper's fields (the last action), and the RNG state(s) (one when, as
    after every seeded reset, the wrapper and the game share their RandomState)."""
    env, game = base.game, base.game.env
    shared = env.random is game.random
    rngs = [env.random] if shared else [env.random, game.random]
    return {
        "game_class": _class_name(game),
        "env": _fields(env, _ENV_CONSTANTS),
        "game": _fields(game, _GAME_CONSTANTS),
        "rngs": [r.get_state(legacy=False) for r in rngs],
    }


def check_game_state(base: Any, state: Any) -> tuple[dict[str, Any], dict[str, Any], list[np.random.RandomState]]:
    """``state`` (data read from a file) checked against the fresh ``base``: the same game, the
    same field names, valid RNG states. Returns what ``restore_game_state`` sets; changes nothing."""
    if type(state) is not dict or set(state) != {"game_class", "env", "game", "rngs"}:
        raise GameStateError("MinAtar game state is not game_class, env, game, rngs")
    env, game = base.game, base.game.env
    if state["game_class"] != _class_name(game):
        raise GameStateError(f"MinAtar game state is of {str(state['game_class'])[:60]}, this env {_class_name(game)}")
    for part, obj, constants in (("env", env, _ENV_CONSTANTS), ("game", game, _GAME_CONSTANTS)):
        saved = state[part]
        if type(saved) is not dict or set(saved) != set(_fields(obj, constants)):
            raise GameStateError(f"MinAtar game state: the {part}'s fields differ from this version's")
    saved_rngs = state["rngs"]
    if type(saved_rngs) is not list or len(saved_rngs) not in (1, 2):
        raise GameStateError("MinAtar game state: rngs is not a list of one or two states")
    rngs = []
    for s in saved_rngs:
        rng = np.random.RandomState(0)  # seeded: no OS entropy; the saved state replaces it
        try:
            if type(s) is not dict or s.get("bit_generator") != "MT19937":
                raise ValueError("not an MT19937 state")
            rng.set_state(s)
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:  # what set_state raises
            raise GameStateError(f"MinAtar game state: bad RNG state ({type(exc).__name__}: {exc})") from None
        rngs.append(rng)
    return state["env"], state["game"], rngs


def restore_game_state(base: Any, checked: tuple[dict[str, Any], dict[str, Any], list[np.random.RandomState]]) -> None:
    """Set ``check_game_state``'s result into ``base``'s game objects."""
    env_fields, game_fields, rngs = checked
    env, game = base.game, base.game.env
    vars(env).update(env_fields)
    vars(game).update(game_fields)
    env.random = rngs[0]
    game.random = rngs[-1]  # the same object when one state was saved: the game draws from it too
