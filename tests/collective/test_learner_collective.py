"""The learner inside the ranks: the two-phase update averages gradients across ranks (K = 1),
local SGD averages weights and Adam moments (K > 1), and a non-finite gradient on one rank is
skipped on every rank alike. Each rank samples its own rank-dependent replay, so an update that
did not average would leave the replicas apart.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from mpirl import dist
from mpirl.config import Config
from mpirl.learner import Learner
from mpirl.replay import ReplayBuffer, Transitions

OBS = (4,)


def _cfg(**kw) -> Config:
    base = dict(hidden_sizes=(16,), batch_size_per_rank=8, buffer_size_per_rank=64, learning_starts_per_rank=8,
                lr=1e-2, tau=1.0, target_update_interval=3, n_step=1, seed=5)  # fmt: skip
    return Config(**{**base, **kw}).validate()


def _replay(rank: int, reward: float = 0.0) -> ReplayBuffer:
    """32 transitions whose observations and rewards depend on the rank."""
    rng = np.random.default_rng(100 + rank)
    n = 32
    buf = ReplayBuffer(64, OBS, np.dtype(np.float32), gamma=0.9)
    buf.add(Transitions(
        obs=rng.normal(size=(n, *OBS)).astype(np.float32) + rank,
        actions=rng.integers(0, 2, size=n),
        rewards=np.full(n, reward if reward else 1.0 + rank, dtype=np.float32),
        next_obs=rng.normal(size=(n, *OBS)).astype(np.float32),
        steps=np.ones(n, dtype=np.uint8),
        terminated=rng.random(n) < 0.2,
        truncated=np.zeros(n, dtype=bool),
    ))  # fmt: skip
    return buf


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _same_on_every_rank(t: torch.Tensor, name: str) -> bool:
    root = dist.broadcast_object(t.clone(), name=name)
    return bool(torch.equal(root, t))


def test_gradient_allreduce_updates_keep_replicas_identical_and_average_the_gradient(ctx):
    cfg = _cfg()
    learner = Learner(cfg, OBS, 2, ctx)
    assert learner.allreduce_gradients and not learner.local_sgd
    assert _same_on_every_rank(_flat(learner.online), "tests.learner.init")  # rank 0's weights broadcast
    buf, rng = _replay(ctx.rank), np.random.default_rng(7 + ctx.rank)

    # The first update by hand: each rank's local gradient on its own batch (same sampling
    # draws on a copy of its RNG), averaged over the ranks by a plain allreduce of our own.
    shadow = copy.deepcopy(learner.online)
    b = buf.sample(cfg.batch_size_per_rank, np.random.default_rng(7 + ctx.rank))
    with torch.no_grad():
        next_online = shadow(torch.from_numpy(b.next_obs))
        best = next_online.argmax(1, keepdim=True)
        next_v = learner.target(torch.from_numpy(b.next_obs)).gather(1, best).squeeze(1)
        targets = torch.from_numpy(b.rewards) + torch.from_numpy(b.discounts) * next_v
    q = shadow(torch.from_numpy(b.obs)).gather(1, torch.from_numpy(b.actions).unsqueeze(1)).squeeze(1)
    torch.nn.functional.smooth_l1_loss(q, targets).backward()
    local = torch.cat([p.grad.reshape(-1) for p in shadow.parameters()]).double()
    expected = torch.from_numpy(dist.allreduce_sum(local.numpy(), name="tests.learner.grad")) / ctx.size

    seen = {}
    clip = learner._clip_gradients

    def spy() -> torch.Tensor:  # the averaged gradient, as finish() sees it before clipping
        seen["grad"] = torch.cat([p.grad.reshape(-1) for p in learner.online.parameters()]).double().clone()
        return clip()

    learner._clip_gradients = spy
    learner.start(buf, rng, beta=1.0)  # HVD: the gradient allreduce starts
    learner.finish()  # HVD: wait for the average
    torch.testing.assert_close(seen["grad"], expected, rtol=1e-5, atol=1e-7)
    for _ in range(5):
        learner.start(buf, rng, beta=1.0)
        learner.finish()
    assert learner.updates == 6
    assert _same_on_every_rank(_flat(learner.online), "tests.learner.online")
    assert _same_on_every_rank(_flat(learner.target), "tests.learner.target")
    # Hard target copies every 3 updates: after update 6 the target equals the online net.
    assert torch.equal(_flat(learner.target), _flat(learner.online))


def test_non_finite_gradient_on_one_rank_is_skipped_on_every_rank(ctx):
    learner = Learner(_cfg(), OBS, 2, ctx)
    before = _flat(learner.online).clone()
    # Rank 1's replay holds an inf reward: its loss is poisoned, the average is NaN everywhere.
    buf = _replay(ctx.rank, reward=float("inf") if ctx.rank == 1 else 0.0)
    learner.start(buf, np.random.default_rng(3), beta=1.0)
    learner.finish()
    assert (learner.updates, learner.skipped_updates) == (0, 1)
    assert torch.equal(_flat(learner.online), before)
    # Finite data again: the update applies on every rank alike.
    learner.start(_replay(ctx.rank), np.random.default_rng(4), beta=1.0)
    learner.finish()
    assert (learner.updates, learner.skipped_updates, learner.nonfinite_streak) == (1, 1, 0)
    assert _same_on_every_rank(_flat(learner.online), "tests.learner.after_skip")


def test_local_sgd_averages_weights_and_adam_moments_every_k_updates(ctx, monkeypatch):
    learner = Learner(_cfg(sync_every=2, target_update_interval=1, tau=0.5, max_grad_norm=0.0), OBS, 2, ctx)
    assert learner.local_sgd and not learner.allreduce_gradients
    buf, rng = _replay(ctx.rank), np.random.default_rng(11 + ctx.rank)
    learner.start(buf, rng, beta=1.0)
    learner.finish()  # local step only: the replicas drift apart
    assert learner.updates == 0  # counted at the averaging
    lo, hi = dist.allreduce_min_max(float(_flat(learner.online).double().sum()), name="tests.learner.drift")
    assert lo != hi
    learner.start(buf, rng, beta=1.0)
    # What the averaging must produce: the mean over ranks of each rank's weights after its own
    # second step, as they enter the averaging allreduce.
    entering = {}
    average = dist.average_tensors_

    def spy(tensors, name):
        entering["params"] = torch.cat([t.detach().reshape(-1) for t in tensors[: len(learner._params)]]).clone()
        average(tensors, name=name)

    monkeypatch.setattr(dist, "average_tensors_", spy)
    learner.finish()  # HVD: the second local step, then one allreduce of weights and Adam state
    local = entering["params"].double().numpy()
    mean = torch.from_numpy(dist.allreduce_sum(local, name="tests.learner.mean") / ctx.size).float()
    assert learner.updates == 2
    torch.testing.assert_close(_flat(learner.online), mean, rtol=1e-6, atol=1e-6)
    assert _same_on_every_rank(_flat(learner.online), "tests.learner.synced")
    states = [learner.optimizer.state[p] for p in learner.online.parameters()]
    moments = torch.cat([st[k].reshape(-1) for st in states for k in ("exp_avg", "exp_avg_sq")])
    assert _same_on_every_rank(moments, "tests.learner.moments")
    assert all(float(st["step"]) == 2.0 for st in states)
