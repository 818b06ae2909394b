"""Env shard state as data: a declared encoding that holds no code (no pickle; issue 18).

A checkpoint's ``/ranks/<r>/env_state`` is ``pack(tree)`` of the collector's env shard state.
Loading it must never run code named by the file, so this format can only describe data:

    MAGIC (15 bytes) | version (u8) | header bytes (u64 LE) | payload bytes (u64 LE)
    | header: UTF-8 JSON | payload: raw array bytes

The JSON tree holds None, bool, int, float (NaN and infinities allowed), str, list and dicts
with str keys natively. Everything else is an object ``{"__mpirl__": tag, ...}`` with a fixed
set of fields per tag:

    tuple      items                    dict      items: [[key, value], ...] (non-str keys,
    bytes      offset, size                       or a key named "__mpirl__")
    ndarray    dtype, shape, offset     npscalar  dtype, offset (a numpy scalar)
    deque      maxlen, items            generator bit_generator (PCG64, PCG64DXSM, MT19937,
    ale_state  offset, size (ale_py.ALEState.serialize)     Philox, SFC64), state (its tree)

``offset``/``size`` count bytes from the payload's start. Only bool, int, uint, float and
complex dtypes load (never object, void, structured or datetime). ``unpack`` checks all of it
and raises ``EnvStateError`` (one line) on anything malformed; the only names in the data it
acts on are the whitelisted bit generators, and ale_py (imported only to rebuild an emulator
state) is the only other type it constructs. ``pack`` raises ``UnsupportedValue``, naming the
path of the value, for any type outside this list (``check`` does the same without packing).
Shared references are not kept: an object met twice is stored, and comes back, as two copies
(mpirl's envs never change an array in place, so the copies behave alike).
"""

from __future__ import annotations

import json
import re
import struct
from collections import deque
from typing import Any, Callable, Optional

import numpy as np

MAGIC = b"MPIRL-ENVSTATE\x00"
VERSION = 1
TAG = "__mpirl__"
_PREFIX = struct.Struct(f"<{len(MAGIC)}sBQQ")  # magic, version, header bytes, payload bytes
# The whole whitelist of names in the data that select a type: nothing else is looked up.
BIT_GENERATORS: dict[str, Callable[[int], np.random.BitGenerator]] = {
    "PCG64": np.random.PCG64,
    "PCG64DXSM": np.random.PCG64DXSM,
    "MT19937": np.random.MT19937,
    "Philox": np.random.Philox,
    "SFC64": np.random.SFC64,
}
_DTYPE = re.compile(r"[<>|][biufc][0-9]{1,2}")  # byte order, kind (bool/int/uint/float/complex), size
_MAX_NDIM = 32
_MAX_INT_BITS = 14_000  # Python parses ints of at most 4300 decimal digits (about 14,284 bits)
_FIELDS = {
    "tuple": {"items"},
    "dict": {"items"},
    "bytes": {"offset", "size"},
    "ndarray": {"dtype", "shape", "offset"},
    "npscalar": {"dtype", "offset"},
    "deque": {"maxlen", "items"},
    "generator": {"bit_generator", "state"},
    "ale_state": {"offset", "size"},
}


class EnvStateError(ValueError):
    """An env-state blob that is malformed or does not fit; the message is one line."""


class UnsupportedValue(TypeError):
    """A value with no declared data encoding (an env holding a handle, a custom object)."""


def has_magic(data: bytes) -> bool:
    """Does ``data`` start like a blob of this format (any version)?"""
    return data[: len(MAGIC)] == MAGIC


def pack(value: Any) -> bytes:
    """``value`` as bytes of this format; UnsupportedValue naming the first value it cannot hold."""
    enc = _Encoder(keep=True)
    header = json.dumps(_walk(enc, value), separators=(",", ":"), allow_nan=True).encode()
    payload = b"".join(enc.chunks)
    return _PREFIX.pack(MAGIC, VERSION, len(header), len(payload)) + header + payload


def check(value: Any) -> None:
    """Raise UnsupportedValue (naming its path) if ``pack(value)`` would; copies no array."""
    _walk(_Encoder(keep=False), value)


def _walk(enc: _Encoder, value: Any) -> Any:
    try:
        return enc.encode(value, "state")
    except RecursionError:  # a container that holds itself, or nesting no file should hold
        raise UnsupportedValue("state: nested too deeply (a container that holds itself?)") from None


