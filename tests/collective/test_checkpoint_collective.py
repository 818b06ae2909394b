"""checkpoint.save and checkpoint.restore_shards inside the ranks: every rank's shard goes to
rank 0's file, and comes back to the rank it came from, rows and meta exactly."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from mpirl import checkpoint, dist
from mpirl.records import CheckpointHeader, Counters


def _rows(rank: int) -> int:
    return 5 + 3 * rank  # shards of different lengths


def _shard(rank: int) -> checkpoint.RankShard:
    """A replay shard with the trainer's fields and dtypes; every value tells its rank and row."""
    n = _rows(rank)
    base = np.arange(n) + 1000 * rank
    replay = {
        "obs": np.stack([base, -base, base * 0.5]).T.astype(np.float32),
        "actions": (base % 3).astype(np.int64),
        "rewards": (base * 0.25).astype(np.float32),
        "next_obs": np.stack([base + 1, -base - 1, base * 0.5 + 1]).T.astype(np.float32),
        "steps": np.full(n, rank + 1, dtype=np.uint8),
        "terminated": base % 2 == 0,
        "truncated": base % 5 == 0,
    }
    meta = {"rank": rank, "replay": {"capacity": 64, "pos": n, "size": n, "total_added": n}, "episodes": 10 * rank}
    return checkpoint.RankShard(meta=meta, replay=replay, env_state=f"env state of rank {rank}".encode())


def _header(global_env_steps: int = 1234) -> CheckpointHeader:
    return CheckpointHeader(
        global_env_steps=global_env_steps,
        updates=56,
        env_id="CartPole-v1",
        obs_shape=[3],
        n_actions=3,
        config={"seed": 3, "note": "collective test"},
        counters=Counters(steps_per_iter=16, global_env_steps=global_env_steps, iteration=7),
    )


def _nets_and_adam() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    online, target = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    target.load_state_dict(online.state_dict())
    opt = torch.optim.Adam(online.parameters(), lr=1e-3)
    online(torch.ones(2, 3)).pow(2).sum().backward()
    opt.step()  # Adam has state (step, exp_avg, exp_avg_sq) to save
    return online, target, opt


def _save(ctx: Any, run_dir: str) -> str:
    online, target, opt = _nets_and_adam()
    path, err = checkpoint.save(run_dir, ctx, _header(), online, target, opt, _shard(ctx.rank), keep=2)
    assert err == "" and path is not None, err
    return path


def test_save_then_restore_shards_gives_each_rank_its_own_rows_and_meta(ctx, shared_tmp_path):
    path = _save(ctx, shared_tmp_path)
    assert dist.broadcast_object(path, name="tests.ckpt.path") == path  # the same path on every rank
    assert os.path.isfile(path)

    old_rows = [_rows(r) for r in range(ctx.size)]
    got: dict[str, Any] = {"begin": [], "rows": {}}

    def begin(total: int, metas: list[dict[str, Any]]) -> None:
        got["begin"].append((total, metas))

    def rows(name: str, first: int, chunk: np.ndarray) -> None:
        got["rows"].setdefault(name, []).append((first, np.array(chunk)))

    checkpoint.restore_shards(path, ctx, old_rows, begin, rows)  # collective

    mine = _shard(ctx.rank)
    assert got["begin"] == [(_rows(ctx.rank), [{**mine.meta, "first_piece": True}])]  # the whole shard: its first piece
    assert set(got["rows"]) == {*mine.replay, "env_state"}  # same world size: env state too
    for name, expected in mine.replay.items():
        pieces = sorted(got["rows"][name], key=lambda p: p[0])
        assert pieces[0][0] == 0
        whole = np.concatenate([chunk for _, chunk in pieces])
        assert whole.dtype == expected.dtype, name
        np.testing.assert_array_equal(whole, expected, err_msg=name)
    env = b"".join(chunk.tobytes() for _, chunk in sorted(got["rows"]["env_state"], key=lambda p: p[0]))
    assert env == mine.env_state


def test_saved_file_holds_header_models_and_optimizer(ctx, shared_tmp_path):
    path = _save(ctx, shared_tmp_path)
    if ctx.rank != 0:
        return  # rank 0 alone reads files
    stored = checkpoint.read_header(path)
    assert stored.world_size == ctx.size
    assert stored.shard_rows == [_rows(r) for r in range(ctx.size)]  # counted from the "actions" rows
    assert stored.optimizer_has_state
    header = stored.header
    assert (header.global_env_steps, header.updates, header.env_id) == (1234, 56, "CartPole-v1")
    assert (header.obs_shape, header.n_actions, header.config) == ([3], 3, {"seed": 3, "note": "collective test"})
    assert (header.counters.iteration, header.counters.steps_per_iter) == (7, 16)
    online, target, opt = _nets_and_adam()
    fresh_online, fresh_target = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    checkpoint.load_module(path, "online", fresh_online)
    checkpoint.load_module(path, "target", fresh_target)
    for a, b in ((online, fresh_online), (target, fresh_target)):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key
    fresh_opt = torch.optim.Adam(fresh_online.parameters(), lr=1e-3)
    checkpoint.load_optimizer(path, fresh_opt)
    want, have = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert want.keys() == have.keys()
    for idx in want:
        for key, value in want[idx].items():
            assert torch.equal(torch.as_tensor(have[idx][key]), torch.as_tensor(value)), (idx, key)


def test_failed_save_is_the_same_failure_on_every_rank(ctx, shared_tmp_path):
    blocker = os.path.join(shared_tmp_path, "not-a-folder")
    if ctx.rank == 0:
        with open(blocker, "w") as fh:
            fh.write("a file where the run directory should be\n")
    online, target, opt = _nets_and_adam()
    path, err = checkpoint.save(blocker, ctx, _header(), online, target, opt, _shard(ctx.rank), keep=2)
    assert path is None
    assert "checkpoint" in err and blocker in err
    assert dist.broadcast_object(err, name="tests.ckpt.err") == err  # identical on every rank


def test_keep_prunes_older_checkpoints(ctx, shared_tmp_path):
    online, target, opt = _nets_and_adam()
    paths = []
    for steps in (100, 200, 300):
        path, err = checkpoint.save(shared_tmp_path, ctx, _header(steps), online, target, opt, _shard(ctx.rank), keep=1)
        assert err == "", err
        paths.append(path)
    if ctx.rank == 0:
        folder = checkpoint.checkpoint_dir(shared_tmp_path)
        assert sorted(n for n in os.listdir(folder) if n.endswith(".h5")) == [os.path.basename(paths[-1])]
        assert checkpoint.latest(shared_tmp_path) == paths[-1]
