"""Frame-stack replay: every frame stored once, yet transitions identical to the naive layout."""

import numpy as np
import pytest

from mpirl.frame_replay import FrameStackReplay
from mpirl.replay import NStepAccumulator, PrioritizedReplayBuffer, ReplayBuffer

K, H, W = 4, 6, 5


class FakeStackedEnvs:
    """E envs with gymnasium 1.x next-step autoreset and FrameStackObservation semantics:
    a reset observation repeats its first frame K times; each step shifts in one new frame."""

    def __init__(self, num_envs: int, rng: np.random.Generator, mean_len: int) -> None:
        self.rng, self.mean_len, self.E = rng, mean_len, num_envs
        self.stacks = np.stack([self._reset_stack() for _ in range(num_envs)])
        self.left = self.rng.integers(1, 2 * mean_len, size=num_envs)
        self.autoreset = np.zeros(num_envs, dtype=bool)

    def _frame(self) -> np.ndarray:
        return self.rng.integers(0, 256, size=(H, W), dtype=np.uint8)

    def _reset_stack(self) -> np.ndarray:
        return np.repeat(self._frame()[None], K, axis=0)

    def step(self):
        rew = self.rng.normal(size=self.E)
        term = np.zeros(self.E, dtype=bool)
        trunc = np.zeros(self.E, dtype=bool)
        for e in range(self.E):
            if self.autoreset[e]:
                self.stacks[e] = self._reset_stack()
                self.left[e] = self.rng.integers(1, 2 * self.mean_len)
                rew[e] = 0.0
                self.autoreset[e] = False
                continue
            self.stacks[e] = np.concatenate([self.stacks[e][1:], self._frame()[None]])
            self.left[e] -= 1
            if self.left[e] == 0:
                term[e] = self.rng.random() < 0.5
                trunc[e] = not term[e]
                self.autoreset[e] = True
        return self.stacks.copy(), rew, term, trunc


def _fill(steps, capacity, E=3, n=3, mean_len=20, prioritized=False, seed=0):
    """Feed one stream to a naive buffer (full stacks) and a frame-stack one (references)."""
    rng = np.random.default_rng(seed)
    envs = FakeStackedEnvs(E, rng, mean_len)
    make = (
        (lambda shape, dt: PrioritizedReplayBuffer(capacity, shape, dt, 0.9))
        if prioritized
        else (lambda shape, dt: ReplayBuffer(capacity, shape, dt, 0.9))
    )
    naive = make((K, H, W), np.dtype(np.uint8))
    fs = FrameStackReplay(make((K,), np.dtype(np.int64)), (H, W), E, n)
    acc_naive, acc_fs = NStepAccumulator(E, n, 0.9), NStepAccumulator(E, n, 0.9)
    obs = envs.stacks.copy()
    keys = fs.encode_obs(obs)
    prev_done = np.zeros(E, dtype=bool)
    for _ in range(steps):
        actions = rng.integers(0, 4, size=E)
        nxt, rew, term, trunc = envs.step()
        valid = ~prev_done
        nkeys = fs.encode_obs(nxt)
        for acc, buf, o, no in ((acc_naive, naive, obs, nxt), (acc_fs, fs, keys, nkeys)):
            ready = acc.push(o, actions, rew, no, term, trunc, valid)
            if ready is not None:
                buf.add(ready)
        prev_done = (term | trunc) & valid
        obs, keys = nxt, nkeys
    return naive, fs


def _materialize(fs: FrameStackReplay, refs: np.ndarray) -> np.ndarray:
    return fs.frames[refs % fs.frame_capacity]


