"""EnvPool env shards (mpirl.envpool_shard) against the gymnasium path: the same transition
stream semantics (next-step autoreset, termination vs truncation, game-score returns), the
same Atari frames where the emulator allows, the frame-stack replay's one frame per step, and
what a checkpoint holds."""

from __future__ import annotations

import numpy as np
import pytest

from mpirl import envpool_shard, envs
from mpirl.collector import Collector
from mpirl.config import Config

pytest.importorskip("envpool", reason="EnvPool is not installed (the test extra installs it on Python >= 3.11)")


def _vector(backend: str, env_id: str, n: int, atari: envs.AtariOptions = envs.AtariOptions()):
    return envs.make_vector(env_id, n, atari, backend=backend, threads=1)


def _episodes(vec, n: int, steps: int, seed: int = 7):
    """Random play through ``envs.EpisodeTracker`` as the collector does; every env step as
    (valid, obs, reward, next_obs, terminated, truncated), and the finished (return, length)s."""
    rng = np.random.default_rng(seed)
    obs, _ = vec.reset(seed=list(range(seed, seed + n)))
    tracker, rows, finished = envs.EpisodeTracker(n), [], []
    for _ in range(steps):
        nxt, rew, term, trunc, _ = vec.step(rng.integers(0, 2, n))
        valid, fin_r, fin_l = tracker.step(rew, term, trunc)
        rows.append((valid, obs, rew, nxt, term, trunc))
        finished += list(zip(fin_r, fin_l))
        obs = nxt
    vec.close()
    return rows, finished


def _fallen(state: np.ndarray) -> np.ndarray:
    """CartPole's termination condition (|x| > 2.4 or |theta| > 12 degrees)."""
    return (np.abs(state[..., 0]) > 2.4) | (np.abs(state[..., 2]) > 12 * 2 * np.pi / 360)


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_cartpole_stream_never_crosses_an_episode_boundary(backend):
    rows, finished = _episodes(_vector(backend, "CartPole-v1", 4), 4, 600)
    for t, (valid, obs, rew, nxt, term, trunc) in enumerate(rows):
        assert not _fallen(obs[valid]).any(), "a transition starts from a terminal state"
        assert (_fallen(nxt[valid & term])).all(), "a termination without the terminal condition"
        assert (rew[valid] == 1.0).all() and (rew[~valid] == 0.0).all()
        if t + 1 < len(rows):
            done = valid & (term | trunc)
            nvalid, nobs = rows[t + 1][0], rows[t + 1][1]
            assert not nvalid[done].any(), "the step after an episode's end must be its reset"
            cont = valid & ~term & ~trunc
            assert np.array_equal(nobs[cont], nxt[cont]), "an episode's next observation is the next step's"
            assert (np.abs(rows[t + 1][3][done]) < 0.05).all(), "a reset state starts near the origin"
    assert len(finished) > 50 and all(ret == length for ret, length in finished)  # returns are game scores


def test_envpool_time_limit_truncates_and_bootstraps(monkeypatch):
    """A time limit is truncated=True, terminated=False (the TD target bootstraps), and the
    step after it is a reset; EnvPool's CartPole with a 20-step limit shows it every episode."""
    original = envpool_shard.EnvPoolVector._options
    limited = lambda self: {**original(self), "max_episode_steps": 20}  # noqa: E731
    monkeypatch.setattr(envpool_shard.EnvPoolVector, "_options", limited)
    vec = envpool_shard.EnvPoolVector("CartPole-v1", 2, None, 1)
    obs, _ = vec.reset(seed=[1, 2])
    lengths, truncations = np.zeros(2, int), 0
    for t in range(200):
        obs, rew, term, trunc, _ = vec.step(np.array([0, 1]) if t % 2 else np.array([1, 0]))  # wiggle: stays up
        lengths += 1
        for i in np.flatnonzero(trunc):
            assert not term[i] and lengths[i] == 20
            truncations += 1
        lengths[term | trunc] = -1  # the next step is the reset, not a transition
    vec.close()
    assert truncations >= 10


