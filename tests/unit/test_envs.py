"""Env shards: seeds per rank/env, gymnasium 1.x autoreset masking, spaces we reject."""

import numpy as np
import pytest

from mpirl import envs


def test_shard_seeds_distinct_across_ranks_and_envs():
    seeds = [s for r in range(4) for s in envs.shard_seeds(10, r, 3)]
    assert seeds == list(range(10, 22))


def test_inspect_env_cartpole_and_rejections():
    info = envs.inspect_env("CartPole-v1")
    assert info.obs_shape == (4,) and info.n_actions == 2 and info.reward_threshold == 475.0
    with pytest.raises(envs.EnvError, match="Discrete action space"):
        envs.inspect_env("Pendulum-v1")
    with pytest.raises(envs.EnvError, match="unknown or unusable environment 'Nope-v9'"):
        envs.inspect_env("Nope-v9")


def test_tracker_masks_the_autoreset_step_next_step_mode():
    """gymnasium 1.x: the step after termination is a reset step whose reward must not count."""
    vec = envs.make_vector("CartPole-v1", 2)
    obs, _ = vec.reset(seed=[0, 1])
    tracker = envs.EpisodeTracker(2)
    finished, steps_after_done = [], 0
    prev_done = np.zeros(2, dtype=bool)
    for _ in range(400):
        obs2, rew, term, trunc, _ = vec.step(np.zeros(2, dtype=np.int64))  # always push left: short episodes
        valid, fin_r, fin_l = tracker.step(rew, term, trunc)
        # the mask is exactly "not done on the previous step"
        np.testing.assert_array_equal(valid, ~prev_done)
        steps_after_done += int((~valid).sum())
        prev_done = term | trunc
        finished += list(zip(fin_r, fin_l))
    vec.close()
    assert len(finished) > 10 and steps_after_done > 10
    # CartPole pays 1 per step: an episode's return equals its length (reset steps excluded)
    assert all(r == length for r, length in finished)


def test_evaluate_plays_one_episode_per_seed():
    rets = envs.evaluate(lambda o: np.zeros(len(o), dtype=np.int64), "CartPole-v1", [3, 4, 5])
    assert len(rets) == 3 and all(5 <= r <= 30 for r in rets)
    assert envs.evaluate(lambda o: o, "CartPole-v1", []) == []
