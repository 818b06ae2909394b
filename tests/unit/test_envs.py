"""Env shards: seeds per rank/env, gymnasium 1.x autoreset masking, spaces we reject."""

import copy
import threading

import numpy as np
import pytest

from mpirl import envs, envstate


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
        assert tracker.finished() == np.flatnonzero((term | trunc) & valid).tolist()  # who, in the lists' order
        assert len(tracker.finished()) == len(fin_r)
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


def packed(vec) -> object:
    """``vec``'s state as it travels in a checkpoint: packed to data and read back."""
    tree = envs.vector_state(vec)
    assert tree is not None
    return envstate.unpack(envstate.pack(tree))


def test_ale_env_state_survives_packing_into_a_fresh_env():
    pytest.importorskip("ale_py")
    atari = envs.AtariOptions(sticky_actions=0.25)
    vec = envs.make_vector("ALE/Pong-v5", 2, atari)
    vec.reset(seed=[1, 2])
    rng = np.random.default_rng(0)
    for _ in range(40):
        vec.step(rng.integers(0, 6, size=2))
    saved = packed(vec)
    other = envs.make_vector("ALE/Pong-v5", 2, atari)
    other.reset(seed=[7, 8])
    envs.restore_vector_state(other, saved)
    for a, b in zip(vec.envs, other.envs):  # emulator memory, RNG and the wrappers' frames
        assert np.array_equal(a.unwrapped.ale.getRAM(), b.unwrapped.ale.getRAM())
        assert a.unwrapped.np_random.bit_generator.state == b.unwrapped.np_random.bit_generator.state
        assert all(np.array_equal(x, y) for x, y in zip(a.obs_queue, b.obs_queue))
    # Without sticky actions (whose last action ALE's state lacks) the futures are identical.
    atari0 = envs.AtariOptions(sticky_actions=0.0)
    vec, other = envs.make_vector("ALE/Pong-v5", 2, atari0), envs.make_vector("ALE/Pong-v5", 2, atari0)
    vec.reset(seed=[1, 2])
    other.reset(seed=[5, 6])
    for _ in range(40):
        vec.step(rng.integers(0, 6, size=2))
    envs.restore_vector_state(other, packed(vec))
    for _ in range(300):
        act = rng.integers(0, 6, size=2)
        o1, r1, t1, _, _ = vec.step(act)
        o2, r2, t2, _, _ = other.step(act)
        assert np.array_equal(o1, o2) and np.array_equal(r1, r2) and np.array_equal(t1, t2)


def test_cartpole_state_is_data_and_resumes_exactly():
    vec, other = envs.make_vector("CartPole-v1", 3), envs.make_vector("CartPole-v1", 3)
    vec.reset(seed=[1, 2, 3])
    other.reset(seed=[4, 5, 6])
    rng = np.random.default_rng(1)
    for _ in range(30):  # past some episode ends: autoresets pending
        vec.step(rng.integers(0, 2, size=3))
    tree = envs.vector_state(vec)
    assert tree is not None and "spec" not in tree["envs"][0]["layers"][-1]  # static config left out
    envs.restore_vector_state(other, packed(vec))
    for _ in range(200):
        act = rng.integers(0, 2, size=3)
        for x, y in zip(vec.step(act)[:4], other.step(act)[:4]):
            assert x.tobytes() == y.tobytes()


def test_an_env_holding_a_handle_is_not_captured():
    vec = envs.make_vector("CartPole-v1", 2)
    vec.reset(seed=[1, 2])
    vec.envs[1].unwrapped.handle = threading.Lock()  # no data encoding: the shard restarts on resume
    assert envs.vector_state(vec) is None
    del vec.envs[1].unwrapped.handle
    assert envs.vector_state(vec) is not None


def test_restore_refuses_states_that_do_not_fit():
    vec = envs.make_vector("CartPole-v1", 2)
    vec.reset(seed=[1, 2])
    good = packed(vec)

    def refused(tree, match):
        fresh = envs.make_vector("CartPole-v1", 2)
        fresh.reset(seed=[3, 4])
        before = fresh.envs[0].unwrapped.state.copy()
        with pytest.raises(envstate.EnvStateError, match=match):
            envs.restore_vector_state(fresh, tree)
        assert np.array_equal(fresh.envs[0].unwrapped.state, before)  # checked before any change

    refused(None, "'envs' missing")
    refused({**good, "envs": good["envs"][:1]}, "saved shard has 1 envs, this one 2")
    chain = copy.deepcopy(good)
    chain["envs"][1]["classes"][0] = "mymodule.Evil"
    refused(chain, "env 1 was saved with another wrapper chain")
    link = copy.deepcopy(good)
    link["envs"][1]["layers"][0]["env"] = 5
    refused(link, "sets attributes it may not: \\['env'\\]")
    ale = copy.deepcopy(good)
    ale["envs"][0]["ale"] = b"x"
    refused(ale, "emulator state unexpected")


def test_atari_preprocessing_shapes_and_registration():
    pytest.importorskip("ale_py")
    info = envs.inspect_env("ALE/Pong-v5", envs.AtariOptions(frame_stack=3))
    assert info.obs_shape == (3, 84, 84) and info.obs_dtype == np.uint8 and info.frame_stack == 3 and info.atari
    assert not envs.inspect_env("CartPole-v1").atari
