"""TD targets and loss against hand-computed numbers (double DQN, n-step, terminal vs truncated)."""

import pytest
import torch

from mpirl import algo


def test_linear_schedule():
    assert algo.linear_schedule(1.0, 0.1, 100, 0) == 1.0
    assert algo.linear_schedule(1.0, 0.1, 100, 50) == pytest.approx(0.55)
    assert algo.linear_schedule(1.0, 0.1, 100, 100) == pytest.approx(0.1)
    assert algo.linear_schedule(1.0, 0.1, 100, 10_000) == pytest.approx(0.1)
    assert algo.linear_schedule(1.0, 0.1, 0, 5) == 0.1


def test_td_targets_double_vs_vanilla_terminal_vs_truncated():
    g = 0.9
    rewards = torch.tensor([1.0, 1.0, 2.0])
    # sample 0: mid-episode, 1-step; sample 1: terminated; sample 2: truncated after a 2-step return
    discounts = torch.tensor([g, 0.0, g**2])
    next_q_target = torch.tensor([[1.0, 5.0], [3.0, 4.0], [10.0, 2.0]])
    next_q_online = torch.tensor([[2.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # picks a=0, a=1, a=1
    double = algo.td_targets(rewards, discounts, next_q_target, next_q_online)
    assert double.tolist() == pytest.approx([1 + g * 1.0, 1.0, 2 + g * g * 2.0])
    vanilla = algo.td_targets(rewards, discounts, next_q_target, None)
    assert vanilla.tolist() == pytest.approx([1 + g * 5.0, 1.0, 2 + g * g * 10.0])


def test_td_loss_weighted_huber():
    q = torch.tensor([[0.0, 1.0], [2.0, 0.0]], requires_grad=True)
    actions = torch.tensor([1, 0])
    targets = torch.tensor([1.5, 5.0])  # errors 0.5 (quadratic) and 3.0 (linear)
    weights = torch.tensor([1.0, 0.5])
    loss, td = algo.td_loss(q, actions, targets, weights)
    expected = (1.0 * 0.5 * 0.5**2 + 0.5 * (3.0 - 0.5)) / 2
    assert loss.item() == pytest.approx(expected)
    assert td.tolist() == pytest.approx([0.5, 3.0])
    loss.backward()
    # d/dq of weighted Huber mean: w * clip(q - target, -1, 1) / B on the taken actions
    torch.testing.assert_close(q.grad, torch.tensor([[0.0, 1.0 * -0.5 / 2], [0.5 * -1.0 / 2, 0.0]]))


def test_update_target_hard_and_soft():
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0)
        target.weight.fill_(0.0)
    algo.update_target(target, online, 0.25)
    torch.testing.assert_close(target.weight, torch.full((1, 2), 0.25))
    algo.update_target(target, online, 1.0)
    torch.testing.assert_close(target.weight, torch.ones(1, 2))