def unpack(data: bytes) -> Any:
    """The value ``pack`` was given; EnvStateError (one line) for any malformed input."""
    data = bytes(data)
    if not has_magic(data):
        raise EnvStateError("env state: not an mpirl env-state blob (bad magic)")
    if len(data) < _PREFIX.size:
        raise EnvStateError(f"env state: truncated ({len(data)} bytes, the prefix alone is {_PREFIX.size})")
    _, version, n_header, n_payload = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise EnvStateError(f"env state: format version {version}; this mpirl reads {VERSION}")
    if _PREFIX.size + n_header + n_payload != len(data):
        declared = _PREFIX.size + n_header + n_payload
        raise EnvStateError(f"env state: {len(data)} bytes, but its prefix declares {declared} (truncated or padded)")
    try:
        tree = json.loads(data[_PREFIX.size : _PREFIX.size + n_header].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, or an int of > 4300 digits
        raise EnvStateError(f"env state: header is not JSON ({str(exc)[:120]})") from None
    except RecursionError:
        raise EnvStateError("env state: header nested too deeply") from None
    try:
        return _Decoder(memoryview(data)[_PREFIX.size + n_header :]).decode(tree)
    except RecursionError:
        raise EnvStateError("env state: header nested too deeply") from None


class _Encoder:
    """Python value -> JSON tree; array bytes appended to ``chunks`` (only when ``keep``)."""

    def __init__(self, keep: bool) -> None:
        self.keep, self.size = keep, 0
        self.chunks: list[bytes] = []

    def _put(self, raw: Callable[[], bytes], size: int) -> int:
        """Reserve ``size`` payload bytes; their offset. ``raw`` is called only when packing."""
        offset = self.size
        self.size += size
        if self.keep:
            self.chunks.append(raw())
        return offset

    def encode(self, v: Any, path: str) -> Any:
        t = type(v)
        if t is int and v.bit_length() > _MAX_INT_BITS:
            raise UnsupportedValue(f"{path}: an int of {v.bit_length()} bits (JSON ints stop at 4300 digits)")
        if v is None or t in (bool, int, float, str):
            return v  # exact types only: a subclass (an IntEnum, ...) has behaviour, not just data
        if t is list:
            return [self.encode(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if t is dict:
            if all(type(k) is str for k in v) and TAG not in v:
                return {k: self.encode(x, f"{path}[{k!r}]") for k, x in v.items()}
            items = [[self.encode(k, f"{path}.key"), self.encode(x, f"{path}[{k!r}]")] for k, x in v.items()]
            return {TAG: "dict", "items": items}
        if t is tuple:
            return {TAG: "tuple", "items": [self.encode(x, f"{path}[{i}]") for i, x in enumerate(v)]}
        if t is deque:
            items = [self.encode(x, f"{path}[{i}]") for i, x in enumerate(v)]
            return {TAG: "deque", "maxlen": v.maxlen, "items": items}
        if t is bytes:
            return {TAG: "bytes", "offset": self._put(lambda: v, len(v)), "size": len(v)}
        if t is np.ndarray or isinstance(v, np.generic):
            return self._array(v, path)
        if t is np.random.Generator:
            bg = v.bit_generator
            name = type(bg).__name__
            if BIT_GENERATORS.get(name) is not type(bg):
                raise UnsupportedValue(f"{path}: bit generator {name} is not one of {sorted(BIT_GENERATORS)}")
            return {TAG: "generator", "bit_generator": name, "state": self.encode(bg.state, f"{path}.state")}
        if t.__name__ == "ALEState" and t.__module__.startswith("ale_py"):
            raw = v.serialize()
            return {TAG: "ale_state", "offset": self._put(lambda: raw, len(raw)), "size": len(raw)}
        raise UnsupportedValue(f"{path}: {t.__module__}.{t.__qualname__} has no data encoding")

    def _array(self, v: np.ndarray | np.generic, path: str) -> dict[str, Any]:
        dt = v.dtype
        if not _DTYPE.fullmatch(dt.str) or dt.fields is not None or dt.subdtype is not None:
            raise UnsupportedValue(f"{path}: numpy dtype {dt} has no data encoding")
        a = np.asarray(v)  # not ascontiguousarray: that makes a 0-d array 1-d
        offset = self._put(lambda: a.tobytes(order="C"), a.nbytes)
        if isinstance(v, np.generic):
            return {TAG: "npscalar", "dtype": dt.str, "offset": offset}
        return {TAG: "ndarray", "dtype": dt.str, "shape": list(a.shape), "offset": offset}


class _Decoder:
    """JSON tree -> Python value, every field checked against the payload it points into."""

    def __init__(self, payload: memoryview) -> None:
        self.payload = payload
        # Tag -> decoder: a fixed table, so no name from the data is ever looked up as code.
        self.by_tag: dict[str, Callable[[dict[str, Any]], Any]] = {
            "tuple": self._tuple, "dict": self._dict, "bytes": self._bytes, "ndarray": self._ndarray,
            "npscalar": self._npscalar, "deque": self._deque, "generator": self._generator,
            "ale_state": self._ale_state,
        }  # fmt: skip

    def decode(self, node: Any) -> Any:
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            return [self.decode(x) for x in node]
        if type(node) is not dict:
            raise EnvStateError(f"env state: unexpected JSON value of type {type(node).__name__}")
        if TAG not in node:
            return {k: self.decode(x) for k, x in node.items()}
        tag = node[TAG]
        if type(tag) is not str or tag not in self.by_tag:
            raise EnvStateError(f"env state: unknown tag {str(tag)[:40]!r}")
        if set(node) != _FIELDS[tag] | {TAG}:
            raise EnvStateError(f"env state: a {tag} has fields {sorted(node)}; expected {sorted(_FIELDS[tag])}")
        return self.by_tag[tag](node)

    def _list(self, node: dict[str, Any], field: str) -> list[Any]:
        items = node[field]
        if type(items) is not list:
            raise EnvStateError(f"env state: a {node[TAG]}'s {field} is not a list")
        return [self.decode(x) for x in items]

    def _tuple(self, node: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(self._list(node, "items"))

    def _dict(self, node: dict[str, Any]) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for pair in self._list(node, "items"):
            if type(pair) is not list or len(pair) != 2:
                raise EnvStateError("env state: a dict item is not a [key, value] pair")
            try:
                out[pair[0]] = pair[1]
            except TypeError:
                raise EnvStateError(f"env state: unhashable dict key of type {type(pair[0]).__name__}") from None
        return out

    def _deque(self, node: dict[str, Any]) -> deque[Any]:
        maxlen, items = node["maxlen"], self._list(node, "items")
        if maxlen is not None and (_count(maxlen, "deque maxlen") < len(items)):
            raise EnvStateError(f"env state: a deque holds {len(items)} items, more than its maxlen {maxlen}")
        return deque(items, maxlen)

    def _span(self, offset: Any, size: Any) -> memoryview:
        offset, size = _count(offset, "offset"), _count(size, "size")
        if offset + size > len(self.payload):
            raise EnvStateError(
                f"env state: bytes {offset}..{offset + size} lie past the payload's {len(self.payload)}"
            )
        return self.payload[offset : offset + size]

    def _bytes(self, node: dict[str, Any]) -> bytes:
        return bytes(self._span(node["offset"], node["size"]))

    def _ndarray(self, node: dict[str, Any]) -> np.ndarray:
        dt, shape = _dtype(node["dtype"]), node["shape"]
        if type(shape) is not list or len(shape) > _MAX_NDIM:
            raise EnvStateError("env state: an array's shape is not a list of at most 32 sizes")
        shape = [_count(s, "array size") for s in shape]
        count = int(np.prod(shape, dtype=object))  # Python ints: no overflow from a crafted shape
        raw = self._span(node["offset"], count * dt.itemsize)
        return np.frombuffer(raw, dtype=dt, count=count).reshape(tuple(shape)).copy()  # own, writable memory

    def _npscalar(self, node: dict[str, Any]) -> np.generic:
        dt = _dtype(node["dtype"])
        value: np.generic = np.frombuffer(self._span(node["offset"], dt.itemsize), dtype=dt)[0]
        return value

    def _generator(self, node: dict[str, Any]) -> np.random.Generator:
        name = node["bit_generator"]
        if type(name) is not str or name not in BIT_GENERATORS:
            raise EnvStateError(f"env state: bit generator {str(name)[:40]!r} is not one of {sorted(BIT_GENERATORS)}")
        bg = BIT_GENERATORS[name](0)  # seeded: no OS entropy; the state below replaces it
        try:
            bg.state = self.decode(node["state"])
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise EnvStateError(f"env state: bad {name} state ({type(exc).__name__}: {exc})") from None
        return np.random.Generator(bg)

    def _ale_state(self, node: dict[str, Any]) -> Any:
        raw = bytes(self._span(node["offset"], node["size"]))
        try:
            import ale_py  # only here: a blob without emulator states never needs it
        except ImportError:
            raise EnvStateError("env state holds an ALE emulator state, but ale_py is not installed") from None
        try:
            return ale_py.ALEState(raw)
        except Exception as exc:  # the C++ parser's errors arrive as SystemError/RuntimeError
            raise EnvStateError(f"env state: ALE emulator state rejected ({type(exc).__name__})") from None


def _count(x: Any, what: str) -> int:
    if type(x) is not int or x < 0:
        raise EnvStateError(f"env state: {what} {str(x)[:40]!r} is not a non-negative integer")
    return x


def _dtype(s: Any) -> np.dtype:
    """A dtype named by the data, from the whitelist of kinds only (never object or void)."""
    dt: Optional[np.dtype] = None
    if type(s) is str and _DTYPE.fullmatch(s):
        try:
            dt = np.dtype(s)
        except TypeError:
            dt = None
    if dt is None or dt.str != s:
        raise EnvStateError(f"env state: dtype {str(s)[:40]!r} is not a bool/int/uint/float/complex dtype")
    return dt
