"""MinAtar games (issue 15): registration on first use, channels-first uint8 planes, the
gymnasium backend, no reward clipping, the game's state as checked data, rendering."""

import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from mpirl import config, envs, envstate, minatar_env
from mpirl.collector import Collector
from mpirl.config import Config

pytest.importorskip("minatar", reason="the minatar extra is not installed")
GAMES = {"Breakout": (4, 3), "SpaceInvaders": (6, 4), "Asterix": (4, 5), "Freeway": (7, 3), "Seaquest": (10, 6)}


@pytest.mark.parametrize("game", sorted(GAMES))
def test_planes_are_channels_first_uint8_of_the_games_state(game):
    env_id = f"MinAtar/{game}-v1"
    channels, n_actions = GAMES[game]
    info = envs.inspect_env(env_id)
    assert info.obs_shape == (channels, 10, 10) and info.obs_dtype == np.uint8 and info.n_actions == n_actions
    assert info.frame_stack == 0 and not info.atari  # no frame-stack replay, no Atari recipe
    env = envs.make_env(env_id)
    obs, _ = env.reset(seed=4)
    for _ in range(30):
        raw = env.unwrapped.game.state()  # (10, 10, C) bool
        assert obs.dtype == np.uint8 and obs.shape == (channels, 10, 10) and obs.flags.c_contiguous
        np.testing.assert_array_equal(obs, np.moveaxis(raw, -1, 0).astype(np.uint8))
        obs, _, term, _, _ = env.step(env.action_space.sample())
        if term:
            obs, _ = env.reset()
    assert env.unwrapped.game.sticky_action_prob == 0.1  # the package's (and the paper's) sticky actions


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.delitem(gym.registry, "MinAtar/Breakout-v1", raising=False)
    monkeypatch.setitem(sys.modules, "minatar.gym", None)  # import fails as if not installed
    with pytest.raises(envs.EnvError, match=r"needs the minatar extra: pip install 'mpirl\[minatar\]'") as info:
        envs.inspect_env("MinAtar/Breakout-v1")
    assert "\n" not in str(info.value)


def test_gymnasium_backend_under_auto_and_envpool_refused():
    info = envs.inspect_env("MinAtar/Breakout-v1")
    assert envs.choose_backend("auto", "MinAtar/Breakout-v1", info) == "gymnasium"
    with pytest.raises(envs.EnvError, match="--env-backend envpool"):
        envs.choose_backend("envpool", "MinAtar/Breakout-v1", info)


def test_collector_stores_planes_and_game_scores_unclipped():
    cfg = Config(env_id="MinAtar/SpaceInvaders-v1", num_envs_per_rank=2, buffer_size_per_rank=300,
                 batch_size_per_rank=4, learning_starts_per_rank=8).validate()  # fmt: skip
    assert cfg.clip_rewards == "auto"
    col = Collector(cfg, envs.inspect_env(cfg.env_id), rank=0)
    assert not col.clip_rewards and not col.frame_stacked
    for _ in range(200):
        col.step(lambda o: np.zeros(len(o), np.int64), 1.0)
    arrays = col.replay.export_arrays()
    assert arrays["obs"].dtype == np.uint8 and arrays["obs"].shape[1:] == (6, 10, 10)
    assert set(np.unique(arrays["obs"])) <= {0, 1}
    row = 2 * 600 + 15  # obs and next_obs of 600 B each, then action, reward, steps and two flags
    assert Collector.replay_bytes(cfg, envs.inspect_env(cfg.env_id)) == 300 * row
    col.close()


def test_game_state_is_data_and_a_misfit_is_refused_before_any_change():
    vec = envs.make_vector("MinAtar/Breakout-v1", 2)
    vec.reset(seed=[1, 2])
    for _ in range(20):
        vec.step(np.array([1, 2]))
    tree = envstate.unpack(envstate.pack(envs.vector_state(vec)))
    game = tree["envs"][0]["minatar"]
    assert game["game_class"] == "minatar.environments.breakout.Env" and len(game["rngs"]) == 1  # one shared RNG
    assert "last_action" in game["env"] and "brick_map" in game["game"]
    fresh = envs.make_vector("MinAtar/Breakout-v1", 2)
    fresh.reset(seed=[7, 8])
    before = fresh.envs[0].unwrapped.game.env.brick_map.copy(), fresh.envs[0].unwrapped.game.random.get_state()[1]

    def refused(edit, match):
        bad = envstate.unpack(envstate.pack(tree))
        edit(bad["envs"][1]["minatar"])
        with pytest.raises(envstate.EnvStateError, match=match) as info:
            envs.restore_vector_state(fresh, bad)
        assert "\n" not in str(info.value)
        np.testing.assert_array_equal(fresh.envs[0].unwrapped.game.env.brick_map, before[0])  # env 0 untouched
        np.testing.assert_array_equal(fresh.envs[0].unwrapped.game.random.get_state()[1], before[1])

    refused(lambda g: g["game"].pop("ball_x"), "fields differ")
    refused(lambda g: g["game"].__setitem__("__class__", 1), "fields differ")
    refused(lambda g: g.__setitem__("game_class", "minatar.environments.seaquest.Env"), "is of minatar")
    refused(lambda g: g["rngs"][0].__setitem__("bit_generator", "PCG64"), "bad RNG state")
    refused(lambda g: g["rngs"][0]["state"].__setitem__("key", np.zeros(3, np.uint32)), "bad RNG state")
    refused(lambda g: g.pop("rngs"), "not game_class, env, game, rngs")
    bad = envstate.unpack(envstate.pack(tree))
    del bad["envs"][1]["minatar"]
    with pytest.raises(envstate.EnvStateError, match="MinAtar game missing"):
        envs.restore_vector_state(fresh, bad)
    bad = envstate.unpack(envstate.pack(tree))
    bad["envs"][1]["layers"][-1]["game"] = {}  # the game object may not be set as a plain attribute
    with pytest.raises(envstate.EnvStateError, match="sets attributes it may not"):
        envs.restore_vector_state(fresh, bad)
    envs.restore_vector_state(fresh, tree)
    game_obj = fresh.envs[1].unwrapped.game
    assert game_obj.random is game_obj.env.random  # the shared RNG stays one object


def test_render_gives_uint8_rgb_frames_for_video():
    env = envs.make_env("MinAtar/Breakout-v1", render_mode="rgb_array")
    env.reset(seed=0)
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.shape == (160, 160, 3) and frame.max() > 0
    assert isinstance(env, minatar_env.ChannelsFirst)


def test_the_recipe_parses_and_keeps_the_papers_ratio():
    recipe = Path(__file__).resolve().parents[2] / "configs" / "minatar-dqn.toml"
    cfg = config.parse_args(["--config", str(recipe)])
    assert cfg.env_id == "MinAtar/Breakout-v1" and cfg.clip_rewards == "off"
    # the paper's 32 samples per env step (one update of 32 per frame), per rank
    assert cfg.batch_size_per_rank * cfg.gradient_steps / (cfg.num_envs_per_rank * cfg.train_every) == 32
    # the paper's target period of 1,000 env steps of a rank
    assert cfg.target_update_interval * cfg.num_envs_per_rank * cfg.train_every / cfg.gradient_steps == 1000
    assert (cfg.buffer_size_per_rank, cfg.eps_end, cfg.gamma) == (100_000, 0.1, 0.99)
    assert cfg.n_step == 1  # the paper's one-step targets: 2- and 3-step returns never learned Asterix
    assert cfg.eps_decay_steps <= cfg.total_env_steps
