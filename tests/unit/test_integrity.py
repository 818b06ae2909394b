"""Checkpoint checksums (mpirl.integrity through mpirl.checkpoint), in one process: every
dataset and attribute is covered, any damage is named, a forged or malformed file is a
one-line CheckpointError, and ``--resume auto`` falls back to the newest intact checkpoint."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mpirl import checkpoint, envs, inspect, resume
from mpirl.config import Config
from mpirl.dist import DistContext
from mpirl.records import CheckpointHeader, Counters

CTX = DistContext(rank=0, size=1, local_rank=0, local_size=1, device=torch.device("cpu"))
CFG = Config(env_id="CartPole-v1", resume="auto")


def _save(run_dir: Path, steps: int) -> Path:
    """A checkpoint as the trainer writes it (world of one): a small Q-network, Adam with
    state, a replay shard of 3,000 rows (several HDF5 chunks per field) and an env state."""
    torch.manual_seed(steps)
    online, target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(online.parameters(), lr=1e-3)
    online(torch.ones(2, 4)).pow(2).sum().backward()
    opt.step()
    rng = np.random.default_rng(steps)
    n = 3000
    replay = {"obs": rng.normal(size=(n, 4)).astype(np.float32), "actions": rng.integers(0, 2, n),
              "rewards": np.ones(n, np.float32), "next_obs": rng.normal(size=(n, 4)).astype(np.float32),
              "steps": np.ones(n, np.uint8), "terminated": rng.random(n) < 0.05, "truncated": np.zeros(n, bool),
              "big": rng.integers(0, 255, size=(n, 512), dtype=np.uint8)}  # fmt: skip
    meta = {"rank": 0, "replay": {"capacity": n, "pos": 0, "size": n}, "episodes": 7}
    header = CheckpointHeader(steps, 10, "CartPole-v1", [4], 2, CFG.to_dict(), Counters(1, steps, steps))
    shard = checkpoint.RankShard(meta=meta, replay=replay, env_state=b"\x01env-state" * 300)
    path, err = checkpoint.save(str(run_dir), CTX, header, online, target, opt, shard, keep=5)
    assert path and not err, err
    return Path(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save(tmp_path_factory.mktemp("run"), 100)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.h5"
    shutil.copyfile(src, dst)
    return dst


def _flip(path: Path, offset: int, bit: int = 2) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _data_offset(path: Path, name: str) -> int:
    """The file offset of a dataset's first stored byte (contiguous, or its first chunk)."""
    with h5py.File(path, "r") as f:
        ds = f[name]
        return int(ds.id.get_chunk_info(0).byte_offset if ds.chunks else ds.id.get_offset())


