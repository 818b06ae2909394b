"""Replay: ring wrap-around, n-step returns (terminal vs truncated, autoreset mask), PER."""

import numpy as np
import pytest

from mpirl.replay import NStepAccumulator, PrioritizedReplayBuffer, ReplayBuffer, SumTree, Transitions


def _tr(values, obs_dim=2):
    v = np.asarray(values, dtype=np.float32)
    return Transitions(
        obs=np.repeat(v[:, None], obs_dim, axis=1),
        actions=v.astype(np.int64),
        rewards=v,
        next_obs=np.repeat(v[:, None] + 100, obs_dim, axis=1),
        steps=np.ones(len(v), dtype=np.uint8),
        terminated=np.zeros(len(v), dtype=bool),
        truncated=np.zeros(len(v), dtype=bool),
    )


def test_ring_wraps_and_keeps_newest():
    buf = ReplayBuffer(5, (2,), np.float32, gamma=0.9)
    buf.add(_tr([0, 1, 2]))
    assert len(buf) == 3 and buf.pos == 3
    buf.add(_tr([3, 4, 5, 6]))
    assert len(buf) == 5 and buf.pos == 2
    # slots 0,1 were overwritten by 5,6
    assert buf.actions.tolist() == [5, 6, 2, 3, 4]
    exported = buf.export_arrays()
    assert exported["actions"].tolist() == [5, 6, 2, 3, 4]  # slot order; oldest at pos
    assert buf.total_added == 7


def test_add_more_than_capacity_keeps_last():
    buf = ReplayBuffer(3, (2,), np.float32, gamma=0.9)
    buf.add(_tr([0, 1, 2, 3, 4]))
    assert sorted(buf.actions.tolist()) == [2, 3, 4]
    assert len(buf) == 3


def test_uniform_sample_only_filled_slots_and_discounts():
    buf = ReplayBuffer(100, (2,), np.float32, gamma=0.5)
    t = _tr([1, 2, 3])
    t = t._replace(steps=np.array([1, 2, 3], np.uint8), terminated=np.array([False, False, True]))
    buf.add(t)
    b = buf.sample(500, np.random.default_rng(0))
    assert set(b.indices.tolist()) == {0, 1, 2}
    expect = {0: 0.5, 1: 0.25, 2: 0.0}  # gamma^k, zero where terminated
    for i, d in zip(b.indices, b.discounts):
        assert d == pytest.approx(expect[int(i)])
    assert np.all(b.weights == 1.0)


def test_export_import_roundtrip_keeps_layout_and_sampling():
    buf = ReplayBuffer(4, (2,), np.float32, gamma=0.9)
    buf.add(_tr([0, 1, 2, 3, 4, 5]))
    other = ReplayBuffer(4, (2,), np.float32, gamma=0.9)
    other.import_arrays(buf.export_arrays(), buf.state())
    for k, v in buf.export_arrays().items():
        np.testing.assert_array_equal(other.export_arrays()[k], v)
    assert other.state() == buf.state()
    a, b = buf.sample(16, np.random.default_rng(3)), other.sample(16, np.random.default_rng(3))
    np.testing.assert_array_equal(a.actions, b.actions)
    other.add(_tr([9]))
    buf.add(_tr([9]))
    np.testing.assert_array_equal(other.actions, buf.actions)


def test_import_oldest_first_into_smaller_buffer_keeps_newest():
    small = ReplayBuffer(3, (2,), np.float32, gamma=0.9)
    small.import_arrays(_tr([0, 1, 2, 3, 4])._asdict())
    assert small.actions.tolist() == [2, 3, 4] and len(small) == 3 and small.pos == 0


def _push_episode(acc, rewards, terminated_at_end):
    out = []
    T = len(rewards)
    for t in range(T):
        last = t == T - 1
        r = acc.push(
            obs=np.array([[float(t)]]),
            actions=np.array([t]),
            rewards=np.array([rewards[t]], dtype=np.float32),
            next_obs=np.array([[float(t + 1)]]),
            terminated=np.array([last and terminated_at_end]),
            truncated=np.array([last and not terminated_at_end]),
            valid=np.array([True]),
        )
        if r is not None:
            out.extend(zip(r.obs[:, 0], r.rewards, r.next_obs[:, 0], r.steps, r.terminated, r.truncated))
    return out


