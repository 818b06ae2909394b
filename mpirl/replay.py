"""Per-rank experience replay: uniform ring buffer, prioritized replay, n-step returns.

Everything here is local to one rank and never travels over MPI during training (a
checkpoint gathers the arrays through ``export_arrays``/``import_arrays``). numpy only.

A stored transition is ``(obs, action, reward, next_obs, steps, terminated, truncated)`` where
``reward`` is the discounted n-step return ``sum_{i<k} gamma^i r_{t+i}``, ``next_obs`` the
observation k steps later and ``steps`` = k <= n (k < n when the episode ended first). The TD
target is ``reward + gamma^k * (1 - terminated) * Q(next_obs)``: a time-limit truncation keeps
bootstrapping from the real final observation; a termination does not. ``truncated`` marks a
``next_obs`` that ended its episode by a time limit (kept for offline use; the target needs only
``steps`` and ``terminated``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol

import numpy as np


class Batch(NamedTuple):
    """A sampled batch (one rank's). ``weights`` are PER importance weights (ones if uniform)."""

    obs: np.ndarray
    actions: np.ndarray  # int64 [B]
    rewards: np.ndarray  # float32 [B], n-step discounted returns
    next_obs: np.ndarray
    discounts: np.ndarray  # float32 [B], gamma^k, 0 where terminated
    weights: np.ndarray  # float32 [B]
    indices: np.ndarray  # int64 [B], buffer slots (for priority updates)


class Transitions(NamedTuple):
    """Transitions ready to store, stacked along axis 0."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    steps: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray

    @property
    def size(self) -> int:
        return len(self.actions)


class Replay(Protocol):
    """What the learner samples from and the collector fills: a ``ReplayBuffer``, a
    ``PrioritizedReplayBuffer`` or a ``frame_replay.FrameStackReplay``."""

    def __len__(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def add(self, t: Transitions) -> np.ndarray: ...
    def sample(self, batch_size: int, rng: np.random.Generator, beta: float = 1.0) -> Batch: ...
    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None: ...
    def export_arrays(self) -> dict[str, np.ndarray]: ...
    def state(self) -> dict[str, Any]: ...
    def begin_import(self, total_rows: int) -> None: ...
    def import_rows(self, name: str, first_row: int, rows: np.ndarray) -> None: ...
    def end_import(self, total_rows: int, state: Optional[dict[str, Any]] = None) -> None: ...


class ReplayBuffer:
    """Uniform ring buffer of fixed capacity; the oldest transitions are overwritten first."""

    FIELDS = ("obs", "actions", "rewards", "next_obs", "steps", "terminated", "truncated")

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype, gamma: float) -> None:
        if capacity <= 0:
            raise ValueError(f"replay capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.gamma = gamma
        self.obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.next_obs = np.zeros((capacity, *obs_shape), dtype=obs_dtype)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.steps = np.zeros(capacity, dtype=np.uint8)
        self.terminated = np.zeros(capacity, dtype=bool)
        self.truncated = np.zeros(capacity, dtype=bool)
        self.pos = 0  # next slot to write
        self.size = 0  # filled slots
        self.total_added = 0  # transitions ever added (for stats)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in self.FIELDS)

    def add(self, t: Transitions) -> np.ndarray:
        """Store transitions (vectorised, wrapping around); returns the slots written."""
        k = t.size
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        if k > self.capacity:  # only the newest fit
            t = Transitions(*(np.asarray(a)[-self.capacity :] for a in t))
            k = self.capacity
        idx = (self.pos + np.arange(k)) % self.capacity
        self.obs[idx] = t.obs
        self.next_obs[idx] = t.next_obs
        self.actions[idx] = t.actions
        self.rewards[idx] = t.rewards
        self.steps[idx] = t.steps
        self.terminated[idx] = t.terminated
        self.truncated[idx] = t.truncated
        self.pos = int((self.pos + k) % self.capacity)
        self.size = min(self.size + k, self.capacity)
        self.total_added += k
        return idx

    def _batch(self, idx: np.ndarray, weights: np.ndarray) -> Batch:
        discounts = (self.gamma ** self.steps[idx].astype(np.float32)) * (~self.terminated[idx])
        return Batch(
            obs=self.obs[idx],
            actions=self.actions[idx],
            rewards=self.rewards[idx],
            next_obs=self.next_obs[idx],
            discounts=discounts.astype(np.float32),
            weights=weights,
            indices=idx,
        )

    def sample(self, batch_size: int, rng: np.random.Generator, beta: float = 1.0) -> Batch:
        """Uniform sample with replacement. ``beta`` is accepted for API parity with PER."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = rng.integers(0, self.size, size=batch_size)
        return self._batch(idx, np.ones(batch_size, dtype=np.float32))

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        """No-op for uniform replay."""

    # --- snapshot support (checkpoints) ----------------------------------------------
    def export_arrays(self) -> dict[str, np.ndarray]:
        """Views of the filled slots ``[0, size)`` in slot order (the oldest is at ``pos`` once
        the ring has wrapped); with ``state()`` this restores the exact layout."""
        return {f: getattr(self, f)[: self.size] for f in self.FIELDS}

    def state(self) -> dict[str, Any]:
        """Scalars that, with the exported arrays, restore this buffer exactly."""
        return {"capacity": self.capacity, "pos": self.pos, "size": self.size, "total_added": self.total_added}

    def import_arrays(self, arrays: dict[str, np.ndarray], state: Optional[dict[str, Any]] = None) -> None:
        """Replace the contents with exported arrays; with ``state`` (same capacity) the slot
        layout is restored exactly, else the rows are taken as oldest first."""
        total = len(arrays["actions"])
        self.begin_import(total)
        for name, a in arrays.items():
            self.import_rows(name, 0, a)
        self.end_import(total, state)

    # Streaming import: rows arrive field by field in chunks (from a checkpoint), straight
    # into the buffer's arrays; no second copy of the shard is ever held.
    def begin_import(self, total_rows: int) -> None:
        """Start replacing the contents with ``total_rows`` rows, oldest first; when they
        exceed the capacity, only the newest ``capacity`` rows are kept."""
        self._skip = max(0, total_rows - self.capacity)
        self.pos = 0
        self.size = 0

    def import_rows(self, name: str, first_row: int, rows: np.ndarray) -> None:
        """Write rows ``first_row..`` (of the ``total_rows``) of field ``name``."""
        lo = max(first_row, self._skip)
        if lo >= first_row + len(rows):
            return
        part = rows[lo - first_row :]
        dst = lo - self._skip
        if name in self.FIELDS:
            getattr(self, name)[dst : dst + len(part)] = part
        else:
            self._import_extra(name, dst, part)

    def _import_extra(self, name: str, dst: int, rows: np.ndarray) -> None:
        """Fields only some buffers keep (PER priorities); a uniform buffer drops them."""

    def end_import(self, total_rows: int, state: Optional[dict[str, Any]] = None) -> None:
        """Finish an import. ``state`` from ``state()`` of a buffer of the same capacity
        restores its ring position; without it the rows were oldest first."""
        self.size = min(total_rows, self.capacity)
        self.pos = self.size % self.capacity
        self.total_added = total_rows
        if state is not None and state["capacity"] == self.capacity and state["size"] == self.size:
            self.pos = int(state["pos"])
            self.total_added = int(state["total_added"])


class SumTree:
    """Binary sum tree (plus min tree) over ``capacity`` leaves, vectorised over queries.

    Node 1 is the root; leaves sit at ``[P, 2P)`` with ``P`` the next power of two.
    """

    def __init__(self, capacity: int) -> None:
        self.leaves = 1 << max(0, int(np.ceil(np.log2(max(capacity, 1)))))
        self.sum = np.zeros(2 * self.leaves, dtype=np.float64)
        self.min = np.full(2 * self.leaves, np.inf, dtype=np.float64)

    @property
    def total(self) -> float:
        return float(self.sum[1])

    @property
    def min_value(self) -> float:
        return float(self.min[1])

    def set(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Set leaf values and refresh their ancestors, one tree level at a time."""
        nodes = np.asarray(idx, dtype=np.int64) + self.leaves
        self.sum[nodes] = values
        self.min[nodes] = values
        nodes = np.unique(nodes >> 1)
        while nodes[0] >= 1:
            left = 2 * nodes
            self.sum[nodes] = self.sum[left] + self.sum[left + 1]
            self.min[nodes] = np.minimum(self.min[left], self.min[left + 1])
            if nodes[0] == 1:
                break
            nodes = np.unique(nodes >> 1)

    def clear(self, idx: np.ndarray) -> None:
        """Empty leaves: zero mass (never found) and no effect on the minimum."""
        self.set(idx, np.zeros(len(idx)))
        nodes = np.unique(np.asarray(idx, dtype=np.int64) + self.leaves)
        self.min[nodes] = np.inf
        nodes = np.unique(nodes >> 1)
        while nodes[0] >= 1:
            self.min[nodes] = np.minimum(self.min[2 * nodes], self.min[2 * nodes + 1])
            if nodes[0] == 1:
                break
            nodes = np.unique(nodes >> 1)

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.sum[np.asarray(idx, dtype=np.int64) + self.leaves]

    def find(self, prefix: np.ndarray) -> np.ndarray:
        """Leaf indices whose cumulative-sum interval holds each prefix value."""
        prefix = np.array(prefix, dtype=np.float64)
        nodes = np.ones(prefix.shape, dtype=np.int64)
        while nodes[0] < self.leaves:  # all queries descend in lockstep
            left = 2 * nodes
            left_sum = self.sum[left]
            go_right = prefix > left_sum
            prefix = np.where(go_right, prefix - left_sum, prefix)
            nodes = np.where(go_right, left + 1, left)
        return nodes - self.leaves


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritized replay (Schaul et al. 2016) on a sum tree.

    P(i) = p_i^alpha / sum_j p_j^alpha; importance weight w_i = (N P(i))^-beta / max_j w_j, the
    max taken over the whole buffer (through the min tree), as in the paper. New transitions
    get the largest priority seen so far, so each is replayed at least once with high odds.
    """

    def __init__(
        self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype, gamma: float,
        alpha: float = 0.6, eps: float = 1e-6,
    ) -> None:  # fmt: skip
        super().__init__(capacity, obs_shape, obs_dtype, gamma)
        self.alpha = alpha
        self.eps = eps
        self.tree = SumTree(capacity)
        self.max_priority = 1.0  # raw |td| + eps, before alpha

    def add(self, t: Transitions) -> np.ndarray:
        idx = super().add(t)
        if len(idx):
            self.tree.set(idx, np.full(len(idx), self.max_priority**self.alpha))
        return idx

    def sample(self, batch_size: int, rng: np.random.Generator, beta: float = 0.4) -> Batch:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        total = self.tree.total
        # Stratified: one uniform draw in each of batch_size equal slices of the total mass.
        bounds = (np.arange(batch_size) + rng.random(batch_size)) * (total / batch_size)
        bounds = np.minimum(bounds, np.nextafter(total, 0.0))
        idx = self.tree.find(bounds)
        # Guard against float round-off landing on an empty leaf past the fill.
        idx = np.minimum(idx, self.size - 1)
        probs = self.tree.get(idx) / total
        min_prob = self.tree.min_value / total
        weights = (probs / min_prob) ** (-beta)  # == (N P)^-b / (N P_min)^-b
        return self._batch(idx, weights.astype(np.float32))

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        prio = np.abs(np.asarray(td_errors, dtype=np.float64)) + self.eps
        # A non-finite TD error (the update is skipped then) must not poison the sum tree.
        prio = np.where(np.isfinite(prio), prio, self.max_priority)
        self.max_priority = max(self.max_priority, float(prio.max(initial=0.0)))
        self.tree.set(indices, prio**self.alpha)

    def forget(self, indices: np.ndarray) -> None:
        """Never sample these slots again (until they are overwritten by new transitions)."""
        self.tree.clear(indices)

    def export_arrays(self) -> dict[str, np.ndarray]:
        out = super().export_arrays()
        out["priorities"] = self.tree.get(np.arange(self.size))  # leaves (p^alpha), float64
        return out

    def state(self) -> dict[str, Any]:
        return {**super().state(), "max_priority": self.max_priority}

    def begin_import(self, total_rows: int) -> None:
        super().begin_import(total_rows)
        self.tree = SumTree(self.capacity)
        self._import_prio = np.full(min(total_rows, self.capacity), self.max_priority**self.alpha)

    def _import_extra(self, name: str, dst: int, rows: np.ndarray) -> None:
        if name == "priorities":  # stored as tree leaves, i.e. already raised to alpha
            self._import_prio[dst : dst + len(rows)] = rows

    def end_import(self, total_rows: int, state: Optional[dict[str, Any]] = None) -> None:
        super().end_import(total_rows, state)
        if self.size:
            self.tree.set(np.arange(self.size), self._import_prio[: self.size])
            forgotten = np.flatnonzero(self._import_prio[: self.size] == 0)  # see forget()
            if len(forgotten):
                self.tree.clear(forgotten)
            leaf_max = float(self._import_prio[: self.size].max())
            self.max_priority = max(self.max_priority, leaf_max ** (1.0 / max(self.alpha, 1e-12)))
        if state is not None and "max_priority" in state:
            self.max_priority = float(state["max_priority"])
        del self._import_prio


class NStepAccumulator:
    """Turns per-step vector-env output into n-step transitions, per environment.

    Call ``push`` once per vector step with ``valid`` False for envs whose step was a gymnasium
    1.x autoreset step (the action was ignored and the obs is a reset obs, not a transition).
    """

    def __init__(self, num_envs: int, n: int, gamma: float) -> None:
        self.n = n
        self.gamma = gamma
        self.num_envs = num_envs
        self._pending: list[list[tuple[np.ndarray, int, float]]] = [[] for _ in range(num_envs)]

    def _emit(
        self, out: list[tuple], env: int, next_obs: np.ndarray, terminated: bool, truncated: bool, upto: int
    ) -> None:
        pend = self._pending[env]
        for start in range(upto):
            ret = 0.0
            for j, (_, _, r) in enumerate(pend[start:]):
                ret += (self.gamma**j) * r
            o, a, _ = pend[start]
            out.append((o, a, ret, next_obs, len(pend) - start, terminated, truncated))
        del pend[:upto]

    def push(
        self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
        terminated: np.ndarray, truncated: np.ndarray, valid: np.ndarray,
    ) -> Optional[Transitions]:  # fmt: skip
        """Add one vector step; return the transitions that became complete (or None)."""
        out: list[tuple] = []
        for e in np.flatnonzero(valid):
            pend = self._pending[e]
            pend.append((obs[e], int(actions[e]), float(rewards[e])))
            if terminated[e] or truncated[e]:
                ended_by_termination = bool(terminated[e])
                self._emit(out, int(e), next_obs[e], ended_by_termination, not ended_by_termination, len(pend))
            elif len(pend) == self.n:
                self._emit(out, int(e), next_obs[e], False, False, 1)
        if not out:
            return None
        o, a, r, no, k, term, trunc = zip(*out)
        return Transitions(
            obs=np.stack(o),
            actions=np.asarray(a, dtype=np.int64),
            rewards=np.asarray(r, dtype=np.float32),
            next_obs=np.stack(no),
            steps=np.asarray(k, dtype=np.uint8),
            terminated=np.asarray(term, dtype=bool),
            truncated=np.asarray(trunc, dtype=bool),
        )

    def state(self) -> list[list[tuple[np.ndarray, int, float]]]:
        """The per-env queues of steps not yet emitted (arrays, ints, floats: data for checkpoints)."""
        return [list(p) for p in self._pending]

    def set_state(self, pending: list[list[tuple[np.ndarray, int, float]]]) -> None:
        if len(pending) != self.num_envs:
            raise ValueError(f"saved n-step state has {len(pending)} envs, this shard {self.num_envs}")
        self._pending = [list(p) for p in pending]
