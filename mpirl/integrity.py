"""Checksums of a checkpoint file: a SHA-256 of every dataset and of every object's
attributes, kept in the root attribute ``checksums`` (JSON: key -> "<kind>:<hex>"), which is
written last, after everything it covers.

Keys: an HDF5 path (``/model/online/0.weight``) for a dataset's contents, ``attrs:<path>``
for the attributes of a group or dataset (``attrs:/`` is the root's, without ``checksums``).
Two kinds of dataset digest, named by their prefix:

- ``sha256``: the array as read (dtype, shape, C-order bytes). For what h5py writes itself
  (networks, optimizer state): small.
- ``sha256-chunks``: the stored chunks in row order (first row, filter mask, length, stored
  bytes). For the replay and env-state datasets, which each rank compresses itself and rank 0
  stores as they arrive (mpirl.shards): each rank hashes its own chunks while it encodes them,
  so the digest costs no extra pass over the data and no work on rank 0, and verifying reads
  the raw chunks without decompressing them.

SHA-256, not CRC-32: this machine hashes 1.25 GB/s with it (SHA extensions), fast next to
LZF compression, and no accidental corruption slips through a 256-bit digest. It guards
against damage (bit rot, truncation, a bad copy), not forgery: whoever can write the file can
rewrite the digests too, which is why nothing read from a checkpoint may construct objects or
choose code (see mpirl.envstate).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Iterable, Optional, Sequence

import h5py
import numpy as np

CHECKSUMS = "checksums"  # the root attribute holding every digest
CHUNKS = "sha256-chunks"
ARRAY = "sha256"


class IntegrityError(ValueError):
    """A checkpoint whose contents do not match its checksums; the message names the object."""


class ChunkHasher:
    """The ``sha256-chunks`` digest of one dataset, fed its stored chunks in row order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, first_row: int, mask: int, data: bytes) -> None:
        self._h.update(struct.pack("<qIq", first_row, mask, len(data)))
        self._h.update(data)

    def digest(self) -> str:
        return f"{CHUNKS}:{self._h.hexdigest()}"


def array_digest(a: np.ndarray) -> str:
    """The ``sha256`` digest of an array: its dtype, shape and C-order bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(json.dumps([a.dtype.str, list(a.shape)]).encode())
    h.update(a.tobytes())
    return f"{ARRAY}:{h.hexdigest()}"


def _canonical(value: Any) -> Any:
    """An attribute value as h5py returns it, in a JSON form that is stable across reads."""
    if isinstance(value, np.ndarray):
        return ["nd", value.dtype.str, list(value.shape), np.ascontiguousarray(value).tobytes().hex()]
    if isinstance(value, np.generic):
        return ["np", value.dtype.str, np.asarray(value).tobytes().hex()]
    if isinstance(value, bytes):
        return ["b", value.hex()]
    return value


def attrs_digest(obj: h5py.HLObject, skip: Iterable[str] = ()) -> str:
    """The digest of an object's attributes (names sorted), leaving out ``skip``."""
    items = [[k, _canonical(obj.attrs[k])] for k in sorted(obj.attrs) if k not in skip]
    return f"{ARRAY}:{hashlib.sha256(json.dumps(items).encode()).hexdigest()}"


def chunks_digest(ds: h5py.Dataset) -> str:
    """The ``sha256-chunks`` digest of a dataset as stored, read without decompressing."""
    hasher = ChunkHasher()
    if ds.chunks is not None and ds.size:
        dsid = ds.id
        infos = sorted((dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks())), key=lambda c: c.chunk_offset)
        for info in infos:
            mask, data = dsid.read_direct_chunk(info.chunk_offset)
            hasher.update(int(info.chunk_offset[0]), int(mask), bytes(data))
    return hasher.digest()


def _walk(f: h5py.File) -> tuple[list[str], list[str]]:
    """Every dataset's path, and every object's path (groups and datasets, the root first)."""
    datasets: list[str] = []
    objects: list[str] = ["/"]

    def visit(name: str, obj: Any) -> None:
        objects.append("/" + name)
        if isinstance(obj, h5py.Dataset):
            datasets.append("/" + name)

    f.visititems(visit)
    return datasets, objects


def seal(f: h5py.File, chunk_digests: dict[str, str]) -> int:
    """Rank 0, at the end of a write: record every digest in ``/checksums``. The datasets in
    ``chunk_digests`` (path -> digest, computed by the ranks that encoded them) are taken as
    given; every other dataset and all attributes are hashed here (small). Returns the
    number of digests."""
    datasets, objects = _walk(f)
    sums: dict[str, str] = {}
    for path in datasets:
        sums[path] = chunk_digests[path] if path in chunk_digests else array_digest(f[path][()])
    for path in objects:
        sums["attrs:" + path] = attrs_digest(f[path], skip=(CHECKSUMS,) if path == "/" else ())
    f.attrs[CHECKSUMS] = json.dumps(sums, sort_keys=True)
    return len(sums)


def _digest_of(f: h5py.File, path: str, kind: str) -> str:
    if path.startswith("attrs:"):
        obj_path = path[len("attrs:") :]
        return attrs_digest(f[obj_path], skip=(CHECKSUMS,) if obj_path == "/" else ())
    ds = f[path]
    return chunks_digest(ds) if kind == CHUNKS else array_digest(ds[()])


def verify(f: h5py.File, only: Optional[Sequence[str]] = None) -> tuple[int, int]:
    """Check every digest of ``/checksums`` (or those whose path starts with one of ``only``,
    with the root's attributes always) and that the file holds no dataset they do not list.
    Returns (objects checked, stored bytes read); IntegrityError naming the first mismatch."""
    raw = f.attrs.get(CHECKSUMS)
    if raw is None:
        raise IntegrityError("no checksums (written incompletely, or not by mpirl)")
    try:
        sums = json.loads(raw)
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise ValueError("not a JSON object of strings")
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"unreadable checksum table ({exc})") from None
    datasets, _ = _walk(f)
    unlisted = [p for p in datasets if p not in sums]
    if unlisted:
        raise IntegrityError(f"dataset {unlisted[0]} is not in the checksum table (added after writing?)")

    def wanted(key: str) -> bool:
        path = key[len("attrs:") :] if key.startswith("attrs:") else key
        return only is None or path == "/" or any(path.startswith(p) for p in only)

    checked = nbytes = 0
    for key in sorted(k for k in sums if wanted(k)):
        kind = sums[key].split(":", 1)[0]
        target = key[len("attrs:") :] if key.startswith("attrs:") else key
        if target not in f:
            raise IntegrityError(f"{target} is missing, though the checksum table lists it")
        if _digest_of(f, key, kind) != sums[key]:
            what = f"the attributes of {target}" if key.startswith("attrs:") else f"dataset {target}"
            raise IntegrityError(f"{what} fails its checksum (the file is corrupted)")
        checked += 1
        if not key.startswith("attrs:"):
            nbytes += int(f[target].id.get_storage_size())
    return checked, nbytes
