"""Checkpoints under mpirun: exact resume, resume at another world size, bad files, preemption."""

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from mpi_launch import kill_job, latest_step, mpirun, spawn_mpirl
from mpi_launch import latest_checkpoint as _latest

pytestmark = pytest.mark.mpi
BASE = ["--learning-starts-per-rank", "200", "--hidden-sizes", "32,32", "--eval-interval", "0",
        "--final-eval-episodes", "0", "--log-interval", "800", "--no-tensorboard",
        "--target-update-interval", "20", "--checkpoint-interval", "0"]  # fmt: skip
BACKENDS = ["horovod", "mpi", "torch"]  # every proof here runs on each (torch: Gloo on the CPU)


def _train(run_dir, steps, *extra, np=2, timeout=240):
    res = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", str(steps), "--run-dir", str(run_dir), *extra],
                 np=np, timeout=timeout)  # fmt: skip
    assert res.returncode == 0, res.output[-4000:]
    return res


def _contents(path):
    """Every dataset of a checkpoint (the env states too: data, bitwise alike), as bytes, keyed by path."""
    out = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()].tobytes()

        f.visititems(visit)
        counters = json.loads(f.attrs["counters"])
    return out, counters


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [[], ["--prioritized", "--per-beta-steps", "4000", "--n-step", "2"]],
                         ids=["uniform", "per"])  # fmt: skip
def test_resume_is_bitwise_identical_to_uninterrupted(tmp_path, extra, backend):
    extra = [*extra, "--backend", backend]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(straight, 3200, *extra)
    _train(split, 1600, *extra)
    res = _train(split, 3200, "--resume", "auto", *extra)
    assert "exact resume" in res.stdout
    a, ca = _contents(_latest(straight))
    b, cb = _contents(_latest(split))
    assert ca == cb and ca["global_env_steps"] == 3200
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optimizer/state") for k in a) and any("replay/obs" in k for k in a)
    assert "ranks/1/env_state" in a
    for key in a:
        assert a[key] == b[key], f"{key} differs after resume"


@pytest.mark.parametrize("first, then", [("horovod", "mpi"), ("mpi", "torch")])
def test_a_checkpoint_resumes_exactly_on_another_backend(tmp_path, first, then):
    """The backends average to the same bits and checkpoint the same state, so a run may move
    between them (a CPU job resumed where Horovod is not installed, say) and still be exact."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(straight, 3200, "--backend", first)
    _train(split, 1600, "--backend", first)
    res = _train(split, 3200, "--resume", "auto", "--backend", then)
    assert "exact resume" in res.stdout
    a, ca = _contents(_latest(straight))
    b, cb = _contents(_latest(split))
    assert ca == cb and sorted(a) == sorted(b)
    for key in a:
        assert a[key] == b[key], f"{key} differs after resuming on {then}"


class _WritesMarker:
    """Unpickling this creates a file: what a crafted schema-1 env state could do on every rank."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


def _forge_env_state(path, blobs):
    """Replace ranks' env_state datasets and recompute every checksum, as a forger would (the
    checksums guard against damage, not forgery: what the loader does must be safe anyway)."""
    from mpirl import integrity

    with h5py.File(path, "r+") as f:
        for r, blob in blobs.items():
            del f["ranks"][r]["env_state"]
            f["ranks"][r]["env_state"] = np.frombuffer(blob, np.uint8)
        integrity.seal(f, {})


def test_a_pickled_env_state_is_never_loaded(tmp_path):
    """Issue 18: a checkpoint's env state is data; an old (or crafted) pickle is skipped, not run."""
    import pickle

    run, marker = tmp_path / "run", tmp_path / "marker"
    _train(run, 800)
    crafted = pickle.dumps({"vec": _WritesMarker(marker)})
    _forge_env_state(_latest(run), {"0": crafted, "1": crafted})
    res = _train(run, 1600, "--resume", "auto")
    assert not marker.exists()
    assert res.stdout.count("env state in the old pickle form is not loaded: env shards restart") == 1, res.stdout