@pytest.mark.parametrize("terminated", [True, False])
def test_nstep_returns_hand_computed(terminated):
    g = 0.9
    acc = NStepAccumulator(1, n=3, gamma=g)
    r = [1.0, 2.0, 3.0, 4.0]
    out = _push_episode(acc, r, terminated)
    # (obs, return, next_obs, k, terminated)
    expected = [
        (0, r[0] + g * r[1] + g * g * r[2], 3, 3, False),
        (1, r[1] + g * r[2] + g * g * r[3], 4, 3, terminated),
        (2, r[2] + g * r[3], 4, 2, terminated),
        (3, r[3], 4, 1, terminated),
    ]
    assert len(out) == len(expected)
    for got, exp in zip(out, expected):
        assert got[0] == exp[0]
        assert got[1] == pytest.approx(exp[1], rel=1e-6)
        assert got[2] == exp[2]
        assert int(got[3]) == exp[3]
        assert bool(got[4]) == exp[4]
        assert bool(got[5]) == (exp[0] > 0 and not terminated)  # truncated: the flushed tail only


def test_nstep_skips_autoreset_steps_and_keeps_envs_apart():
    acc = NStepAccumulator(2, n=1, gamma=0.99)
    obs = np.array([[0.0], [10.0]])
    r = acc.push(
        obs,
        np.array([0, 1]),
        np.array([1.0, 2.0]),
        obs + 1,
        np.array([True, False]),
        np.array([False, False]),
        np.array([True, True]),
    )
    assert r is not None and r.size == 2
    # next step: env 0 is autoresetting -> ignored
    r = acc.push(
        obs + 1,
        np.array([0, 1]),
        np.array([0.0, 3.0]),
        obs + 2,
        np.array([False, False]),
        np.array([False, False]),
        np.array([False, True]),
    )
    assert r.size == 1 and r.obs[0, 0] == 11.0 and r.rewards[0] == 3.0


def test_sumtree_find_matches_cumsum():
    rng = np.random.default_rng(1)
    tree = SumTree(37)
    vals = rng.random(37)
    tree.set(np.arange(37), vals)
    assert tree.total == pytest.approx(vals.sum())
    assert tree.min_value == pytest.approx(vals.min())
    q = rng.random(1000) * vals.sum()
    expect = np.searchsorted(np.cumsum(vals), q, side="left")
    np.testing.assert_array_equal(tree.find(q), expect)
    tree.set(np.array([3]), np.array([100.0]))
    assert tree.total == pytest.approx(vals.sum() - vals[3] + 100.0)


def test_per_sampling_proportions_and_weights():
    buf = PrioritizedReplayBuffer(4, (2,), np.float32, gamma=0.9, alpha=1.0, eps=0.0)
    buf.add(_tr([0, 1, 2, 3]))
    buf.update_priorities(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    rng = np.random.default_rng(0)
    counts = np.zeros(4)
    for _ in range(200):
        b = buf.sample(50, rng, beta=0.5)
        counts += np.bincount(b.indices, minlength=4)
    freq = counts / counts.sum()
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)
    # w_i = (N P_i)^-beta / max_j (N P_j)^-beta = (p_i / p_min)^-beta
    b = buf.sample(8, rng, beta=0.5)
    np.testing.assert_allclose(b.weights, (b.indices + 1.0) ** -0.5, rtol=1e-6)


def test_per_alpha_and_new_transitions_get_max_priority():
    buf = PrioritizedReplayBuffer(8, (2,), np.float32, gamma=0.9, alpha=0.5, eps=0.0)
    buf.add(_tr([0, 1]))
    buf.update_priorities(np.array([0, 1]), np.array([4.0, 16.0]))
    np.testing.assert_allclose(buf.tree.get(np.array([0, 1])), [2.0, 4.0])
    buf.add(_tr([2]))
    assert buf.tree.get(np.array([2]))[0] == pytest.approx(4.0)  # 16 ** 0.5


def test_per_export_import_keeps_priorities():
    buf = PrioritizedReplayBuffer(4, (2,), np.float32, gamma=0.9, alpha=1.0)
    buf.add(_tr([0, 1, 2]))
    buf.update_priorities(np.arange(3), np.array([1.0, 5.0, 2.0]))
    other = PrioritizedReplayBuffer(4, (2,), np.float32, gamma=0.9, alpha=1.0)
    other.import_arrays(buf.export_arrays(), buf.state())
    np.testing.assert_array_equal(other.tree.sum, buf.tree.sum)
    assert other.max_priority == buf.max_priority


def test_empty_sample_raises():
    with pytest.raises(RuntimeError):
        ReplayBuffer(4, (2,), np.float32, 0.9).sample(2, np.random.default_rng(0))
