"""mpirl.envstate: every supported type round-trips exactly; every malformed input is an
EnvStateError (one line), never another exception and never code named by the data."""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from typing import Any

import numpy as np
import pytest

from mpirl import envstate
from mpirl.envstate import EnvStateError, UnsupportedValue


def same(a: Any, b: Any) -> bool:
    """Exact equality, types included (NaN equals NaN, -0.0 differs from 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and np.shape(a) == np.shape(b) and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if isinstance(a, (list, tuple, deque)):
        return (
            len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b))
            and getattr(a, "maxlen", 0) == getattr(b, "maxlen", 0)
        )
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.random.Generator):
        return a.bit_generator.state.__repr__() == b.bit_generator.state.__repr__()
    return a == b


def round_trip(value: Any) -> Any:
    envstate.check(value)
    back = envstate.unpack(envstate.pack(value))
    assert same(value, back), (value, back)
    return back


DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "g", "c8", "c16", ">i4", ">f8"]


def test_plain_json_values_round_trip():
    round_trip(None)
    round_trip([True, False, 0, -1, 2**80, -(2**70), 1.5, -0.0, 0.0, float("inf"), float("-inf"), float("nan")])
    round_trip({"a": "text", "ü": "é\u2603\U0001f600", "": "", "lone": "\ud800", "nested": {"x": [[], {}]}})
    round_trip("")


def test_tagged_python_values_round_trip():
    round_trip((1, (2.0, "x"), ()))
    round_trip({1: "int key", (2, 3): [4], None: 0, 1.5: True, "s": 1})  # non-str keys
    round_trip({envstate.TAG: "tuple", "items": 3})  # a key that clashes with the tag stays data
    round_trip([b"", b"\x00\xffbytes"])
    round_trip(deque([1, np.zeros(2), "x"], maxlen=5))
    round_trip(deque([]))
    round_trip(deque([], maxlen=0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_arrays_and_scalars_round_trip(dtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 4)) * 100).astype(dtype)
    back = round_trip({"a": a, "scalar": a[1, 2], "zero_d": np.array(a[0, 0]), "empty": a[:0], "t": a.T})
    assert back["a"].flags.writeable and back["a"].flags.c_contiguous  # own memory, not the blob's
    round_trip(a[::2, ::-1])  # a strided view: values kept, stored contiguous


def test_generators_round_trip_and_continue_alike():
    for name, cls in envstate.BIT_GENERATORS.items():
        g = np.random.Generator(cls(123))
        g.random(7)
        g.integers(0, 10, 3)  # PCG64: leaves a buffered uint32 in the state
        back = round_trip(g)
        assert back.bit_generator.__class__ is cls, name
        np.testing.assert_array_equal(back.random(50), g.random(50), err_msg=name)


def test_ale_state_round_trips_exactly():
    ale_py = pytest.importorskip("ale_py")
    import gymnasium as gym

    gym.register_envs(ale_py)
    env = gym.make("ALE/Pong-v5", repeat_action_probability=0.0)
    env.reset(seed=3)
    for a in [0, 2, 3, 1] * 10:
        env.step(a)
    ale = env.unwrapped.ale
    saved = ale.cloneState(include_rng=True)
    back = envstate.unpack(envstate.pack({"ale": saved}))["ale"]
    assert type(back) is ale_py.ALEState and back.equals(saved)
    frames = []
    for state in (saved, back):  # the same future from either
        ale.restoreState(state)
        for a in [3, 3, 2, 0, 1] * 6:
            ale.act(ale.getMinimalActionSet()[a])
        frames.append(ale.getScreenGrayscale().copy())
    np.testing.assert_array_equal(frames[0], frames[1])
    env.close()


class Color(enum.IntEnum):
    RED = 1


class MyPCG(np.random.PCG64):
    pass


def test_a_container_holding_itself_is_unsupported():
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(UnsupportedValue, match="nested too deeply"):
        envstate.check({"loop": loop})


@pytest.mark.parametrize(
    "value, where, what",
    [
        ({"a": [1, object()]}, "state['a'][1]", "builtins.object"),
        ({"s": {1, 2}}, "state['s']", "builtins.set"),
        ({"e": Color.RED}, "state['e']", "Color"),
        ({"o": np.array([1, "x"], dtype=object)}, "state['o']", "dtype object"),
        ({"v": np.zeros(2, dtype=[("x", "f4")])}, "state['v']", "dtype"),
        ({"t": np.array(["2020-01-01"], dtype="M8[D]")}, "state['t']", "datetime64"),
        ({"u": np.array(["text"])}, "state['u']", "dtype <U4"),
        ({"g": np.random.Generator(MyPCG(0))}, "state['g']", "MyPCG"),
        ({"r": np.random.RandomState(0)}, "state['r']", "RandomState"),
        ({"f": len}, "state['f']", "builtin_function_or_method"),
        ({"m": np.ma.masked_array([1, 2])}, "state['m']", "MaskedArray"),
        ({(1, object()): 2}, "state.key[1]", "builtins.object"),
        ({"i": 1 << 20_000}, "state['i']", "20001 bits"),
    ],
)
def test_unsupported_values_name_their_path(value, where, what):
    for fn in (envstate.pack, envstate.check):
        with pytest.raises(UnsupportedValue) as info:
            fn(value)
        assert where in str(info.value) and what in str(info.value) and "\n" not in str(info.value)


# --- malformed input --------------------------------------------------------------------


def blob(header: Any, payload: bytes = b"", version: int = envstate.VERSION, raw: bytes | None = None) -> bytes:
    """A blob from a hand-written header (``raw``: header bytes as given, not JSON-encoded)."""
    head = json.dumps(header).encode() if raw is None else raw
    return struct.pack(f"<{len(envstate.MAGIC)}sBQQ", envstate.MAGIC, version, len(head), len(payload)) + head + payload


def nd(dtype: str, shape: list[int], offset: int = 0) -> dict[str, Any]:
    return {envstate.TAG: "ndarray", "dtype": dtype, "shape": shape, "offset": offset}


T = envstate.TAG
MALFORMED = {
    "empty": b"",
    "bad magic": b"NOT-AN-ENVSTATE\x00" + bytes(40),
    "magic only": envstate.MAGIC,
    "pickle": b"\x80\x04\x95\x00",
    "future version": blob(1, version=2),
    "bad JSON": blob(None, raw=b"{not json"),
    "int too long to parse": blob(None, raw=b"1" * 5000),
    "not UTF-8": blob(None, raw=b'"\xff\xfe"'),
    "trailing bytes": blob(1) + b"x",
    "declared payload missing": envstate.MAGIC + bytes([envstate.VERSION]) + struct.pack("<QQ", 1, 100) + b"1",
    "offset past the end": blob(nd("<f8", [2]), payload=bytes(8)),
    "offset far past the end": blob(nd("|u1", [1], offset=2**62), payload=bytes(8)),
    "huge shape": blob(nd("|u1", [2**40, 2**40]), payload=bytes(8)),
    "negative offset": blob(nd("|u1", [1], offset=-1), payload=bytes(8)),
    "bool as offset": blob(nd("|u1", [1], offset=True), payload=bytes(8)),
    "float size": blob(nd("|u1", [1.0]), payload=bytes(8)),
    "shape not a list": blob(nd("|u1", 3), payload=bytes(8)),  # type: ignore[arg-type]
    "too many dims": blob(nd("|u1", [1] * 40), payload=bytes(8)),
    "object dtype": blob(nd("|O", [1]), payload=bytes(8)),
    "object dtype (long form)": blob(nd("object", [1]), payload=bytes(8)),
    "void dtype": blob(nd("|V8", [1]), payload=bytes(8)),
    "structured dtype": blob(nd("f4,i4", [1]), payload=bytes(8)),
    "datetime dtype": blob(nd("<M8[s]", [1]), payload=bytes(8)),
    "unicode dtype": blob(nd("<U2", [1]), payload=bytes(8)),
    "non-canonical dtype": blob(nd("<b1", [1]), payload=bytes(8)),
    "impossible dtype": blob(nd("<f3", [1]), payload=bytes(8)),
    "dtype not a string": blob(nd(8, [1]), payload=bytes(8)),  # type: ignore[arg-type]
    "scalar past the end": blob({T: "npscalar", "dtype": "<f8", "offset": 4}, payload=bytes(8)),
    "bytes past the end": blob({T: "bytes", "offset": 0, "size": 9}, payload=bytes(8)),
    "unknown tag": blob({T: "builtins.eval", "items": []}),
    "tag not a string": blob({T: ["tuple"], "items": []}),
    "missing field": blob({T: "tuple"}),
    "extra field": blob({T: "tuple", "items": [], "call": "os.system"}),
    "items not a list": blob({T: "tuple", "items": {"a": 1}}),
    "dict item not a pair": blob({T: "dict", "items": [[1, 2, 3]]}),
    "unhashable key": blob({T: "dict", "items": [[[1], 2]]}),
    "deque over maxlen": blob({T: "deque", "maxlen": 1, "items": [1, 2]}),
    "negative maxlen": blob({T: "deque", "maxlen": -1, "items": []}),
    "bit generator not whitelisted": blob({T: "generator", "bit_generator": "RandomState", "state": {}}),
    "bit generator by path": blob({T: "generator", "bit_generator": "os.system", "state": {}}),
    "bit generator state wrong": blob(
        {T: "generator", "bit_generator": "PCG64", "state": {"bit_generator": "MT19937"}}
    ),
    "bit generator state not a dict": blob({T: "generator", "bit_generator": "SFC64", "state": 5}),
    "deep nesting": blob(None, raw=b"[" * 100_000 + b"]" * 100_000),
    "deep tagged nesting": blob(None, raw=(b'{"' + T.encode() + b'":"tuple","items":[') * 400 + b"]}" * 400),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_is_one_envstate_error(name):
    with pytest.raises(EnvStateError) as info:
        envstate.unpack(MALFORMED[name])
    msg = str(info.value)
    assert msg and "\n" not in msg and len(msg) < 300, msg


def test_ale_state_garbage_is_an_envstate_error():
    pytest.importorskip("ale_py")
    with pytest.raises(EnvStateError, match="ALE emulator state rejected"):
        envstate.unpack(blob({T: "ale_state", "offset": 0, "size": 7}, payload=b"garbage"))


def _sample() -> bytes:
    return envstate.pack(
        {
            "a": np.arange(12, dtype=np.float32).reshape(3, 4),
            "q": deque([np.ones(3, np.uint8)] * 2, maxlen=4),
            "g": np.random.default_rng(1),
            "m": np.random.Generator(np.random.MT19937(2)),
            "t": (1, 2.5, None, b"xyz"),
            7: [True, np.int16(-3)],
        }
    )


def test_every_truncation_is_an_envstate_error():
    data = _sample()
    for n in range(len(data)):
        with pytest.raises(EnvStateError):
            envstate.unpack(data[:n])


def test_random_corruption_never_escapes_as_another_exception():
    data = _sample()
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(3000):
        bad = bytearray(data)
        for i in rng.integers(0, len(bad), size=rng.integers(1, 4)):
            bad[i] = int(rng.integers(0, 256))
        try:
            envstate.unpack(bytes(bad))
            outcomes["ok"] += 1  # e.g. a flipped array byte: still well-formed data
        except EnvStateError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 100


def test_has_magic():
    assert envstate.has_magic(envstate.pack(None))
    assert not envstate.has_magic(b"\x80\x04")
    assert not envstate.has_magic(b"")
