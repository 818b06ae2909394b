"""The HDF5 layout of a checkpoint (see mpirl.checkpoint's docstring and the README's
"Checkpoint layout"): the header attributes, the networks, the optimizer and the empty shard
datasets as rank 0 creates them, and the header as read back. Plain data only: attributes
are JSON, numbers and strings; datasets are arrays.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

import h5py
import numpy as np
import torch

from mpirl import shards
from mpirl.records import CheckpointHeader, Counters, StoredCheckpoint

FORMAT = "mpirl-checkpoint"
SCHEMA_VERSION = 2  # 2: checksums (mpirl.integrity) and a data-only env state (mpirl.envstate)


def write_module(group: h5py.Group, module: torch.nn.Module) -> None:
    for name, t in module.state_dict().items():
        group.create_dataset(name, data=t.detach().cpu().numpy())


def write_optimizer(group: h5py.Group, optimizer: Any) -> None:
    sd = optimizer.state_dict()
    group.attrs["param_groups"] = json.dumps(sd["param_groups"])
    state = group.create_group("state")
    for idx, entry in sd["state"].items():
        g = state.create_group(str(idx))
        for key, value in entry.items():
            if torch.is_tensor(value):
                g.create_dataset(key, data=value.detach().cpu().numpy())
            else:
                g.attrs[key] = value


def dataset_for(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: np.dtype) -> h5py.Dataset:
    if shape[0] == 0:
        return group.create_dataset(name, shape=shape, dtype=dtype)
    chunks = (shards.chunk_rows(shape, dtype), *shape[1:])
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression="lzf")


def create(
    f: h5py.File,
    world_size: int,
    header: CheckpointHeader,
    nets: dict[str, torch.nn.Module],
    optimizer: Any,
    metas: list[tuple[dict[str, Any], list[tuple[str, tuple[int, ...], str]]]],
) -> dict[tuple[int, str], h5py.Dataset]:
    """Write the root attributes, networks and optimizer; create every rank's (empty) shard
    datasets, returned by (rank, field)."""
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["world_size"] = world_size
    f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    f.attrs["versions"] = json.dumps(header.versions)
    f.attrs["global_env_steps"] = header.global_env_steps
    f.attrs["updates"] = header.updates
    f.attrs["env_id"] = header.env_id
    f.attrs["obs_shape"] = np.asarray(header.obs_shape, dtype=np.int64)
    f.attrs["n_actions"] = header.n_actions
    f.attrs["config"] = json.dumps(header.config)
    f.attrs["counters"] = json.dumps(header.counters.to_json())
    for name, net in nets.items():
        write_module(f.create_group(f"model/{name}"), net)
    write_optimizer(f.create_group("optimizer"), optimizer)
    datasets: dict[tuple[int, str], h5py.Dataset] = {}
    for r, (meta, rank_specs) in enumerate(metas):
        g = f.create_group(f"ranks/{r}")
        g.attrs["meta"] = json.dumps(meta)
        rg = g.create_group("replay")
        for key, shape, dtype in rank_specs:
            datasets[(r, key)] = dataset_for(g if key == "env_state" else rg, key, shape, np.dtype(dtype))
    return datasets


def attr(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v


def json_object(raw: Any, what: str) -> dict[str, Any]:
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise TypeError(f"{what} is not a JSON object")
    return value


def read_header(path: str, f: h5py.File) -> StoredCheckpoint:
    header = CheckpointHeader(
        global_env_steps=int(f.attrs["global_env_steps"]),
        updates=int(f.attrs["updates"]),
        env_id=str(attr(f.attrs["env_id"])),
        obs_shape=[int(x) for x in f.attrs["obs_shape"]],
        n_actions=int(f.attrs["n_actions"]),
        config=json_object(f.attrs["config"], "config"),
        counters=Counters.from_json(json_object(f.attrs["counters"], "counters")),
        versions=json_object(f.attrs["versions"], "versions"),
    )
    return StoredCheckpoint(
        path=path,
        header=header,
        world_size=int(f.attrs["world_size"]),
        optimizer_has_state=len(f["optimizer/state"]) > 0,
        shard_rows=[int(f["ranks"][r]["replay"]["actions"].shape[0]) for r in sorted(f["ranks"], key=int)],
        created=str(attr(f.attrs.get("created", ""))),
    )