def _content(path: Path) -> dict[str, object]:
    """Everything a reader of the file sees: every attribute and every dataset's values."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        out["attrs:/"] = {k: repr(f.attrs[k]) for k in f.attrs}

        def visit(name: str, obj: object) -> None:
            out["attrs:" + name] = {k: repr(v) for k, v in obj.attrs.items()}  # type: ignore[attr-defined]
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()].tobytes()

        f.visititems(visit)
    return out


def test_every_dataset_and_attribute_is_covered(saved: Path) -> None:
    checked, nbytes = checkpoint.verify(str(saved))
    with h5py.File(saved, "r") as f:
        sums = json.loads(f.attrs["checksums"])
        datasets: list[str] = []
        f.visititems(lambda n, o: datasets.append("/" + n) if isinstance(o, h5py.Dataset) else None)
    assert checked == len(sums) and nbytes > 0
    assert set(datasets) <= set(sums) and "attrs:/" in sums and "attrs:/ranks/0" in sums
    assert sums["/ranks/0/replay/big"].startswith("sha256-chunks:")  # hashed by the rank that encoded it
    assert sums["/model/online/0.weight"].startswith("sha256:")


@pytest.mark.parametrize(
    "name", ["/model/online/0.weight", "/model/target/bias", "/optimizer/state/0/exp_avg",
             "/ranks/0/replay/rewards", "/ranks/0/replay/big", "/ranks/0/env_state"],
)  # fmt: skip
def test_a_flipped_bit_in_any_dataset_is_named(saved: Path, tmp_path: Path, name: str) -> None:
    bad = _copy(saved, tmp_path)
    _flip(bad, _data_offset(bad, name) + 3)
    with pytest.raises(checkpoint.CheckpointError, match=f"dataset {name} fails its checksum"):
        checkpoint.verify(str(bad))


@pytest.mark.parametrize(("obj", "attr"), [("/", "config"), ("/", "global_env_steps"), ("/ranks/0", "meta"),
                                           ("/optimizer", "param_groups")])  # fmt: skip
def test_a_changed_attribute_is_named(saved: Path, tmp_path: Path, obj: str, attr: str) -> None:
    bad = _copy(saved, tmp_path)
    with h5py.File(bad, "r+") as f:
        value = f[obj].attrs[attr]
        f[obj].attrs[attr] = value + 1 if isinstance(value, (int, np.integer)) else str(value) + " "
    with pytest.raises(checkpoint.CheckpointError, match=f"the attributes of {obj} fail"):
        checkpoint.verify(str(bad))


def test_added_removed_or_unsealed_objects_are_refused(saved: Path, tmp_path: Path) -> None:
    bad = _copy(saved, tmp_path)
    with h5py.File(bad, "r+") as f:
        f["ranks/0/replay/extra"] = np.arange(3)
    with pytest.raises(checkpoint.CheckpointError, match="extra is not in the checksum table"):
        checkpoint.verify(str(bad))
    bad = _copy(saved, tmp_path)
    with h5py.File(bad, "r+") as f:
        del f["ranks/0/replay/truncated"]
    with pytest.raises(checkpoint.CheckpointError, match="truncated is missing"):
        checkpoint.verify(str(bad))
    bad = _copy(saved, tmp_path)
    with h5py.File(bad, "r+") as f:
        del f.attrs["checksums"]
    with pytest.raises(checkpoint.CheckpointError, match="no checksums"):
        checkpoint.verify(str(bad))


def test_random_bit_flips_are_detected_or_change_nothing(saved: Path, tmp_path: Path) -> None:
    """Any single flipped bit anywhere in the file: either verify refuses the file, or every
    attribute and dataset still reads exactly as written (the bit was in unused space)."""
    original, reference = saved.read_bytes(), _content(saved)
    rng = random.Random(1234)
    bad, outcomes = tmp_path / "flipped.h5", {"detected": 0, "harmless": 0}
    for _ in range(150):
        data = bytearray(original)
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        bad.write_bytes(bytes(data))
        try:
            checkpoint.verify(str(bad))
        except checkpoint.CheckpointError:
            outcomes["detected"] += 1
            continue
        assert _content(bad) == reference, f"a flip at byte {at} changed the contents undetected"
        outcomes["harmless"] += 1
    assert outcomes["detected"] > 100, outcomes  # most of the file is data the checksums cover


def test_forged_or_malformed_files_are_one_line_errors(saved: Path, tmp_path: Path) -> None:
    """A file with the right format attribute but a broken header: every reader raises
    CheckpointError (the CLI's one-line exit 2), never a KeyError or JSONDecodeError."""
    cases = {
        "bad config JSON": lambda f: f.attrs.__setitem__("config", "{not json"),
        "config not an object": lambda f: f.attrs.__setitem__("config", "[1, 2]"),
        "no counters": lambda f: f.attrs.__delitem__("counters"),
        "obs_shape a string": lambda f: f.attrs.__setitem__("obs_shape", "four"),
        "weights as strings": lambda f: (f["model/online"].__delitem__("0.bias"),
                                         f["model/online"].create_dataset("0.bias", data=np.array([b"x"] * 8))),
    }  # fmt: skip
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    for what, forge in cases.items():
        bad = _copy(saved, tmp_path)
        with h5py.File(bad, "r+") as f:
            forge(f)
            del f.attrs["checksums"]  # a forger would drop or recompute them; readers must not trip either way
        header_readers = [checkpoint.read_header, checkpoint.summary]
        readers = [checkpoint.load_module] if what == "weights as strings" else header_readers
        for read in readers:
            args = (str(bad), "online", net) if read is checkpoint.load_module else (str(bad),)
            with pytest.raises(checkpoint.CheckpointError) as exc:
                read(*args)  # type: ignore[operator]
            assert "\n" not in str(exc.value) and str(bad) in str(exc.value), what


def test_inspect_verify_exit_codes(saved: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect.main([str(saved), "--verify"]) == 0
    assert "checksums match" in capsys.readouterr().out
    bad = _copy(saved, tmp_path)
    _flip(bad, _data_offset(bad, "/ranks/0/replay/obs") + 10)
    assert inspect.main([str(bad), "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset /ranks/0/replay/obs fails its checksum" in err[0]


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    older, newer = _save(run, 100), _save(run, 200)
    info = envs.inspect_env("CartPole-v1")
    found = resume.find(CFG, str(run), info, 1)
    assert found is not None and found.path == str(newer) and "checksums verified" in found.note
    _flip(newer, _data_offset(newer, "/ranks/0/replay/actions") + 5)
    found = resume.find(CFG, str(run), info, 1)
    assert found is not None and found.path == str(older)
    assert "skipped 1 damaged newer checkpoint" in found.note and "replay/actions" in found.note
    _flip(older, _data_offset(older, "/model/target/weight"))
    with pytest.raises(checkpoint.CheckpointError, match="every checkpoint in .* is damaged"):
        resume.find(CFG, str(run), info, 1)
    explicit = Config(env_id="CartPole-v1", resume=str(newer))
    with pytest.raises(checkpoint.CheckpointError, match="replay/actions fails its checksum"):
        resume.find(explicit, str(run), info, 1)
