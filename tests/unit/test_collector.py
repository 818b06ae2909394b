"""Collector: n-step assembly across gymnasium 1.x autoresets, episode statistics (game scores
under reward clipping), ε-greedy acting and its RNG use, exact state round trips.

The env is tests/unit/toy_envs.py: with seed 10, env 0 (kind 0) terminates on its 4th step and
env 1 (kind 1) is truncated by TimeLimit after 5 steps; obs = [100 * kind + episode, t] and the
reward of the step from t with action a is (t - 1) * (1 + a). The greedy policy used below
picks a = t % 2, so every episode's rewards are [-1, 0, 1, 4] (kind 0) or [-1, 0, 1, 4, 3]
(kind 1): returns 4 and 7.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import toy_envs
from toy_envs import TOY_ID

from mpirl import envs
from mpirl.collector import Collector, EpisodeStats
from mpirl.config import Config

N, GAMMA = 3, 0.5


def make_cfg(**kw) -> Config:
    base = dict(
        env_id=TOY_ID, num_envs_per_rank=2, seed=10, n_step=N, gamma=GAMMA, buffer_size_per_rank=1000,
        batch_size_per_rank=4, learning_starts_per_rank=8, clip_rewards="off", hidden_sizes=(8,),
    )  # fmt: skip
    base.update(kw)
    return Config(**base).validate()


def make_collector(**kw) -> Collector:
    cfg = make_cfg(**kw)
    return Collector(cfg, envs.inspect_env(cfg.env_id), rank=0)


def t_parity(obs: np.ndarray) -> np.ndarray:
    """The greedy policy of these tests: action = t % 2."""
    return (obs[:, 1].astype(np.int64) % 2).astype(np.int64)


def run(col: Collector, steps: int, greedy=t_parity, epsilon: float = 0.0) -> None:
    for _ in range(steps):
        col.step(greedy, epsilon)


def expected_transitions(steps: int, kinds=(0, 1), clip: bool = False) -> list[dict]:
    """The transitions ``steps`` vector steps store, in storage order, computed from the
    episode timeline alone: env e runs episodes of L steps, each followed by one autoreset
    step (no transition); the transition from t spans k = min(n, L - t) steps and is stored
    at the vector step of its last env step (per step: env 0 first, then by start t)."""
    rows = []
    for e, kind in enumerate(kinds):
        L = toy_envs.episode_length(kind)
        cycle = L + 1  # L real steps, then the autoreset step
        for ep in range(steps // cycle + 1):
            marker = 100 * kind + ep
            for t in range(L):
                k = min(N, L - t)
                done_at = ep * cycle + t + k - 1  # vector step that completes it
                if done_at >= steps:
                    continue
                rs = [toy_envs.reward(t + i, (t + i) % 2) for i in range(k)]
                if clip:
                    rs = [float(np.sign(r)) for r in rs]
                ends = t + k == L
                row = dict(
                    obs=[marker, t], actions=t % 2, rewards=sum(GAMMA**i * r for i, r in enumerate(rs)),
                    next_obs=[marker, t + k], steps=k, terminated=ends and kind == 0, truncated=ends and kind == 1,
                )  # fmt: skip
                rows.append(((done_at, e, t), row))
    return [r for _, r in sorted(rows, key=lambda x: x[0])]


def stored(col: Collector) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in col.replay.export_arrays().items()}


def check_against(arrays: dict[str, np.ndarray], rows: list[dict]) -> None:
    assert len(arrays["actions"]) == len(rows)
    for field in ("obs", "actions", "rewards", "next_obs", "steps", "terminated", "truncated"):
        want = np.array([r[field] for r in rows])
        np.testing.assert_array_equal(arrays[field], want.astype(arrays[field].dtype), err_msg=field)


# --- n-step assembly --------------------------------------------------------------------


def test_first_episodes_by_hand():
    """The first episode of each env, written out: n = 3, gamma = 0.5."""
    col = make_collector()
    run(col, 6)  # env 0: steps 0-3 episode 0, step 4 autoreset, step 5 t=0; env 1: steps 0-4, step 5 reset
    a = stored(col)
    # kind 0, rewards [-1, 0, 1, 4]; terminated on its 4th step: no bootstrap, k < n at the end.
    # kind 1, rewards [-1, 0, 1, 4, 3]; truncated after 5 steps: bootstraps from obs [100, 5].
    want = [  # (obs, next_obs, reward, k, terminated, truncated), in storage order
        ([0, 0], [0, 3], -1 + 0 + 0.25 * 1, 3, False, False),  # step 2: env 0's t=0
        ([100, 0], [100, 3], -0.75, 3, False, False),  # step 2: env 1's t=0
        ([0, 1], [0, 4], 0 + 0.5 * 1 + 0.25 * 4, 3, True, False),  # step 3: env 0 terminates
        ([0, 2], [0, 4], 1 + 0.5 * 4, 2, True, False),
        ([0, 3], [0, 4], 4.0, 1, True, False),
        ([100, 1], [100, 4], 1.5, 3, False, False),  # step 3: env 1's t=1
        ([100, 2], [100, 5], 1 + 0.5 * 4 + 0.25 * 3, 3, False, True),  # step 4: time limit
        ([100, 3], [100, 5], 4 + 0.5 * 3, 2, False, True),
        ([100, 4], [100, 5], 3.0, 1, False, True),
    ]  # step 4 of env 0 and step 5 of env 1 are autoresets; env 0's t=0 at step 5 is pending
    assert len(col.replay) == len(want)
    for i, (o, no, r, k, term, trunc) in enumerate(want):
        assert a["obs"][i].tolist() == o and a["next_obs"][i].tolist() == no, i
        assert a["rewards"][i] == r and a["steps"][i] == k, i
        assert (bool(a["terminated"][i]), bool(a["truncated"][i])) == (term, trunc), i
    assert a["actions"].tolist() == [0, 0, 1, 0, 1, 1, 0, 1, 0]  # t % 2
    # discounts the learner will use: gamma^k, 0 where terminated (truncation bootstraps)
    b = col.replay.sample(300, np.random.default_rng(0))
    assert set(b.indices.tolist()) == set(range(len(want)))
    discounts = np.array([0.125, 0.125, 0, 0, 0, 0.125, 0.125, 0.25, 0.5], np.float32)
    np.testing.assert_array_equal(b.discounts, discounts[b.indices])


@pytest.mark.parametrize("clip", [False, True])
def test_nstep_assembly_across_autoresets(clip):
    steps = 23
    col = make_collector(clip_rewards="on" if clip else "off")
    run(col, steps)
    a = stored(col)
    rows = expected_transitions(steps, clip=clip)
    # Hand count: env 0 (cycle 5) ends episodes at steps 3, 8, 13, 18 (4 x 4 transitions), its
    # 5th episode has taken t = 0..2 at steps 20-22: 1 complete transition; env 1 (cycle 6)
    # ends episodes at 4, 10, 16, 22: 4 x 5. 16 + 1 + 20 = 37.
    assert len(rows) == 37 and len(col.replay) == 37 and col.replay.total_added == 37
    check_against(a, rows)
    # No transition crosses an episode boundary or starts/ends in an autoreset step.
    assert (a["obs"][:, 0] == a["next_obs"][:, 0]).all()
    assert (a["next_obs"][:, 1] - a["obs"][:, 1] == a["steps"]).all()
    assert (a["steps"] <= N).all()
    short = a["steps"] < N
    assert (a["terminated"] | a["truncated"])[short].all()  # k < n only at episode ends
    assert not (a["terminated"] & a["truncated"]).any()
    lengths = np.where(a["obs"][:, 0] >= 100, toy_envs.TIME_LIMIT, toy_envs.TERM_LEN)
    ends = a["next_obs"][:, 1] == lengths
    np.testing.assert_array_equal(a["terminated"] | a["truncated"], ends)
    np.testing.assert_array_equal(a["terminated"], ends & (a["obs"][:, 0] < 100))  # kind 0 terminates
    np.testing.assert_array_equal(a["truncated"], ends & (a["obs"][:, 0] >= 100))  # kind 1 is truncated


def test_termination_at_the_time_limit_counts_as_termination():
    """Kind 0 both terminates and hits a TimeLimit of 4 on its 4th step: no bootstrap (terminated
    only); kind 1 is truncated at 4."""
    col = make_collector(env_id=toy_envs.TOY_BOTH_ID)
    run(col, 5)  # one episode each (steps 0-3), then both autoreset at step 4
    a = stored(col)
    assert len(col.replay) == 8 and col.stats.episodes == 2
    ends = a["next_obs"][:, 1] == 4
    assert ends.sum() == 6  # t = 1, 2, 3 of each env
    kind0 = a["obs"][:, 0] < 100
    np.testing.assert_array_equal(a["terminated"], ends & kind0)
    np.testing.assert_array_equal(a["truncated"], ends & ~kind0)


def test_ring_wraps_to_the_newest_transitions():
    steps = 23
    col = make_collector(buffer_size_per_rank=16, learning_starts_per_rank=8)
    run(col, steps)
    rows = expected_transitions(steps)[-16:]  # 37 added, the ring of 16 keeps the newest
    assert len(col.replay) == 16 and col.replay.pos == 37 % 16
    a = stored(col)
    order = (col.replay.pos + np.arange(16)) % 16  # oldest first
    check_against({k: v[order] for k, v in a.items()}, rows)


def test_epsilon_one_stores_the_taken_random_actions():
    """Exploring actions are what the env got: each stored reward matches its stored actions."""
    col = make_collector(n_step=1)
    run(col, 30, greedy=None, epsilon=1.0)
    a = stored(col)
    want = [toy_envs.reward(int(t), int(act)) for t, act in zip(a["obs"][:, 1], a["actions"])]
    np.testing.assert_array_equal(a["rewards"], want)
    assert set(a["actions"].tolist()) == {0, 1}


# --- episode statistics -----------------------------------------------------------------


@pytest.mark.parametrize("clip", ["off", "on"])
def test_episode_stats_are_game_scores(clip):
    col = make_collector(clip_rewards=clip)
    run(col, 23)
    # finished: env 0 at steps 3, 8, 13, 18 (return 4, length 4); env 1 at 4, 10, 16, 22 (7, 5)
    s = col.stats
    assert s.episodes == 8 and s.window_episodes == 8
    assert s.window_return_sum == 4 * 4 + 4 * 7  # raw rewards even when replay holds sign(r)
    assert s.window_length_sum == 4 * 4 + 4 * 5
    if clip == "on":
        assert col.replay.rewards[: len(col.replay)].max() <= 1.0 + 0.5 + 0.25
    assert s.take_window() == (44.0, 36.0, 8.0)
    assert (s.window_return_sum, s.window_length_sum, s.window_episodes, s.episodes) == (0.0, 0.0, 0, 8)
    run(col, 5)  # steps 23-27: env 0 ends an episode at 23; env 1 at 28 (not yet)
    assert s.episodes == 9 and s.take_window() == (4.0, 4.0, 1.0)


def test_episode_stats_meta_round_trip():
    s = EpisodeStats()
    s.add([4.0, 7.5], [4, 5])
    s.add([-1.0], [3])
    assert (s.episodes, s.window_return_sum, s.window_length_sum, s.window_episodes) == (3, 10.5, 12.0, 3)
    meta = s.to_meta()
    assert meta == [10.5, 12.0, 3.0, 0.0, 0.0]
    back = EpisodeStats.from_meta(s.episodes, meta)
    assert back == s
    s.take_window()
    assert EpisodeStats.from_meta(s.episodes, s.to_meta()) == EpisodeStats(episodes=3)


# --- ε-greedy ---------------------------------------------------------------------------


def _never(obs: np.ndarray) -> np.ndarray:
    raise AssertionError("the greedy policy must not be called when every env explores")


def test_epsilon_one_skips_the_forward_pass():
    col = make_collector()
    for _ in range(20):
        acts = col.act(_never, 1.0)
        assert acts.shape == (2,) and set(acts.tolist()) <= {0, 1}
    run(col, 10, greedy=_never, epsilon=1.0)


def test_epsilon_zero_takes_the_greedy_actions():
    col = make_collector()
    seen = []

    def greedy(obs):
        seen.append(obs.copy())
        return np.array([1, 0]) if len(seen) % 2 else np.array([0, 1])

    for i in range(10):
        np.testing.assert_array_equal(col.act(greedy, 0.0), [1, 0] if i % 2 == 0 else [0, 1])
    np.testing.assert_array_equal(seen[0], col.obs)  # called with the current observations
    assert len(seen) == 10


def test_rng_draws_do_not_depend_on_the_forward_pass():
    col = make_collector()
    col.rng.random(7)  # some non-initial state
    start = copy.deepcopy(col.rng.bit_generator.state)
    explored = col.act(_never, 1.0)
    after_explore = copy.deepcopy(col.rng.bit_generator.state)
    col.rng.bit_generator.state = start
    col.act(lambda o: np.zeros(len(o), np.int64), 0.0)
    assert col.rng.bit_generator.state == after_explore
    col.rng.bit_generator.state = start
    half = col.act(lambda o: np.full(len(o), 7), 0.5)  # 7: marks the greedy choices
    assert col.rng.bit_generator.state == after_explore
    # the random actions are the same draws whichever envs explore
    assert all(h in (7, e) for h, e in zip(half.tolist(), explored.tolist()))
    assert start != after_explore


def test_epsilon_half_explores_about_half_the_time():
    col = make_collector()
    acts = np.concatenate([col.act(lambda o: np.full(len(o), 7), 0.5) for _ in range(2000)])
    frac = np.mean(acts != 7)
    assert 0.45 < frac < 0.55
    assert abs(np.mean(acts[acts != 7] == 1) - 0.5) < 0.05


# --- checkpoints ------------------------------------------------------------------------


def _meta(state) -> dict:
    return {"replay": state.replay_state, "numpy_rng": state.numpy_rng, "episodes": state.stats.episodes,
            "win": state.stats.to_meta()}  # fmt: skip


def _feed(col: Collector, state, meta, chunk: int = 5) -> None:
    total = len(state.replay_arrays["actions"])
    col.begin_restore(total, [meta])
    for name, arr in state.replay_arrays.items():
        for lo in range(0, len(arr), chunk):  # streamed in chunks, as checkpoint.restore_shards does
            col.restore_rows(name, lo, np.array(arr[lo : lo + chunk]))
    env = np.frombuffer(state.env_state, np.uint8)
    for lo in range(0, len(env), 1000):
        col.restore_rows("env_state", lo, env[lo : lo + 1000])


def _same(a: Collector, b: Collector) -> None:
    ea, eb = stored(a), stored(b)
    assert ea.keys() == eb.keys()
    for k in ea:
        np.testing.assert_array_equal(ea[k], eb[k], err_msg=k)
    assert a.replay.state() == b.replay.state()
    assert a.stats == b.stats
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    np.testing.assert_array_equal(a.obs, b.obs)


@pytest.mark.parametrize("capacity", [1000, 16])  # 16: the ring has wrapped when the state is taken
def test_state_restore_resumes_exactly(capacity):
    epsilon = 0.3  # some random actions, so the RNG state matters
    a = make_collector(buffer_size_per_rank=capacity)
    run(a, 13, epsilon=epsilon)  # mid-episode on both envs, with n-step transitions pending
    a.stats.take_window()
    run(a, 4, epsilon=epsilon)
    state = a.state()
    assert state.env_state and state.replay_arrays
    meta = copy.deepcopy(_meta(state))
    b = make_collector(buffer_size_per_rank=capacity)
    _feed(b, state, meta)
    note, got = b.end_restore(same_world=True, global_steps=34)
    assert note.startswith("exact resume") and got is meta
    _same(a, b)
    for _ in range(40):  # crosses many episode ends on both envs
        a.step(t_parity, epsilon)
        b.step(t_parity, epsilon)
        _same(a, b)
    assert a.stats.episodes > 10


def test_restore_at_another_world_size_starts_the_envs_fresh():
    a = make_collector()
    run(a, 13, epsilon=0.3)
    state = a.state()
    want = stored(a)
    b = make_collector()
    run(b, 3)  # b's own progress must not leak into the restored run
    _feed(b, state, _meta(state))
    note, meta = b.end_restore(same_world=False, global_steps=28)
    assert (note, meta) == ("", None)
    for k, v in want.items():  # rows kept, oldest first
        np.testing.assert_array_equal(stored(b)[k], v, err_msg=k)
    assert b.replay.pos == len(want["actions"]) and b.replay.total_added == len(want["actions"])
    # envs reset with seeds seed + global_steps + i = 38, 39: kinds 0 and 1 at episode 0, t = 0
    np.testing.assert_array_equal(b.obs, [[0, 0], [100, 0]])
    assert b.rng.bit_generator.state == np.random.default_rng([10, 0, 28]).bit_generator.state
    assert b.nstep.state() == [[], []] and not b.tracker.prev_done.any()
    # and it collects from there as a fresh collector of those seeds would
    run(b, 6)
    fresh = make_collector(seed=38)
    run(fresh, 6)
    for k, v in stored(fresh).items():
        np.testing.assert_array_equal(stored(b)[k][len(want["actions"]) :], v, err_msg=k)


def test_restore_without_env_state_restarts_envs_keeps_replay_and_stats():
    a = make_collector()
    run(a, 13, epsilon=0.3)
    state = a.state()
    state.env_state = b""  # an env shard that could not be captured (an attribute with no data encoding)
    b = make_collector()
    _feed(b, state, _meta(state))
    note, meta = b.end_restore(same_world=True, global_steps=26)
    assert note.startswith("env states were not saved") and meta is not None
    assert b.replay.state() == a.replay.state()
    assert b.stats == a.stats  # the statistics resume with the run
    np.testing.assert_array_equal(b.obs, [[0, 0], [100, 0]])  # seeds 36, 37


@pytest.mark.parametrize(
    "env_id, extra",
    [("CartPole-v1", {}), ("CartPole-v1", {"prioritized": True, "buffer_size_per_rank": 1000}),
     ("CartPole-v1", {"buffer_size_per_rank": 1}),
     ("ALE/Pong-v5", {"buffer_size_per_rank": 3000, "num_envs_per_rank": 2, "n_step": 3})],
)  # fmt: skip
def test_replay_bytes_are_known_before_the_replay_is_allocated(env_id, extra):
    """The memory check before allocation uses Collector.replay_bytes: it must be what the
    constructor then allocates (PER: plus its two trees)."""
    cfg = Config(env_id=env_id, **extra)
    info = envs.inspect_env(env_id, envs.atari_options(cfg))
    col = Collector(cfg, info, rank=0)
    trees = 2 * col.replay.tree.sum.nbytes if cfg.prioritized else 0
    assert Collector.replay_bytes(cfg, info) == col.replay.nbytes + trees
    col.close()
