"""mpirl.dist's collectives, inside the ranks, against expectations computed by hand.

Each rank feeds rank-dependent data, so a collective that did nothing (or summed where it
should average, or took the wrong root) gives a wrong answer on some rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpirl import dist


def _rank0s(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Rank 0's copies of ``tensors``, on every rank (to compare bitwise)."""
    return dist.broadcast_object({k: v.detach().clone() for k, v in tensors.items()}, name=name)


def test_context(ctx):
    assert ctx.size >= 2
    assert 0 <= ctx.rank < ctx.size
    assert 0 <= ctx.local_rank < ctx.local_size <= ctx.size
    assert ctx.device == torch.device("cpu")
    ranks = dist.gather_to_root(ctx.rank)
    if ctx.rank == 0:
        assert ranks == list(range(ctx.size))


def test_broadcast_object_delivers_rank_0s_value_under_each_name(ctx):
    first = dist.broadcast_object({"from": ctx.rank, "items": [ctx.rank] * 3}, name="tests.bcast.first")
    second = dist.broadcast_object(("second", ctx.rank * 10, np.full(4, ctx.rank)), name="tests.bcast.second")
    assert first == {"from": 0, "items": [0, 0, 0]}
    assert second[:2] == ("second", 0)
    np.testing.assert_array_equal(second[2], np.zeros(4))


class _Refused(ValueError):
    pass


def test_rank0_decides_gives_rank_0s_value_or_its_error_on_every_rank(ctx):
    calls = []

    def decide() -> tuple[str, int]:
        calls.append(ctx.rank)
        return ("decided", ctx.rank)

    assert dist.rank0_decides(decide, name="tests.decide.ok", errors=_Refused) == ("decided", 0)
    assert calls == ([0] if ctx.rank == 0 else [])  # only rank 0 runs it

    def refuse() -> None:
        raise _Refused(f"no, says rank {ctx.rank}")

    with pytest.raises(_Refused, match="^no, says rank 0$"):  # every rank raises rank 0's error
        dist.rank0_decides(refuse, name="tests.decide.refused", errors=_Refused)


def test_allreduce_sum_is_exact(ctx):
    n = ctx.size
    got = dist.allreduce_sum(np.array([ctx.rank + 1, 10 * (ctx.rank + 1), 0.25, -ctx.rank]), name="tests.sum")
    # sum over r of (r + 1) = n (n + 1) / 2; of r = n (n - 1) / 2
    expected = np.array([n * (n + 1) / 2, 10 * n * (n + 1) / 2, 0.25 * n, -n * (n - 1) / 2])
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, expected)


def test_allreduce_min_max(ctx):
    lo, hi = dist.allreduce_min_max(ctx.rank - 0.5, name="tests.minmax")
    assert (lo, hi) == (-0.5, ctx.size - 1.5)
    lo, hi = dist.allreduce_min_max(3.0, name="tests.minmax.same")  # identical replicas: min == max
    assert lo == hi == 3.0


def test_average_tensors_in_place(ctx):
    n, r = ctx.size, ctx.rank
    a = torch.full((2, 3), float(r))
    b = torch.arange(4, dtype=torch.float32) * (r + 1)
    c = torch.tensor([[float(r * r)]])
    ptrs = [t.data_ptr() for t in (a, b, c)]
    dist.average_tensors_([a, b, c], name="tests.average")
    assert [t.data_ptr() for t in (a, b, c)] == ptrs  # in place
    assert (a.shape, b.shape, c.shape) == ((2, 3), (4,), (1, 1))
    # mean over r of r = (n - 1) / 2; of (r + 1) = (n + 1) / 2; of r^2 = (n - 1)(2n - 1) / 6
    torch.testing.assert_close(a, torch.full((2, 3), (n - 1) / 2), rtol=0, atol=0)
    torch.testing.assert_close(b, torch.arange(4, dtype=torch.float32) * (n + 1) / 2, rtol=0, atol=0)
    torch.testing.assert_close(c, torch.tensor([[(n - 1) * (2 * n - 1) / 6]]), rtol=0, atol=0)