def test_a_malformed_env_state_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """A forged env state that passes the checksums but not envstate's checks, on rank 1 only:
    every rank stops with exit 2 naming rank 1's env state (no traceback, no rank left waiting)."""
    from mpirl import envstate

    run = tmp_path / "run"
    _train(run, 800)
    good = envstate.pack({"x": np.arange(4)})
    _forge_env_state(_latest(run), {"1": good[:-9] + b"garbage!!"})
    res = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", "1600", "--run-dir", str(run), "--resume", "auto"],
                 timeout=120)  # fmt: skip
    assert res.returncode == 2, res.output[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
    assert len(lines) == 2 and all("rank 1's env state" in ln for ln in lines), res.stderr[-2000:]


def test_checkpoint_layout_and_inspect(tmp_path):
    run = tmp_path / "run"
    _train(run, 1600, "--checkpoint-interval", "800", "--keep-checkpoints", "2")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-000000000800.h5", "step-000000001600.h5"]
    with h5py.File(_latest(run), "r") as f:
        assert f.attrs["schema_version"] == 2 and f.attrs["world_size"] == 2
        assert "/ranks/1/replay/obs" in json.loads(f.attrs["checksums"])
        assert set(f["ranks"]) == {"0", "1"}
        for r in ("0", "1"):
            rep = f["ranks"][r]["replay"]
            assert rep["obs"].dtype == np.float32 and rep["obs"].compression == "lzf"
            assert rep["actions"].shape[0] == json.loads(f["ranks"][r].attrs["meta"])["replay"]["size"] > 0
        assert json.loads(f.attrs["versions"])["horovod"]
    out = subprocess.run([sys.executable, "-m", "mpirl.inspect", str(_latest(run)), "--verify"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "global env steps: 1,600" in out.stdout and "rank 1:" in out.stdout and "checksums match" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mpirl.evaluate", str(run), "--episodes", "3", "--json"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    played = json.loads(out.stdout)
    assert played["episodes"] == 3 and played["global_env_steps"] == 1600 and played["mean"] > 0


@pytest.mark.parametrize("new_np", [1, 3])
def test_resume_at_another_world_size_redistributes_replay(tmp_path, new_np):
    run = tmp_path / "run"
    _train(run, 1600)
    with h5py.File(_latest(run), "r") as f:
        saved = sum(f["ranks"][r]["replay"]["actions"].shape[0] for r in f["ranks"])
        episodes = sum(json.loads(f["ranks"][r].attrs["meta"])["episodes"] for r in f["ranks"])
    res = _train(run, 1600 + 12 * 50, "--resume", "auto", np=new_np)
    # the run's episode count carries over: each old shard's episodes counted once, none lost
    assert json.loads((run / "summary.json").read_text())["episodes"] >= episodes > 0
    assert f"world size changed 2 -> {new_np}" in res.stdout
    assert f"({saved:,} transitions)" in res.stdout
    with h5py.File(_latest(run), "r") as f:
        assert f.attrs["world_size"] == new_np and f.attrs["global_env_steps"] > 1600
        rows = [f["ranks"][r]["replay"]["actions"].shape[0] for r in f["ranks"]]
    assert len(rows) == new_np and sum(rows) >= saved  # nothing lost, new experience added


def test_bad_checkpoints_give_one_line_errors_on_every_rank(tmp_path):
    run = tmp_path / "run"
    _train(run, 800)
    good = _latest(run)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:2000])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(good.read_bytes())
    _flip_in(damaged, "ranks/1/replay/rewards")
    cases = [
        (["--resume", str(tmp_path / "missing.h5")], "checkpoint not found"),
        (["--resume", str(truncated)], "not a readable HDF5 file"),
        (["--resume", str(foreign)], "not an mpirl checkpoint"),
        (["--resume", str(damaged)], "dataset /ranks/1/replay/rewards fails its checksum"),
        (["--resume", str(good), "--env", "Acrobot-v1"], "does not fit this run: env: checkpoint CartPole-v1"),
        (["--resume", str(good), "--hidden-sizes", "16"], "network mismatch"),
    ]
    for args, message in cases:
        res = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", "1600", "--run-dir", str(tmp_path / "new"),
                      "--overwrite", *args], timeout=120)  # fmt: skip
        assert res.returncode == 2, (args, res.output[-3000:])
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
        assert len(lines) == 2 and all(message in ln for ln in lines), (args, res.stderr[-2000:])


