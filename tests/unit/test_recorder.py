"""Episode recording (issue 16) in one process: the collector's rows through chunks and
``mpirl.export`` back to episodes, against the episode timeline of tests/unit/toy_envs.py (env 0
terminates on its 4th step, env 1 is truncated after 5; obs [100 * kind + episode, t]; with the
t % 2 policy, rewards [-1, 0, 1, 4] and [-1, 0, 1, 4, 3]) and against the collector's own episode
statistics; exact resume continues episodes across chunks; restarted envs leave theirs
unfinished; Atari frames come back as the stacks the agent saw; Minari's loader and h5py read the
exports; damaged, foreign or incomplete recordings are refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from test_collector import make_cfg, t_parity
from test_collector_resume import restore

from mpirl import envs, export, recorder, recording
from mpirl.collector import Collector
from mpirl.config import Config
from mpirl.metrics import MetricsWriter

E = 2  # envs of the toy shard: env 0 kind 0 (seed 10), env 1 kind 1 (seed 11)


def start(directory, cfg: Config, at: int = 0, resumed: bool = False, col: Collector | None = None,
          limit: int = 8 * 56, backend: str = "gymnasium") -> Collector:  # fmt: skip
    """A collector recording into ``directory`` from global step ``at`` (prepared as the trainer
    does); ``limit``: bytes of rows per chunk (8 toy rows: episodes span chunks)."""
    info = envs.inspect_env(cfg.env_id, envs.atari_options(cfg))
    col = col or Collector(cfg, info, rank=0, env_backend=backend)
    seg = recording.new_segment(at, 1, cfg.to_dict(), recorder.seeds_note(cfg, col.fresh, col.seed_step))
    _, continuing = recording.prepare(str(directory), recorder.manifest(cfg, info, {"mpirl": "t"}), seg, resumed, False)
    col.start_recording(str(directory), at, continuing, limit)
    return col


def steps(col: Collector, n: int, first: int = 0, epsilon: float = 0.0, greedy=t_parity) -> None:
    """``n`` vector steps; vector step i brings the (one-rank) job to global step (i + 1) * E."""
    for i in range(first, first + n):
        col.step(greedy, epsilon, (i + 1) * E)


def episodes(directory, stack: bool = False) -> list[tuple[export.Episode, dict[str, np.ndarray]]]:
    return list(export.iter_episodes(export.build_index(str(directory)), stack))


def logged(col: Collector) -> set[tuple[int, int, float, int]]:
    return set(col.stats.take_finished())


def test_every_finished_episode_is_recorded_once_with_its_steps(tmp_path):
    col = start(tmp_path / "rec", make_cfg())
    steps(col, 53)
    log = logged(col)
    col.close()
    index = export.build_index(str(tmp_path / "rec"))
    assert len(recording.list_chunks(str(tmp_path / "rec"))) > 10  # 8 rows a chunk: episodes span chunks
    got = episodes(tmp_path / "rec")
    # env 0: an episode every 5 vector steps (4 steps + the reset step), env 1 every 6: 10 and 9 finished
    assert [sum(ep.env == e for ep, _ in got) for e in (0, 1)] == [10, 9]
    assert index.unfinished == 1  # env 0 is mid-episode at the end; env 1 ended on the last step
    assert {(ep.end_step, ep.env, float(r["rewards"][1:].sum()), len(r["obs"]) - 1) for ep, r in got} == log
    for ep, r in got:
        kind, k = ep.env, ep.index
        L = 4 if kind == 0 else 5
        assert (ep.rank, ep.env_seed, ep.seed_step) == (0, 10 + kind, 0)
        np.testing.assert_array_equal(r["obs"], [[100 * kind + k, t] for t in range(L + 1)])
        np.testing.assert_array_equal(r["actions"][1:], [t % 2 for t in range(L)])
        np.testing.assert_array_equal(r["rewards"][1:], [-1, 0, 1, 4, 3][:L])
        np.testing.assert_array_equal(r["terminated"][1:], [False] * (L - 1) + [kind == 0])
        np.testing.assert_array_equal(r["truncated"][1:], [False] * (L - 1) + [kind == 1])
        assert np.isnan(r["epsilon"][0]) and (r["epsilon"][1:] == 0).all() and not r["explored"].any()
        assert r["global_step"][-1] == ep.end_step and (np.diff(r["global_step"]) == E).all()
    ends = [ep.end_step for ep, _ in got]
    assert ends == sorted(ends)  # ordered by the step at which they ended


def test_epsilon_and_explored_are_the_collectors_draws(tmp_path):
    col = start(tmp_path / "rec", make_cfg())
    seen = []
    act = col.act

    def spy(greedy, eps):
        out = act(greedy, eps)
        seen.append(col.explored.copy())
        return out

    col.act = spy  # type: ignore[method-assign]
    steps(col, 40, epsilon=0.5)
    col.close()
    got = episodes(tmp_path / "rec")
    assert got
    for ep, r in got:
        first = int(r["global_step"][1]) // E - 1  # the vector step of the episode's first step
        want = [seen[first + t][ep.env] for t in range(len(r["obs"]) - 1)]
        np.testing.assert_array_equal(r["explored"][1:], want)
        assert (r["epsilon"][1:] == np.float32(0.5)).all()


def _interrupted(tmp_path, with_env_state: bool):
    """Record 23 vector steps, checkpoint, record 10 more (a crash follows: their chunks must go),
    then resume from the checkpoint in a fresh collector and record to step 60."""
    cfg = make_cfg()
    a = start(tmp_path / "split", cfg)
    steps(a, 23)
    state = a.state()  # flushes: the checkpoint's step divides the chunks
    S = 23 * E
    steps(a, 10, first=23)
    a.recorder.flush()  # chunks after S, as a crash would leave them
    log = logged(a)
    b = Collector(cfg, envs.inspect_env(cfg.env_id), rank=0)
    note = restore(b, state, state.env_state if with_env_state else b"", global_steps=S)
    start(tmp_path / "split", cfg, at=S, resumed=True, col=b)
    steps(b, 60 - 23, first=23)
    log = {x for x in log if x[0] <= S} | logged(b)
    b.close()
    return note, log


def test_exact_resume_gives_the_uninterrupted_recording(tmp_path):
    straight = start(tmp_path / "straight", make_cfg())
    steps(straight, 60)
    straight.close()
    note, log = _interrupted(tmp_path, with_env_state=True)
    assert note.startswith("exact resume")
    a, b = episodes(tmp_path / "straight"), episodes(tmp_path / "split")
    assert [ep for ep, _ in a] != [] and len(a) == len(b)
    for (ea, ra), (eb, rb) in zip(a, b):
        assert (ea.rank, ea.env, ea.seed_step, ea.index, ea.env_seed, ea.end_step) == (
            eb.rank, eb.env, eb.seed_step, eb.index, eb.env_seed, eb.end_step)  # fmt: skip
        for key in ra:
            np.testing.assert_array_equal(ra[key], rb[key], err_msg=key)
    assert {(ep.end_step, ep.env, float(r["rewards"][1:].sum()), len(r["obs"]) - 1) for ep, r in b} == log


def test_envs_restarted_at_a_resume_leave_their_episodes_unfinished(tmp_path):
    note, log = _interrupted(tmp_path, with_env_state=False)
    assert "restart" in note
    index = export.build_index(str(tmp_path / "split"))
    got = episodes(tmp_path / "split")
    assert {(ep.end_step, ep.env, float(r["rewards"][1:].sum()), len(r["obs"]) - 1) for ep, r in got} == log
    assert index.unfinished == 3  # in flight at the checkpoint (env 0; env 1 had just ended) and at the end (2)
    restarted = [ep for ep, _ in got if ep.seed_step == 23 * E]
    assert restarted and {ep.env_seed for ep in restarted} == {10 + 23 * E, 11 + 23 * E}
    assert all(ep.index > 0 or ep.env_seed in (10, 11, 10 + 23 * E, 11 + 23 * E) for ep, _ in got)


def test_recording_from_a_resume_without_recorder_state_starts_at_each_reset(tmp_path):
    cfg = make_cfg()
    a = Collector(cfg, envs.inspect_env(cfg.env_id), rank=0)
    steps(a, 7)  # not recorded: mid-episode when recording starts
    state = a.state()
    b = Collector(cfg, envs.inspect_env(cfg.env_id), rank=0)
    restore(b, state, state.env_state, global_steps=7 * E)
    start(tmp_path / "rec", cfg, at=7 * E, resumed=True, col=b)
    steps(b, 30, first=7)
    log = {x for x in logged(b) if x[0] > 7 * E + 5 * E}  # episodes that began after recording did
    b.close()
    got = episodes(tmp_path / "rec")
    # env 0's episode 1 (reset at vector step 5) began before recording did: the first recorded is #2
    # since its seed, counted from 0 here, with the seed unknown (-1) to the recorder
    assert [ep.index for ep, _ in got if ep.env == 0] == list(range(5))
    assert {(ep.env_seed, ep.seed_step) for ep, _ in got} == {(-1, 7 * E)}
    assert min(ep.end_step for ep, _ in got if ep.env == 0) == 14 * E
    assert log <= {(ep.end_step, ep.env, float(r["rewards"][1:].sum()), len(r["obs"]) - 1) for ep, r in got}


def test_a_resume_recording_into_a_new_directory_starts_each_env_at_its_next_reset(tmp_path):
    cfg = make_cfg()
    a = start(tmp_path / "first", cfg)
    steps(a, 23)
    state = a.state()  # carries the recorder's in-flight episodes, whose beginnings are in "first"
    b = Collector(cfg, envs.inspect_env(cfg.env_id), rank=0)
    restore(b, state, state.env_state, global_steps=23 * E)
    start(tmp_path / "second", cfg, at=23 * E, resumed=True, col=b)
    steps(b, 20, first=23)
    b.close()
    got = episodes(tmp_path / "second")  # joins: no episode starts mid-way
    assert got and min(ep.end_step for ep, _ in got) > 23 * E + E
    assert all(len(r["obs"]) - 1 == (4 if ep.env == 0 else 5) for ep, r in got)


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
def test_pong_frames_come_back_as_the_stacks_the_agent_saw(tmp_path, backend):
    pytest.importorskip("ale_py")
    if backend == "envpool":
        pytest.importorskip("envpool", reason="EnvPool is not installed (its wheels need Python >= 3.11)")
    cfg = make_cfg(env_id="ALE/Pong-v5", num_envs_per_rank=1, clip_rewards="auto", learning_starts_per_rank=8)
    # a chunk of ~300 frames: episodes span chunks; random no-ops and sticky actions on (the defaults)
    col = start(tmp_path / "rec", cfg, limit=300 * 84 * 84, backend=backend)
    seen = [col.obs[0].copy()]
    inner = col.vec.step

    def step(actions):
        out = inner(actions)
        seen.append(out[0][0].copy())
        return out

    col.vec.step = step  # type: ignore[method-assign]
    for i in range(3000):
        col.step(lambda o: np.zeros(len(o), np.int64), 1.0, i + 1)
        if col.stats.episodes:
            break
    col.close()
    (ep, r), *_ = episodes(tmp_path / "rec", stack=True)
    n = len(r["obs"])
    assert r["obs"].dtype == np.uint8 and r["obs"].shape[1:] == (4, 84, 84) and n > 300
    np.testing.assert_array_equal(r["obs"], np.stack(seen[:n]))
    (_, single), *_ = episodes(tmp_path / "rec")
    assert single["obs"].shape == (n, 84, 84)
    assert float(r["rewards"][1:].sum()) == col.stats.take_finished()[0][2]  # game score, unclipped
    minari = pytest.importorskip("minari", reason="the minari extra is not installed")
    for stack, shape in ((False, (84, 84)), (True, (4, 84, 84))):  # single frames, or the stacks the agent saw
        args = ["--minari", f"pong/s{int(stack)}-v0", "--minari-root", str(tmp_path / "m"), "--compression", "lzf"]
        assert export.main([str(tmp_path / "rec"), *args, *(["--stack-frames"] if stack else [])]) == 0
        data = minari.MinariDataset(str(tmp_path / "m" / f"pong/s{int(stack)}-v0" / "data"))
        assert data.observation_space.shape == shape and data.observation_space.dtype == np.uint8
        first = next(data.iterate_episodes())
        np.testing.assert_array_equal(first.observations, r["obs"] if stack else single["obs"])  # lossless


def test_minari_and_d4rl_exports_hold_every_episode(tmp_path):
    col = start(tmp_path / "rec", make_cfg())
    steps(col, 41)
    log = logged(col)
    col.close()
    root = tmp_path / "minari"
    assert export.main([str(tmp_path / "rec"), "--minari", "mpirl/toy-s10-v0", "--minari-root", str(root),
                        "--d4rl", str(tmp_path / "toy.hdf5")]) == 0  # fmt: skip
    with h5py.File(tmp_path / "toy.hdf5", "r") as f:
        rewards, ends = f["rewards"][:], f["terminals"][:] | f["timeouts"][:]
        bounds = np.flatnonzero(ends) + 1
        returns = [float(x.sum()) for x in np.split(rewards, bounds)[:-1]]
        assert len(rewards) == bounds[-1]  # every episode ends with a terminal or a timeout
        np.testing.assert_array_equal(f["next_observations"][:-1][~ends[:-1]], f["observations"][1:][~ends[:-1]])
        table = {k: f["episodes"][k][:] for k in f["episodes"]}
        meta = json.loads(f.attrs["metadata"])
    assert {(s, e, r, n) for s, e, r, n in zip(table["end_global_step"], table["env"], returns, table["steps"])} == log
    np.testing.assert_array_equal(table["return"], returns)
    assert meta["env_id"] == make_cfg().env_id and meta["total_episodes"] == len(log) and meta["world_sizes"] == [1]
    assert meta["epsilon_schedule"]["decay_steps"] == make_cfg().eps_decay_steps
    minari = pytest.importorskip("minari", reason="the minari extra is not installed")
    data = minari.MinariDataset(str(root / "mpirl/toy-s10-v0" / "data"))
    assert data.total_episodes == len(log) and data.total_steps == len(rewards)
    metas = data.storage.get_episode_metadata(data.episode_indices)
    got = {(int(m["mpirl"]["end_global_step"]), int(m["mpirl"]["env"]), float(ep.rewards.sum()), len(ep))
           for ep, m in zip(data.iterate_episodes(), metas)}  # fmt: skip
    assert got == log


def test_a_truncated_or_foreign_chunk_is_refused_with_one_line(tmp_path, capsys):
    col = start(tmp_path / "rec", make_cfg())
    steps(col, 30)
    col.close()
    chunks = recording.list_chunks(str(tmp_path / "rec"))
    data = open(chunks[3], "rb").read()
    open(chunks[3], "wb").write(data[: len(data) // 2])
    assert export.main([str(tmp_path / "rec"), "--d4rl", str(tmp_path / "out" / "x.hdf5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "damaged or truncated chunk" in err and chunks[3] in err
    assert not os.path.exists(tmp_path / "out")
    shutil.copy(chunks[4], chunks[3])  # a chunk's rows twice: the episodes it ends, end twice
    assert export.main([str(tmp_path / "rec")]) == 2
    assert "ends twice (a chunk is duplicated)" in capsys.readouterr().err
    open(chunks[3], "wb").write(data)
    assert export.main([str(tmp_path / "rec")]) == 0  # whole again
    os.remove(chunks[4])  # a missing chunk: the episodes it held part of do not join
    assert export.main([str(tmp_path / "rec")]) == 2
    assert "does not join" in capsys.readouterr().err


def test_a_failed_export_leaves_no_output_behind(tmp_path, capsys):
    col = start(tmp_path / "rec", make_cfg())
    steps(col, 30)
    col.close()
    last = recording.list_chunks(str(tmp_path / "rec"))[-1]
    with h5py.File(last, "r+") as f:  # consistent checksums, but an episode that ends twice
        f["terminated"][:] = True
    out = tmp_path / "out"
    assert export.main([str(tmp_path / "rec"), "--d4rl", str(out / "x.hdf5"), "--minari", "a/b-v0",
                        "--minari-root", str(out / "m")]) == 2  # fmt: skip
    assert "has a damaged end" in capsys.readouterr().err
    assert [p.name for p in out.rglob("*") if p.is_file()] == []  # neither output, nor a temporary


def test_a_recording_of_another_env_is_refused(tmp_path, capsys):
    start(tmp_path / "rec", make_cfg()).close()
    with pytest.raises(recording.RecordingError, match="holds a recording of another run .env_id"):
        start(tmp_path / "rec", make_cfg(env_id="CartPole-v1"), resumed=True)
    other = start(tmp_path / "pole", make_cfg(env_id="CartPole-v1"))
    steps(other, 20, greedy=lambda o: np.zeros(len(o), np.int64))
    other.close()
    mine = start(tmp_path / "rec2", make_cfg())
    steps(mine, 10)
    mine.close()
    stray = tmp_path / "rec2" / "chunks" / "9999999999999-r00000-s0000000000000.h5"
    shutil.copy(recording.list_chunks(str(tmp_path / "pole"))[0], stray)
    assert export.main([str(tmp_path / "rec2")]) == 2
    assert "a chunk of another env (CartPole-v1" in capsys.readouterr().err
    assert export.main([str(tmp_path / "nothing")]) == 2
    assert "is not an mpirl recording" in capsys.readouterr().err


def test_a_fresh_run_does_not_mix_into_an_old_recording(tmp_path):
    col = start(tmp_path / "rec", make_cfg())
    steps(col, 10)
    col.close()
    with pytest.raises(recording.RecordingError, match="already holds a recording; pass --resume auto"):
        start(tmp_path / "rec", make_cfg())
    info = envs.inspect_env(make_cfg().env_id)
    seg = recording.new_segment(0, 1, make_cfg().to_dict(), "fresh")
    recording.prepare(str(tmp_path / "rec"), recorder.manifest(make_cfg(), info, {}), seg, False, True)  # --overwrite
    assert recording.list_chunks(str(tmp_path / "rec")) == []


def test_memory_is_bounded_by_the_chunk_limit(tmp_path):
    col = start(tmp_path / "rec", make_cfg(), limit=1 << 16)
    rec = col.recorder
    assert rec is not None and rec.capacity * (2 * 4 + 48) <= (1 << 16) + 4 * E * 56
    steps(col, 3000)
    assert rec.chunks_written >= 2 and rec.n <= rec.capacity


def test_the_episode_log_drops_rows_after_the_resumed_checkpoint(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    w.write_episodes([[(16, 0, 3.0, 3), (40, 1, 5.5, 5)], [(16, 1, 1.0, 1)]])
    w.close()
    with open(tmp_path / "episodes.csv", "a") as fh:
        fh.write("48,0,2.0")  # half a row, as a kill during a write leaves it
    MetricsWriter(str(tmp_path), tensorboard=False, resumed_at=32).close()
    lines = (tmp_path / "episodes.csv").read_text().splitlines()
    assert lines == ["global_env_steps,rank,env,return,length", "16,0,0,3.0,3", "16,1,1,1.0,1"]
