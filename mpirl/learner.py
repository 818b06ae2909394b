"""The learner of one rank: online and target Q-networks, the optimizer, and the global
update in two explicit phases, so the caller can step the envs while gradients travel.

    learner.start(replay, rng, beta)   # sample, loss, backward: the gradient allreduce starts
    collector.step(learner.greedy, eps)  # (the caller's work while the allreduce runs)
    loss = learner.finish()            # wait, clip, skip if non-finite, step, target update

Three optimizer modes, chosen from the config and the world size:

- gradient allreduce (``sync_every`` 1, several ranks): Horovod's DistributedOptimizer
  averages the gradients in one grouped allreduce; every rank applies the same averaged
  gradient, so replicas stay bitwise identical after every update;
- local SGD (``sync_every`` K > 1, several ranks): each rank applies its own gradient and
  every K-th update ``sync_replicas`` averages the weights and Adam's moments;
- one rank: a plain Adam, no collective at all (the same results as ``sync_every`` 1).

Collectives are tagged ``# HVD:`` at their call sites (see mpirl.dist).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Optional

import numpy as np
import torch

from mpirl import algo, dist, model, replay, watchdog
from mpirl.config import Config


def _finite_batch(b: replay.Batch) -> bool:
    """Are the sampled rewards and (float) observations finite? (Integer frames always are.)"""
    if not np.isfinite(b.rewards).all():
        return False
    return b.obs.dtype.kind != "f" or bool(np.isfinite(b.obs).all() and np.isfinite(b.next_obs).all())


class NonFiniteError(dist.AgreedError):
    """Too many consecutive non-finite gradients; raised on every rank at the same update."""


class Learner:
    """Online and target networks, the (wrapped) optimizer and the update rule of one rank.

    ``updates`` counts applied global updates; it is identical on every rank (with local SGD
    it lags by less than ``sync_every`` between averagings).
    """

    def __init__(self, cfg: Config, obs_shape: tuple[int, ...], n_actions: int, ctx: dist.DistContext) -> None:
        self.cfg = cfg
        self.device = ctx.device
        self.n_actions = n_actions
        # Initial weights: rank 0's, broadcast; the seed only makes rank 0's reproducible.
        torch.manual_seed(cfg.seed)
        self.online = model.build(obs_shape, n_actions, cfg.hidden_sizes, cfg.dueling).to(self.device)
        dist.broadcast_model(self.online)  # HVD: rank 0's initial weights to all
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)
        # fused: one kernel for all parameters; per-tensor Adam was the largest cost of an update.
        base = torch.optim.Adam(self.online.parameters(), lr=cfg.lr_for(ctx.size), eps=cfg.adam_eps, fused=True)
        self._params = list(self.online.parameters())
        # fp32: no context; bf16: autocast around every forward pass (the Q-values come out float32)
        self._precision = functools.partial(model.autocast, self.device, cfg.precision)
        # One rank has nobody to average with: it takes the K = 1 path without Horovod's
        # optimizer, whose background cycle would only add latency (benchmarks/throughput.py).
        self.local_sgd = cfg.sync_every > 1 and ctx.size > 1
        self.allreduce_gradients = ctx.size > 1 and not self.local_sgd
        # Gradient averaging (Horovod's DistributedOptimizer or one flat torch.distributed
        # allreduce); `optimizer` is what steps and what checkpoints save. A fresh Adam is
        # identical on every rank already; see dist.broadcast_optimizer.
        self.grad_sync: Optional[dist.GradientSync] = (
            dist.gradient_sync(base, self.online, cfg.fp16_allreduce, cfg.backward_passes_per_step)
            if self.allreduce_gradients
            else None
        )
        self.optimizer: Any = self.grad_sync.optimizer if self.grad_sync is not None else base
        if self.local_sgd:
            # Create Adam's state (zero moments, step 0) now instead of at the first step(): a rank
            # whose first gradients were all non-finite would otherwise have no state to average and
            # pack a shorter buffer than its peers. load_state_dict puts `step` where fused Adam wants it.
            zero = {i: {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                    for i, p in enumerate(self._params)}  # fmt: skip
            base.load_state_dict({"state": zero, "param_groups": base.state_dict()["param_groups"]})
        self.updates = 0  # applied updates (agreed: identical on every rank)
        self.skipped_updates = 0  # updates skipped for a non-finite averaged gradient (K > 1: on some rank)
        self.nonfinite_streak = 0
        # Local SGD only: finish() calls since the last averaging (identical on every rank, since
        # every rank calls it alike), and this rank's non-finite flag for each of them.
        self._since_sync = 0
        self._window_nonfinite = torch.zeros(cfg.sync_every, device=self.device)
        self._pending: Optional[torch.Tensor] = None  # the started update's mean loss

    # --- acting ---------------------------------------------------------------------------
    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.type == "cuda":
            # Page-locked staging (torch's caching host allocator reuses it) lets the copy run
            # asynchronously (DMA) while the host goes on queueing kernels.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @torch.no_grad()
    def greedy(self, obs: np.ndarray) -> np.ndarray:
        """Greedy actions (int64, per env) of the online network for a batch of observations."""
        with self._precision():
            return self.online(self._tensor(obs)).argmax(dim=1).cpu().numpy()

    # --- the update, in two phases ----------------------------------------------------------
    def start(self, buffer: replay.Replay, rng: np.random.Generator, beta: float) -> None:
        """Phase 1 of a global update: sample ``backward_passes_per_step`` local batches, compute
        the TD loss and its gradients. With gradient allreduce, Horovod's hooks start averaging
        the gradients on the last backward pass; call ``finish`` to complete the update.

        Anything the caller does between ``start`` and ``finish`` must not touch the online
        network's gradients or weights (acting with it is fine)."""
        assert self._pending is None, "start() called twice without finish()"
        watchdog.beat("replay sample/update")
        cfg = self.cfg
        passes = cfg.backward_passes_per_step
        total_loss = torch.zeros((), device=self.device)
        for _ in range(passes):
            b = buffer.sample(cfg.batch_size_per_rank, rng, beta)
            obs, next_obs = self._tensor(b.obs), self._tensor(b.next_obs)
            with torch.no_grad():
                with self._precision():
                    next_q_target = self.target(next_obs)
                    next_q_online = self.online(next_obs) if cfg.double_dqn else None
                targets = algo.td_targets(
                    self._tensor(b.rewards), self._tensor(b.discounts), next_q_target, next_q_online
                )
            with self._precision():
                q = self.online(obs)
            loss, td = algo.td_loss(q, self._tensor(b.actions), targets, self._tensor(b.weights))
            if not _finite_batch(b):
                # A non-finite TD target (an inf reward, say) leaves the Huber gradient finite (it
                # saturates at +-1), so it would be trained on silently. Poison the loss instead:
                # the gradient turns NaN here, the average turns NaN on every rank, and every rank
                # skips the update alike (no extra collective). Checked on the host batch: a few
                # microseconds, where device-side checks cost a few ops per update.
                loss = loss * float("nan")
            # Horovod sums nothing across passes itself; average them so the step size does not
            # depend on backward_passes_per_step.
            (loss / passes).backward()  # HVD (Horovod, K = 1): hooks start the allreduce after the last pass
            if cfg.prioritized:  # a device->host copy per update only where priorities exist
                buffer.update_priorities(b.indices, td.cpu().numpy())
            total_loss += loss.detach()
        if self.grad_sync is not None:
            # Marked as waiting: the MPI backend's allreduce runs here, blocking, and a rank held
            # up by a stalled peer must not name itself (torch only starts it; Horovod's hooks did).
            with watchdog.waiting("gradient allreduce"):
                self.grad_sync.start()  # HVD (K = 1): the gradient allreduce (starts)
        self._pending = total_loss / passes

    def finish(self) -> torch.Tensor:
        """Phase 2: wait for the averaged gradient, clip it, skip the update if it is not
        finite (alike on every rank), else step the optimizer and update the target network.
        With local SGD: apply this rank's own gradient; every ``sync_every``-th call averages
        the replicas. Returns the mean local loss of the update (a detached scalar tensor, not
        synchronised)."""
        loss, self._pending = self._pending, None
        assert loss is not None, "finish() called without start()"
        if self.local_sgd:
            self._local_step()
            return loss
        if self.grad_sync is not None:
            with watchdog.waiting("gradient allreduce"):
                self.grad_sync.wait()  # HVD: wait for the averaged gradients
        # Same averaged gradient on every rank -> same norm, same clip, same finite check, so
        # every rank skips (or applies) an update alike without another collective.
        if not bool(torch.isfinite(self._clip_gradients())):
            self.optimizer.zero_grad()
            self._count_skip("a non-finite averaged gradient", "weights unchanged since the last finite update")
            return loss
        self.nonfinite_streak = 0
        if self.grad_sync is not None:
            self.grad_sync.step()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()  # torch >= 2 sets grads to None
        self.updates += 1
        if self.updates % self.cfg.target_update_interval == 0:
            algo.update_target(self.target, self.online, self.cfg.tau)  # local, identical on all ranks
        return loss

    def _count_skip(self, what: str, where: str) -> None:
        """Count one update skipped on every rank alike; raise NonFiniteError (on every rank) once
        ``max_nonfinite_updates`` were skipped in a row."""
        self.skipped_updates += 1
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= self.cfg.max_nonfinite_updates:
            raise NonFiniteError(
                f"{self.nonfinite_streak} updates in a row had {what} (NaN/inf in rewards, observations or the "
                f"loss?); stopped after {self.updates:,} updates, {where}; the latest checkpoint in the run "
                "directory is intact"
            )

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the gradients in place to ``max_grad_norm`` (0: no clip); return their L2 norm
        before clipping (non-finite when any gradient entry is NaN/inf)."""
        params = self._params
        if self.cfg.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)

    # --- local SGD --------------------------------------------------------------------------
    def _local_step(self) -> None:
        """Local SGD: apply this rank's own (clipped) gradient unless it is non-finite; average
        the replicas every ``sync_every``-th call.

        The skip must be agreed, yet the gradient is local. Agreeing at every update would take
        an allreduce per update, which costs about what the gradient allreduce that local SGD
        saves does (~0.25 ms for 1 KiB or 256 KiB at 2 ranks: latency-bound; see
        benchmarks/results/allreduce_cycle005.json). So a rank only withholds its own
        non-finite gradient (its weights stay finite) and flags the update; the flags ride in
        the averaging allreduce, where sync_replicas() counts an update as skipped on every rank
        when any rank flagged it, as K = 1 skips when the averaged gradient is non-finite.
        """
        if bool(torch.isfinite(self._clip_gradients())):
            self.optimizer.step()
        else:
            self._window_nonfinite[self._since_sync] = 1.0
        self.optimizer.zero_grad()
        self._since_sync += 1
        if self._since_sync == self.cfg.sync_every:
            self.sync_replicas()

    def sync_replicas(self) -> None:
        """Collective under local SGD (``--sync-every K > 1`` on several ranks): average the
        replicas, agree on the window's skipped updates, then update the target network.

        Afterwards every rank holds identical online weights and Adam state: the mean over
        ranks of the weights, of ``exp_avg`` and ``exp_avg_sq``, and of the step count. The
        moments are averaged too, not only the weights: otherwise each rank's Adam would keep
        its own history, a checkpoint (rank 0's optimizer) could not resume the run exactly,
        and the mean moments estimate the gradient statistics from N times the samples. The
        cost is 3x the bytes of the weights, once per K updates, in the same single allreduce.

        The window's updates are counted here (an update is skipped when some rank's local
        gradient was non-finite), so ``updates`` and the skip counters agree on every rank and
        lag by at most K - 1 in between; too long a non-finite streak raises NonFiniteError on
        every rank alike. The target network changes only here, from the averaged (identical)
        online weights: once if the window crossed a multiple of ``target_update_interval``,
        soft updates compounded over the crossings (tau' = 1 - (1 - tau)^crossings).

        A no-op (no collective) with K = 1, on one rank, or when no update happened since the
        last averaging: the window's length is the same on every rank, so all skip alike. The
        trainer calls it before every evaluation and checkpoint and at the end, so evaluated,
        saved and final weights are the consensus model and a resumed run continues exactly.
        """
        n = self._since_sync
        if not self.local_sgd or n == 0:
            return
        cfg = self.cfg
        states = [self.optimizer.state[p] for p in self._params]  # created in __init__, so never empty
        tensors = [*self._params, *(st[k] for st in states for k in ("exp_avg", "exp_avg_sq", "step"))]
        dist.average_tensors_([*tensors, self._window_nonfinite], name="mpirl.sync")  # HVD: one allreduce
        for st in states:
            st["step"].round_()  # a rank that skipped an update stepped once less; keep counts integral
        # Each flag is now the fraction of ranks whose i-th local gradient was non-finite.
        skipped = [f > 0 for f in self._window_nonfinite[:n].tolist()]
        self._window_nonfinite.zero_()
        self._since_sync = 0
        before = self.updates
        for skip in skipped:
            if not skip:
                self.updates += 1
                self.nonfinite_streak = 0
                continue
            self._count_skip("a non-finite gradient on some rank", "stopped at a weight averaging")
        crossings = self.updates // cfg.target_update_interval - before // cfg.target_update_interval
        if crossings:
            tau = 1.0 - (1.0 - cfg.tau) ** crossings
            algo.update_target(self.target, self.online, tau)  # local, from identical weights

    # --- restore ----------------------------------------------------------------------------
    def adopt_root_state(self, with_optimizer: bool, updates: int) -> None:
        """Collective after rank 0 loaded a checkpoint into its networks (and optimizer): every
        rank takes rank 0's weights (and optimizer state) and the update count."""
        dist.broadcast_model(self.online)  # HVD: rank 0's restored weights to all
        dist.broadcast_model(self.target)  # HVD
        if with_optimizer:  # a fresh Adam is identical everywhere already (see dist)
            dist.broadcast_optimizer(self.optimizer)  # HVD
        self.updates = updates

    def weights_finite(self) -> bool:
        """Are both networks' weights finite? (Identical on every rank under K = 1.)"""
        return model.all_finite(self.online) and model.all_finite(self.target)