@pytest.mark.parametrize("steps,capacity", [(50, 1000), (2000, 300)])
def test_every_stored_transition_matches_the_naive_layout(steps, capacity):
    naive, fs = _fill(steps, capacity)
    assert len(naive) == len(fs) > 0
    live = np.minimum(fs.inner.obs.min(1), fs.inner.next_obs.min(1))[: len(fs)] >= fs._oldest_live()
    assert live.all()  # episodes of ~20 steps: nothing lost at this ring size
    np.testing.assert_array_equal(_materialize(fs, fs.inner.obs[: len(fs)]), naive.obs[: len(naive)])
    np.testing.assert_array_equal(_materialize(fs, fs.inner.next_obs[: len(fs)]), naive.next_obs[: len(naive)])
    for f in ("actions", "rewards", "steps", "terminated", "truncated"):
        np.testing.assert_array_equal(getattr(fs.inner, f), getattr(naive, f))


def test_samples_equal_the_naive_buffer_with_the_same_rng():
    naive, fs = _fill(1500, 400)
    a, b = naive.sample(64, np.random.default_rng(5)), fs.sample(64, np.random.default_rng(5))
    for f in a._fields:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert b.obs.dtype == np.uint8 and b.obs.shape == (64, K, H, W)


def test_stores_each_frame_about_once():
    naive, fs = _fill(3000, 8000, E=2, mean_len=200)  # 6,000 transitions, not yet wrapped
    frames_per_transition = fs.frames_total / len(fs)
    assert frames_per_transition < 1.05  # naive: 2K = 8 frames per transition
    # Allocated: the ring has 1/8 slack over the capacity, against 2K frames per slot.
    assert fs.frames.nbytes < 0.15 * (naive.obs.nbytes + naive.next_obs.nbytes)


@pytest.mark.parametrize("prioritized", [False, True])
def test_short_episodes_never_yield_overwritten_frames(prioritized):
    # Episodes of ~2 steps: about one reset frame per transition overflows the frame ring, so
    # some old transitions lose frames; they must never be sampled.
    naive, fs = _fill(3000, 200, E=2, mean_len=2, prioritized=prioritized)
    lost = np.minimum(fs.inner.obs.min(1), fs.inner.next_obs.min(1)) < fs._oldest_live()
    assert lost.any()
    rng = np.random.default_rng(1)
    for _ in range(20):
        b = fs.sample(32, rng, 0.4)
        assert not lost[b.indices].any()
        np.testing.assert_array_equal(b.obs, naive.obs[b.indices])
        np.testing.assert_array_equal(b.next_obs, naive.next_obs[b.indices])
        assert np.isfinite(b.weights).all()


@pytest.mark.parametrize("prioritized", [False, True])
def test_export_import_restores_exactly(prioritized):
    _, fs = _fill(1200, 300, prioritized=prioritized)
    _, other = _fill(10, 300, prioritized=prioritized, seed=9)
    arrays, state = fs.export_arrays(), fs.state()
    assert arrays["frames"].dtype == np.uint8 and len(arrays["frames"]) == min(fs.frames_total, fs.frame_capacity)
    other.begin_import(len(arrays["actions"]))
    for name, a in arrays.items():  # in two chunks per field, as a checkpoint streams them
        half = len(a) // 2
        other.import_rows(name, 0, a[:half])
        other.import_rows(name, half, a[half:])
    other.end_import(len(arrays["actions"]), state)
    assert other.state() == state
    a, b = fs.sample(32, np.random.default_rng(2), 0.5), other.sample(32, np.random.default_rng(2), 0.5)
    for f in a._fields:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    new = np.random.default_rng(4).integers(0, 256, size=(3, K, H, W), dtype=np.uint8)
    np.testing.assert_array_equal(fs.encode_obs(new), other.encode_obs(new))


def test_import_of_another_shape_starts_empty():
    _, fs = _fill(500, 300)
    _, other = _fill(10, 300, E=2, seed=3)  # another env count: references cannot be kept
    arrays = fs.export_arrays()
    other.begin_import(len(arrays["actions"]))
    for name, a in arrays.items():
        other.import_rows(name, 0, a)
    other.end_import(len(arrays["actions"]), fs.state())
    assert len(other) == 0 and other.frames_total == 0