def test_broadcast_model_makes_every_rank_rank_0s_model_bitwise(ctx):
    torch.manual_seed(100 + ctx.rank)  # a different init on every rank
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[1].running_mean.fill_(float(ctx.rank + 1))  # buffers travel too
    before = _rank0s(model.state_dict(), name="tests.bmodel.before")
    if ctx.rank != 0:
        assert not torch.equal(model[0].weight, before["0.weight"])  # the test means something
    dist.broadcast_model(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert torch.equal(value, before[key]), key


def test_gradient_sync_averages_gradients_and_steps_alike(ctx):
    n, r, lr = ctx.size, ctx.rank, 0.5
    torch.manual_seed(7 + r)
    model = torch.nn.Linear(3, 2)
    dist.broadcast_model(model)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()

    def data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]]) * (rank + 1)
        t = torch.tensor([[1.0, 0.0], [-1.0, 2.0]]) + rank
        return x, t

    # By hand: L = 0.5 * sum((x W^T + b - t)^2)  ->  dL/dW = e^T x, dL/db = sum of e over rows (e = residual)
    grads_w, grads_b = [], []
    for k in range(n):
        x, t = data(k)
        e = x @ w0.T + b0 - t
        grads_w.append(e.T @ x)
        grads_b.append(e.sum(0))
    mean_w, mean_b = sum(grads_w) / n, sum(grads_b) / n
    assert not torch.allclose(grads_w[0], grads_w[1])  # local gradients differ between ranks

    sync = dist.gradient_sync(torch.optim.SGD(model.parameters(), lr=lr), model, fp16=False, backward_passes_per_step=1)
    sync.optimizer.zero_grad()
    x, t = data(r)
    (0.5 * ((model(x) - t) ** 2).sum()).backward()  # HVD (Horovod): allreduce starts in the backward hooks
    sync.start()  # HVD (torch): the allreduce starts
    sync.wait()  # HVD: wait for the averaged gradients
    torch.testing.assert_close(model.weight.grad, mean_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.bias.grad, mean_b, rtol=1e-6, atol=1e-6)
    sync.step()
    torch.testing.assert_close(model.weight.detach(), w0 - lr * mean_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b0 - lr * mean_b, rtol=1e-6, atol=1e-6)
    rank0 = _rank0s(dict(model.named_parameters()), name="tests.wrapopt.after")
    for key, value in model.named_parameters():
        assert torch.equal(value.detach(), rank0[key]), key  # bitwise identical replicas


def test_gather_to_root_in_rank_order(ctx):
    got = dist.gather_to_root({"rank": ctx.rank, "rows": list(range(ctx.rank + 1))})
    if ctx.rank == 0:
        assert got == [{"rank": k, "rows": list(range(k + 1))} for k in range(ctx.size)]
    else:
        assert got == []


def test_send_and_recv_object_keep_order_both_ways(ctx):
    if ctx.rank == 0:
        for source in range(1, ctx.size):
            got = [dist.recv_object(source) for _ in range(3)]
            assert [m[0] for m in got] == [(source, i) for i in range(3)]
            for i, (_, array) in enumerate(got):
                np.testing.assert_array_equal(array, np.arange(5) * source + i)
        for dest in range(1, ctx.size):
            dist.send_object(dest, ("reply", dest))
            dist.send_object(dest, None)
    else:
        for i in range(3):
            dist.send_object(0, ((ctx.rank, i), np.arange(5) * ctx.rank + i))
        assert dist.recv_object(0) == ("reply", ctx.rank)
        assert dist.recv_object(0) is None


@pytest.mark.parametrize("fp16", [False, True])
def test_gradient_sync_replicas_stay_identical_over_steps(ctx, fp16):
    """A few Adam steps on rank-dependent data: identical replicas after each (as the trainer needs)."""
    torch.manual_seed(ctx.rank)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    dist.broadcast_model(model)
    sync = dist.gradient_sync(torch.optim.Adam(model.parameters(), lr=1e-2), model, fp16=fp16,
                              backward_passes_per_step=1)  # fmt: skip
    gen = torch.Generator().manual_seed(1000 + ctx.rank)
    for step in range(3):
        sync.optimizer.zero_grad()
        model(torch.randn(16, 4, generator=gen)).pow(2).mean().backward()
        sync.start()
        sync.wait()
        sync.step()
        lo, hi = dist.allreduce_min_max(float(sum(p.detach().double().sum() for p in model.parameters())),
                                        name=f"tests.wrapopt.steps.{fp16}")  # fmt: skip
        assert lo == hi, f"step {step}: replicas differ ({lo} vs {hi})"
