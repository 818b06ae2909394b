"""Frame-stack replay: Atari's stacked observations stored one frame at a time.

numpy only, per rank, like mpirl.replay (whose buffers hold the transitions here).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from mpirl.replay import Batch, PrioritizedReplayBuffer, ReplayBuffer, Transitions


class FrameStackReplay:
    """Replay for frame-stacked image observations that stores every frame once.

    A stack of K frames (K, H, W) shares K - 1 frames with the previous observation of the
    same env, and ``obs``/``next_obs`` of one transition share most of theirs too, so the
    naive layout holds each frame about 2K times. Here each rank keeps a ring of single
    frames (``frames``, uint8 (F, H, W)) and the transitions (in ``inner``, a uniform or
    prioritized buffer) hold, in place of observations, the K frame *references* of each
    stack: int64 sequence numbers of frames (frame ``s`` lives in slot ``s % F``).

    ``encode_obs`` is called once per vector step with every env's new observation (reset
    observations included); it appends only the frames that are new (one per step when the
    stack shifted by one frame, as gymnasium's ``FrameStackObservation`` does) and returns the
    references, which then travel through ``NStepAccumulator`` like observations.

    The frame ring holds ``F = C + C // 8 + margin`` frames for ``C`` transitions: each
    stored transition needs its frames, and episodes add one extra frame each (their reset
    frame). A transition whose oldest frame was overwritten (possible only with very short
    episodes) is never sampled: sampling redraws it (uniform) or zeroes its priority (PER).
    """

    MAX_REDRAWS = 64

    def __init__(self, inner: ReplayBuffer, frame_shape: tuple[int, ...], num_envs: int, n_step: int) -> None:
        self.inner = inner
        self.stack = int(inner.obs.shape[1])  # K
        c = inner.capacity
        self.frame_capacity = c + c // 8 + num_envs * (n_step + 2 * self.stack + 2)
        self.frames = np.zeros((self.frame_capacity, *frame_shape), dtype=np.uint8)
        self.frames_total = 0  # frames ever appended on this rank (the next sequence number)
        self._last = np.full((num_envs, self.stack), -1, dtype=np.int64)  # each env's current stack

    # --- the ReplayBuffer interface, delegated or wrapped --------------------------
    def __len__(self) -> int:
        return len(self.inner)

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.frames.nbytes

    def add(self, t: Transitions) -> np.ndarray:
        return self.inner.add(t)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> None:
        self.inner.update_priorities(indices, td_errors)

    def _oldest_live(self) -> int:
        return self.frames_total - self.frame_capacity

    def _append(self, frame: np.ndarray) -> int:
        seq = self.frames_total
        self.frames[seq % self.frame_capacity] = frame
        self.frames_total += 1
        return seq

    def encode_obs(self, obs: np.ndarray) -> np.ndarray:
        """Store the new frames of every env's observation ``obs`` (E, K, H, W); return the
        frame references (E, K) int64 to use in place of ``obs`` in transitions."""
        refs = np.empty((len(obs), self.stack), dtype=np.int64)
        for e, stack in enumerate(obs):
            last = self._last[e]
            shifted = (
                self.stack > 1
                and last[0] >= 0
                and last[1] >= self._oldest_live()
                and np.array_equal(stack[:-1], self.frames[last[1:] % self.frame_capacity])
            )
            if shifted:  # the usual step: one new frame
                refs[e, :-1] = last[1:]
                refs[e, -1] = self._append(stack[-1])
            else:  # a reset (or any stack that did not shift): store its distinct frames
                for k in range(self.stack):
                    same = k > 0 and np.array_equal(stack[k], stack[k - 1])
                    refs[e, k] = refs[e, k - 1] if same else self._append(stack[k])
            self._last[e] = refs[e]
        return refs

    def sample(self, batch_size: int, rng: np.random.Generator, beta: float = 1.0) -> Batch:
        """A batch with full (B, K, H, W) uint8 stacks gathered from the frame ring."""
        b = self.inner.sample(batch_size, rng, beta)
        for _ in range(self.MAX_REDRAWS):
            lost = (np.minimum(b.obs.min(axis=1), b.next_obs.min(axis=1)) < self._oldest_live()).nonzero()[0]
            if len(lost) == 0:
                break
            if isinstance(self.inner, PrioritizedReplayBuffer):
                self.inner.forget(b.indices[lost])  # never drawn again
            redraw = self.inner.sample(len(lost), rng, beta)
            for name in ("obs", "actions", "rewards", "next_obs", "discounts", "weights", "indices"):
                getattr(b, name)[lost] = getattr(redraw, name)
        else:
            raise RuntimeError(
                "frame-stack replay: sampled transitions keep referring to overwritten frames; "
                "the episodes are too short for the frame ring (raise --buffer-size-per-rank)"
            )
        return b._replace(
            obs=self.frames[b.obs % self.frame_capacity], next_obs=self.frames[b.next_obs % self.frame_capacity]
        )

    # --- snapshot support -------------------------------------------------------------
    def export_arrays(self) -> dict[str, np.ndarray]:
        """The inner buffer's fields (``obs``/``next_obs`` hold frame references) and the
        filled part of the frame ring in slot order (a view: no copy)."""
        out = self.inner.export_arrays()
        out["frames"] = self.frames[: min(self.frames_total, self.frame_capacity)]
        return out

    def state(self) -> dict[str, Any]:
        return {
            **self.inner.state(),
            "frames_total": self.frames_total,
            "frame_capacity": self.frame_capacity,
            "last_refs": self._last.tolist(),
        }

    def begin_import(self, total_rows: int) -> None:
        self.inner.begin_import(total_rows)
        self._frames_seen = 0

    def import_rows(self, name: str, first_row: int, rows: np.ndarray) -> None:
        if name == "frames":  # slot order, same ring size (see end_import)
            if first_row + len(rows) > self.frame_capacity:  # another ring size: cannot fit
                self._frames_seen = -1
                return
            self.frames[first_row : first_row + len(rows)] = rows
            if self._frames_seen >= 0:
                self._frames_seen = max(self._frames_seen, first_row + len(rows))
        else:
            self.inner.import_rows(name, first_row, rows)

    def end_import(self, total_rows: int, state: Optional[dict[str, Any]] = None) -> None:
        """Restore exactly from the state of a buffer of the same sizes; anything else (another
        world size, capacity or env count) cannot keep the frame references: start empty."""
        fits = (
            state is not None
            and state.get("frame_capacity") == self.frame_capacity
            and state["capacity"] == self.capacity
            and np.shape(state["last_refs"]) == self._last.shape
            and self._frames_seen == min(int(state["frames_total"]), self.frame_capacity)
        )
        if not fits:
            self.inner.begin_import(0)
            self.inner.end_import(0)
            self.frames_total = 0
            self._last[:] = -1
            return
        assert state is not None
        self.inner.end_import(total_rows, state)
        self.frames_total = int(state["frames_total"])
        self._last = np.asarray(state["last_refs"], dtype=np.int64)
