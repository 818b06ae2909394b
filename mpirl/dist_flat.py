"""Gradient averaging in one flat buffer, for the backends that have no DistributedOptimizer of
their own (torch.distributed and plain MPI). Only mpirl's backend modules import this module.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

# Starts an in-place SUM allreduce of a flat tensor over all ranks and returns what waits for it.
StartAllreduce = Callable[[torch.Tensor], Callable[[], Any]]


class FlatGradientSync:
    """Gradient averaging in one flat buffer, as Horovod's grouped allreduce does: ``start``
    (after the update's last backward pass) packs every gradient, pre-divided by the world size
    (and cast to fp16 with ``fp16``: half the bytes), and starts one allreduce through
    ``start_allreduce``; ``wait`` completes it and writes the averages back into ``.grad``.
    Several backward passes accumulate locally in ``.grad`` first, so the average is of their
    sum (the learner scales each pass by 1/passes).

    Dividing before the sum keeps the result bitwise equal to Horovod's sum-then-divide at two
    ranks (halving is exact) and keeps fp16 sums in range."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        fp16: bool,
        size: int,
        start_allreduce: StartAllreduce,
    ) -> None:
        self.optimizer = optimizer
        self.params = params
        self.fp16 = fp16
        self.size = size
        self._start_allreduce = start_allreduce
        self._wait: Optional[Callable[[], Any]] = None
        self._flat: Optional[torch.Tensor] = None  # kept alive while the allreduce runs

    def start(self) -> None:
        assert self._wait is None, "gradient allreduce started twice"
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.size)
        if self.fp16:
            flat = flat.half()
        self._flat = flat
        self._wait = self._start_allreduce(flat)  # the backend's allreduce starts

    def wait(self) -> None:
        assert self._wait is not None and self._flat is not None, "wait() without start()"
        self._wait()  # the averaged gradients
        flat = self._flat.float() if self.fp16 else self._flat
        self._wait = self._flat = None
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n

    def step(self) -> None:
        self.optimizer.step()
