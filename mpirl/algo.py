"""DQN maths as pure functions: schedules, (double) n-step TD targets, the weighted Huber loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """Linear from ``start`` at t=0 to ``end`` at t=duration, constant after (t in env steps)."""
    if duration <= 0:
        return end
    frac = min(max(t / duration, 0.0), 1.0)
    return start + frac * (end - start)


def crossed(step: int, step_size: int, interval: int) -> bool:
    """Did the last ``step_size`` steps up to ``step`` cross a multiple of ``interval``? (An
    interval of 0 never does.)"""
    return interval > 0 and step // interval > (step - step_size) // interval


def td_targets(
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    next_q_target: torch.Tensor,
    next_q_online: torch.Tensor | None,
) -> torch.Tensor:
    """``r + discount * Q_target(s', a*)``, with a* = argmax of the online net (double DQN)
    when ``next_q_online`` is given, else of the target net.

    ``rewards`` are n-step discounted returns, ``discounts`` gamma^k, already 0 on termination
    (a truncated episode keeps gamma^k and bootstraps from its final observation).
    """
    if next_q_online is not None:
        best = next_q_online.argmax(dim=1, keepdim=True)
        next_v = next_q_target.gather(1, best).squeeze(1)
    else:
        next_v = next_q_target.max(dim=1).values
    return rewards + discounts * next_v


def td_loss(
    q: torch.Tensor, actions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted mean Huber loss (delta 1) and the TD errors (for PER priorities)."""
    q_taken = q.gather(1, actions.unsqueeze(1)).squeeze(1)
    td = targets.detach() - q_taken
    per_sample = F.smooth_l1_loss(q_taken, targets.detach(), reduction="none")
    return (weights * per_sample).mean(), td.detach()


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target (tau = 1: hard copy). Local on each rank."""
    if tau >= 1.0:
        target.load_state_dict(online.state_dict())
        return
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, tau)
