"""Collector env state through a checkpoint's path (state() -> bytes in chunks -> end_restore):
data only, never unpickled; CartPole, Pong and the MinAtar games resume bitwise exactly
(issues 18 and 15)."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from mpirl import envs, envstate
from mpirl.collector import Collector, CollectorState
from mpirl.config import Config


def make(env_id: str = "CartPole-v1", **kw) -> Collector:
    base = dict(
        env_id=env_id, num_envs_per_rank=2, seed=3, n_step=3, buffer_size_per_rank=500,
        batch_size_per_rank=4, learning_starts_per_rank=8, hidden_sizes=(8,),
    )  # fmt: skip
    base.update(kw)
    cfg = Config(**base).validate()
    return Collector(cfg, envs.inspect_env(cfg.env_id, envs.atari_options(cfg)), rank=0)


def restore(col: Collector, state: CollectorState, env_blob: bytes, global_steps: int = 100) -> str:
    """Feed ``state`` (with ``env_blob`` as its env state) the way checkpoint.restore_shards does."""
    meta = {"replay": state.replay_state, "numpy_rng": state.numpy_rng, "episodes": state.stats.episodes,
            "win": state.stats.to_meta()}  # fmt: skip
    col.begin_restore(len(state.replay_arrays["actions"]), [meta])
    for name, arr in state.replay_arrays.items():
        col.restore_rows(name, 0, arr)
    raw = np.frombuffer(env_blob, np.uint8)
    for lo in range(0, len(raw), 4096):  # in chunks, as the shard stream delivers it
        col.restore_rows("env_state", lo, raw[lo : lo + 4096])
    note, got = col.end_restore(same_world=True, global_steps=global_steps)
    assert got is meta
    return note


def pole_policy(obs: np.ndarray) -> np.ndarray:
    return (obs[:, 2] > 0).astype(np.int64)  # push toward the pole's lean


def record(col: Collector, steps: int, greedy, epsilon: float) -> list[bytes]:
    """Step ``col``; every env step's observations, rewards, terminations and truncations, as bytes."""
    out: list[bytes] = []
    inner = col.vec.step

    def step(actions):
        result = inner(actions)
        out.extend(np.asarray(x).tobytes() for x in result[:4])
        return result

    col.vec.step = step  # type: ignore[method-assign]
    for _ in range(steps):
        col.step(greedy, epsilon)
    col.vec.step = inner  # type: ignore[method-assign]
    return out


def same_collectors(a: Collector, b: Collector) -> None:
    ea, eb = a.replay.export_arrays(), b.replay.export_arrays()
    assert ea.keys() == eb.keys()
    for k in ea:
        assert np.asarray(ea[k]).tobytes() == np.asarray(eb[k]).tobytes(), k
    assert a.replay.state() == b.replay.state() and a.stats == b.stats
    assert a.rng.bit_generator.state == b.rng.bit_generator.state


@pytest.mark.parametrize(
    "env_id, kw, greedy, before, after",
    [
        ("CartPole-v1", {}, pole_policy, 45, 300),
        pytest.param("ALE/Pong-v5", {"sticky_actions": 0.0}, None, 60, 150, id="Pong"),
        # MinAtar with its sticky actions on (p = 0.1): the game's last action is in its state
        *[
            pytest.param(f"MinAtar/{game}-v1", {}, None, 150, 400, id=f"MinAtar-{game}")
            for game in ("Breakout", "SpaceInvaders", "Asterix", "Freeway", "Seaquest")
        ],
    ],
)
def test_resume_is_bitwise_exact(env_id, kw, greedy, before, after):
    if env_id.startswith("ALE/"):
        pytest.importorskip("ale_py")
    if env_id.startswith("MinAtar/"):
        pytest.importorskip("minatar", reason="the minatar extra is not installed")
    epsilon = 0.5 if greedy else 1.0  # Pong: random play (no network here), from the collector's RNG
    a = make(env_id, **kw)
    record(a, before, greedy, epsilon)
    state = a.state()
    assert envstate.has_magic(state.env_state)
    b = make(env_id, **kw)
    record(b, 7, greedy, epsilon)  # b's own progress must be replaced, not kept
    assert restore(b, state, state.env_state).startswith("exact resume")
    same_collectors(a, b)
    assert record(a, after, greedy, epsilon) == record(b, after, greedy, epsilon)
    same_collectors(a, b)
    assert a.state().env_state == b.state().env_state  # the whole env shard, byte for byte
    assert a.stats.episodes > (3 if greedy else -1)  # CartPole: crossed episode ends and autoresets


class _WritesMarker:
    """A pickle payload that creates a file when unpickled (what a crafted checkpoint could do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


def test_a_pickle_payload_is_never_unpickled(tmp_path):
    live = tmp_path / "proof-the-payload-is-live"
    pickle.loads(pickle.dumps(_WritesMarker(live)))
    assert live.exists()  # the payload really runs code when unpickled
    marker = tmp_path / "marker"
    a = make()
    record(a, 20, pole_policy, 0.5)
    state = a.state()
    payload = pickle.dumps({"vec": _WritesMarker(marker), "obs": a.obs})  # schema 1's form
    b = make()
    note = restore(b, state, payload, global_steps=40)
    assert not marker.exists()
    assert note.startswith("env state in the old pickle form is not loaded: env shards restart")
    fresh = make(seed=3 + 40)  # env shards restart, seeded apart by the step count
    np.testing.assert_array_equal(b.obs, fresh.obs)
    assert b.stats == a.stats and b.replay.state() == a.replay.state()  # replay and counters kept


@pytest.mark.parametrize(
    "blob, match",
    [
        (envstate.MAGIC + b"\x01garbage", "truncated"),
        (b"not a pickle, not ours", "bad magic"),
        (envstate.pack({"vec": None}), "not a collector's env state"),
    ],
)
def test_a_malformed_env_state_is_an_envstate_error(blob, match):
    a = make()
    record(a, 5, pole_policy, 0.5)
    state = a.state()
    with pytest.raises(envstate.EnvStateError, match=match) as info:
        restore(make(), state, blob)
    assert "\n" not in str(info.value)


def test_a_tampered_state_is_refused_before_the_envs_change():
    a = make()
    record(a, 12, pole_policy, 0.5)
    state = a.state()
    tree = envstate.unpack(state.env_state)
    tree["nstep"][0] = [(tree["keys"][0], "left", 1.0)]
    b = make()
    before = b.vec.envs[0].unwrapped.state.copy()
    with pytest.raises(envstate.EnvStateError, match="n-step queue"):
        restore(b, state, envstate.pack(tree))
    np.testing.assert_array_equal(b.vec.envs[0].unwrapped.state, before)
    tree = envstate.unpack(state.env_state)
    tree["obs"] = tree["obs"][:1]
    with pytest.raises(envstate.EnvStateError, match="obs is not float32"):
        restore(make(), state, envstate.pack(tree))


def test_an_env_with_no_data_encoding_restarts_on_resume():
    a = make()
    record(a, 10, pole_policy, 0.5)
    a.vec.envs[0].unwrapped.lock = threading.Lock()
    state = a.state()
    assert state.env_state == b""
    note = restore(make(), state, state.env_state)
    assert note.startswith("env states were not saved")
