"""GGUF metadata arrays packed in one pass: byte for byte what `gguf.GGUFWriter` writes.

gguf 0.19's writer packs an array value by value through ``struct`` (three calls and a type check per item); a 152k
vocabulary, its token types and 151k merges took ~1 s of every conversion. Long arrays of one type are packed here in
one pass (the item types are checked once per distinct type, not once per item); everything else goes through the
writer's own code.

Packed arrays are remembered (`MEMO_SIZE` of them, newest kept): packing the same list or tuple object again, in this
writer or another one in the same process (the BF16 file, then a quantized file with the same vocabulary), returns the
bytes packed before. A hit needs the very same container object, with every item still the very same object (checked
by identity, so a list changed in place is packed again), of immutable item types only (str, bytes, int, float, numpy
floats; never bytearray, whose contents could change unseen), packed with the same sub type.
`clear_memo()` forgets them.
"""

from __future__ import annotations

import operator
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import gguf
import numpy as np

_T = gguf.GGUFValueType
_NUMERIC = {_T.UINT8: "<u1", _T.INT8: "<i1", _T.UINT16: "<u2", _T.INT16: "<i2", _T.UINT32: "<u4", _T.INT32: "<i4",
            _T.FLOAT32: "<f4", _T.UINT64: "<u8", _T.INT64: "<i8", _T.FLOAT64: "<f8"}
_FLOATS = (_T.FLOAT32, _T.FLOAT64)
_LENGTH = struct.Struct("<Q")
MIN_ITEMS = 256  # shorter arrays are not worth a second code path
MEMO_SIZE = 8  # arrays remembered per process (a vocabulary has three long ones: tokens, types or scores, merges)

# id(container) -> (container, snapshot of its items or None for a tuple, sub_type, body); holding the container keeps
# its id from being reused while the entry lives.
_memo: OrderedDict[int, tuple[Sequence[Any], tuple[Any, ...] | None, Any, bytes]] = OrderedDict()


def clear_memo() -> None:
    """Forget every remembered array (frees their bytes and the references to their containers)."""
    _memo.clear()


def fast_arrays(writer: gguf.GGUFWriter) -> None:
    """Make `writer` pack long homogeneous arrays (strings, ints, floats) in one pass, reusing bytes packed before."""
    if writer.endianess != gguf.GGUFEndian.LITTLE:
        return
    slow = writer._pack_val

    def pack_val(val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                 sub_type: gguf.GGUFValueType | None = None) -> bytes:
        body = None
        if vtype == _T.ARRAY and isinstance(val, (list, tuple)) and len(val) >= MIN_ITEMS:
            body = packed_array(val, sub_type)
        if body is None:
            return slow(val, vtype, add_vtype, sub_type)
        return (struct.pack("<I", vtype) if add_vtype else b"") + body

    writer._pack_val = pack_val  # type: ignore[method-assign]


def packed_array(val: list[Any] | tuple[Any, ...], sub_type: gguf.GGUFValueType | None = None) -> bytes | None:
    """Item type, count and items of a GGUF array as gguf's writer packs them (little-endian), remembered for the same
    object; None when the writer's own checks and packing should decide (mixed or unusual items, out-of-range
    numbers), so that it raises or packs exactly as it would."""
    hit = _memo.get(id(val))
    if hit is not None:
        _, snap, sub, body = hit
        if sub == sub_type and (snap is None or (len(snap) == len(val) and all(map(operator.is_, val, snap)))):
            _memo.move_to_end(id(val))
            return body
        del _memo[id(val)]
    types = set(map(type, val))
    packed = _array(val, sub_type, types)
    if packed is not None:  # only str, bytes, int, float (and their subclasses) items get here: none can change
        _memo[id(val)] = (val, None if isinstance(val, tuple) else tuple(val), sub_type, packed)
        while len(_memo) > MEMO_SIZE:
            _memo.popitem(last=False)
    return packed


def _array(val: Sequence[Any], sub_type: gguf.GGUFValueType | None, types: set[type]) -> bytes | None:
    if not val:
        return None
    kind = sub_type if sub_type is not None else _T.get_type(val[0])
    if kind == _T.STRING:
        if not types <= {str, bytes}:  # bytearray, or a str/bytes subclass: the writer's own loop
            return None
        body = _strings(val, types)
    elif kind in _NUMERIC and (sub_type is not None or kind in (_T.INT32, _T.FLOAT32)):
        body = _numbers(val, kind, sub_type, types)
    else:
        return None
    if body is None:
        return None
    return struct.pack("<IQ", kind, len(val)) + body


def _strings(val: Sequence[Any], types: set[type]) -> bytes | None:
    """Each item's UTF-8 length (uint64) and bytes. Items are joined by NUL and encoded once; each NUL then becomes
    the next item's length (a lone leading NUL the first one's), which needs no per-item Python call."""
    n = len(val)
    try:
        if types == {str}:
            joined = "\0".join(val)
            if joined.count("\0") != n - 1:
                return _strings_each(val)
            data = joined.encode("utf-8")
        elif types == {bytes}:
            data = b"\0".join(val)
            if data.count(0) != n - 1:
                return _strings_each(val)
        else:
            return _strings_each(val)
    except UnicodeEncodeError:
        return None  # the writer raises its own error
    buf = np.frombuffer(b"\0" + data, np.uint8)
    sep = np.flatnonzero(buf == 0)  # n of them: where each item starts, less one
    ends = np.empty(n, np.int64)
    ends[:-1] = sep[1:]
    ends[-1] = buf.size
    lengths = (ends - sep - 1).astype("<u8").view(np.uint8).reshape(n, 8)
    counts = np.ones(buf.size, np.int64)
    counts[sep] = 8
    out = np.repeat(buf, counts)  # every separator widened to the 8 bytes its length takes
    heads = sep + 7 * np.arange(n, dtype=np.int64)
    for j in range(8):
        out[heads + j] = lengths[:, j]
    return out.tobytes()


def _strings_each(val: Sequence[Any]) -> bytes:
    items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
    parts: list[bytes] = [b""] * (2 * len(items))
    parts[1::2] = items
    parts[0::2] = map(_LENGTH.pack, map(len, items))
    return b"".join(parts)


def _numbers(val: Sequence[Any], kind: gguf.GGUFValueType, sub_type: gguf.GGUFValueType | None,
             types: set[type]) -> bytes | None:
    floats = kind in _FLOATS
    if sub_type is None:
        # the writer's type check: every item of the first item's type (bool is not an int, int is not a float)
        ok = all(t is float for t in types) if floats else \
            all(issubclass(t, int) and not issubclass(t, bool) for t in types)
    elif floats:  # struct's "f"/"d" take ints and floats
        ok = all(issubclass(t, (int, float, np.floating)) for t in types)
    else:  # struct's integer codes take ints (bool included), never floats; numpy integers go the writer's way
        ok = all(issubclass(t, int) for t in types)
    if not ok:
        return None
    try:
        arr = np.fromiter(val, dtype=np.float64 if floats else np.int64, count=len(val))
    except (OverflowError, TypeError, ValueError):
        return None
    if not floats:
        info = np.iinfo(_NUMERIC[kind])
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            return None  # out of range: let the writer raise as it would
    with np.errstate(over="ignore"):
        out = arr.astype(_NUMERIC[kind])
    if floats and not np.array_equal(np.isfinite(out), np.isfinite(arr)):
        return None  # too large for float32: the writer raises
    return out.tobytes()