def test_envpool_pong_frames_equal_gymnasiums():
    """With no random no-ops and no sticky actions both backends run the same ALE game: the
    same (4, 84, 84) frames, rewards and terminals, bitwise, for 300 steps."""
    atari = envs.AtariOptions(noop_max=1, sticky_actions=0.0)
    ep, gym_vec = _vector("envpool", "ALE/Pong-v5", 2, atari), _vector("gymnasium", "ALE/Pong-v5", 2, atari)
    a, b = ep.reset(seed=[3, 4])[0], gym_vec.reset(seed=[3, 4])[0]
    assert a.shape == (2, 4, 84, 84) and a.dtype == np.uint8 and np.array_equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(300):
        act = rng.integers(0, 6, 2)
        for x, y in zip(ep.step(act)[:4], gym_vec.step(act)[:4]):
            assert np.array_equal(x, y)
    ep.close()
    gym_vec.close()


def test_frame_stack_replay_stores_one_frame_per_envpool_step():
    cfg = Config(env_id="ALE/Pong-v5", num_envs_per_rank=2, buffer_size_per_rank=2000, env_backend="envpool")
    info = envs.inspect_env(cfg.env_id, envs.atari_options(cfg))
    col = Collector(cfg, info, rank=0, env_backend="envpool")
    assert col.frames is not None
    start = col.frames.frames_total  # the reset stacks: one frame each (padded with itself)
    for _ in range(150):
        col.step(lambda o: np.zeros(len(o), dtype=np.int64), epsilon=1.0)
    assert col.frames.frames_total - start == 150 * 2  # no episode ended in 150 steps of Pong
    state = col.state()
    assert state.env_state == b""  # EnvPool's envs cannot be snapshotted
    col.close()


def test_resume_with_envpool_restarts_the_episodes_and_says_so():
    cfg = Config(env_id="CartPole-v1", num_envs_per_rank=2, buffer_size_per_rank=500, env_backend="envpool")
    info = envs.inspect_env(cfg.env_id)
    col = Collector(cfg, info, rank=0, env_backend="envpool")
    for _ in range(100):
        col.step(lambda o: np.zeros(len(o), dtype=np.int64), epsilon=1.0)
    s = col.state()
    fresh = Collector(cfg, info, rank=0, env_backend="envpool")
    meta = {"replay": s.replay_state, "numpy_rng": s.numpy_rng, "episodes": s.stats.episodes, "win": s.stats.to_meta()}
    fresh.begin_restore(len(col.replay), [meta])
    for name, rows in s.replay_arrays.items():
        fresh.restore_rows(name, 0, rows)
    note, _ = fresh.end_restore(True, 200)
    assert "EnvPool envs cannot be snapshotted: env shards restart" in note
    assert len(fresh.replay) == len(col.replay) and fresh.stats.episodes == col.stats.episodes
    for name, rows in fresh.replay.export_arrays().items():
        assert np.array_equal(rows, s.replay_arrays[name]), name
    fresh.step(lambda o: np.zeros(len(o), dtype=np.int64), epsilon=1.0)  # the restarted envs step
    col.close()
    fresh.close()


def test_choose_backend():
    cart, pong = envs.inspect_env("CartPole-v1"), envs.inspect_env("ALE/Pong-v5")
    atari = envs.AtariOptions()
    assert envs.choose_backend("auto", "CartPole-v1", cart) == "gymnasium"  # exact resume, steps are cheap
    assert envs.choose_backend("envpool", "CartPole-v1", cart) == "envpool"
    assert envs.choose_backend("auto", "ALE/Pong-v5", pong, atari) == "envpool"
    assert envs.choose_backend("gymnasium", "ALE/Pong-v5", pong, atari) == "gymnasium"
    no_noops = envs.AtariOptions(noop_max=0)
    assert envs.choose_backend("auto", "ALE/Pong-v5", pong, no_noops) == "gymnasium"
    with pytest.raises(envs.EnvError, match="--env-backend envpool: EnvPool needs --noop-max >= 1"):
        envs.choose_backend("envpool", "ALE/Pong-v5", pong, no_noops)
    with pytest.raises(envs.EnvError, match="--env-backend envpool: EnvPool has no env 'MountainCarContinuous"):
        envs.choose_backend("envpool", "MountainCarContinuous-v9", cart)