def _flip_in(path, dataset):
    """Flip one bit inside a dataset's first stored chunk, as bit rot would."""
    with h5py.File(path, "r") as f:
        at = f[dataset].id.get_chunk_info(0).byte_offset + 7
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _train(run, 1600, "--checkpoint-interval", "800", "--keep-checkpoints", "2")
    _flip_in(_latest(run), "ranks/1/replay/obs")
    res = _train(run, 2400, "--resume", "auto", "--checkpoint-interval", "800", "--keep-checkpoints", "2")
    assert "skipped 1 damaged newer checkpoint(s)" in res.stdout and "/ranks/1/replay/obs fails" in res.stdout
    assert "step-000000000800.h5 at 800 env steps" in res.stdout and "exact resume" in res.stdout
    assert json.loads((run / "summary.json").read_text())["global_env_steps"] == 2400


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigusr1_checkpoints_and_exits_zero_then_resumes(tmp_path, backend):
    run = tmp_path / "run"
    proc = spawn_mpirl([*BASE, "--total-env-steps", "400000", "--run-dir", str(run), "--backend", backend])
    try:
        deadline = time.monotonic() + 120
        while not (run / "progress.csv").exists() or len((run / "progress.csv").read_text().splitlines()) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR1)  # mpirun forwards SIGUSR1 to every rank
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # a second signal during the stop changes nothing
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "stop signal received" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preempted"] and summary["global_env_steps"] < 400000
    stopped_at = summary["global_env_steps"]
    with h5py.File(_latest(run), "r") as f:
        assert int(f.attrs["global_env_steps"]) == stopped_at
    res = _train(run, stopped_at + 800, "--resume", "auto", "--backend", backend)
    assert f"resumed from {_latest(run).parent}" in res.stdout or "resumed from" in res.stdout
    assert json.loads((run / "summary.json").read_text())["global_env_steps"] == stopped_at + 800


def test_sigterm_to_mpirun_checkpoints_within_its_grace(tmp_path):
    """mpirun forwards SIGTERM and sends SIGKILL about 2 s later: a small stop checkpoint fits.
    Every rank finishes (summary written, the checkpoint at the agreed step); mpirun itself
    exits 1 after a SIGTERM whatever the ranks do (Open MPI 4.1, measured), as documented."""
    run = tmp_path / "run"
    proc = spawn_mpirl([*BASE, "--total-env-steps", "400000", "--run-dir", str(run)])
    try:
        deadline = time.monotonic() + 120
        while not (run / "progress.csv").exists() or len((run / "progress.csv").read_text().splitlines()) < 3:
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode in (0, 1), err[-3000:]  # 1: mpirun's own status after it was sent SIGTERM
    assert "stop signal received" in out and "mpirl: done" in out, out[-2000:]
    assert "may take about" not in out  # a small checkpoint fits the grace: no warning
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preempted"]
    with h5py.File(_latest(run), "r") as f:
        assert int(f.attrs["global_env_steps"]) == summary["global_env_steps"]


def test_kill_9_during_checkpointing_leaves_latest_loadable_and_resumable(tmp_path):
    """SIGKILL the whole job at arbitrary moments while it checkpoints every iteration-ish
    (a 50k-transition replay per rank, so writes take a while); whatever 'latest' names must
    load and resume. A leftover .tmp from the killed write is ignored."""
    run = tmp_path / "run"
    big = ["--checkpoint-interval", "400", "--buffer-size-per-rank", "50000", "--keep-checkpoints", "2"]
    for attempt in range(3):
        resume = ["--resume", "auto"] if attempt else []
        proc = spawn_mpirl([*BASE, *big, "--total-env-steps", "400000", "--run-dir", str(run), *resume])
        deadline = time.monotonic() + 120
        folder = run / "checkpoints"
        seen = set()
        while len(seen) < 3 and time.monotonic() < deadline and proc.poll() is None:
            if folder.exists():
                seen |= {p.name for p in folder.glob("step-*.h5")}
            time.sleep(0.05)
        time.sleep(0.013 * (attempt + 1))  # land somewhere inside the next write, or near it
        kill_job(proc)
        proc.communicate()
        assert len(seen) >= 3, "checkpoints were not being written"
        latest = _latest(run)
        out = subprocess.run([sys.executable, "-m", "mpirl.inspect", str(latest)], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
    steps = latest_step(run)
    res = _train(run, steps + 800, "--resume", "auto")
    assert "exact resume" in res.stdout
    assert json.loads((run / "summary.json").read_text())["global_env_steps"] == steps + 800


def test_resume_that_changes_the_replays_meaning_is_refused_and_touches_nothing(tmp_path):
    """--n-step and --gamma change what the stored n-step returns mean: refused on every rank with
    exit 2 naming both, before anything in the run directory changes (config.json too)."""
    run = tmp_path / "run"
    _train(run, 1600)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = mpirun(["-m", "mpirl.train", *BASE, "--total-env-steps", "3200", "--run-dir", str(run), "--resume", "auto",
                  "--n-step", "2", "--gamma", "0.9"], timeout=120)  # fmt: skip
    assert res.returncode == 2, res.output[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("mpirl: error:")]
    assert len(lines) == 2 and all("--n-step: checkpoint 3, this run 2" in ln and "--gamma" in ln for ln in lines)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
