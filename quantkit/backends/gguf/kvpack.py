"""GGUF metadata arrays packed in one pass: byte for byte what `gguf.GGUFWriter` writes.

gguf 0.19's writer packs an array value by value through ``struct`` (three calls and a type check per item); a 152k
vocabulary, its token types and 151k merges took ~1 s of every conversion. Long arrays of one type are packed here in
one pass; everything else goes through the writer's own code.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import gguf
import numpy as np

_T = gguf.GGUFValueType
_NUMERIC = {_T.UINT8: "<u1", _T.INT8: "<i1", _T.UINT16: "<u2", _T.INT16: "<i2", _T.UINT32: "<u4", _T.INT32: "<i4",
            _T.FLOAT32: "<f4", _T.UINT64: "<u8", _T.INT64: "<i8", _T.FLOAT64: "<f8"}
_LENGTH = struct.Struct("<Q")
MIN_ITEMS = 256  # shorter arrays are not worth a second code path


def fast_arrays(writer: gguf.GGUFWriter) -> None:
    """Make `writer` pack long homogeneous arrays (strings, ints, floats) in one pass."""
    if writer.endianess != gguf.GGUFEndian.LITTLE:
        return
    slow = writer._pack_val

    def pack_val(val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                 sub_type: gguf.GGUFValueType | None = None) -> bytes:
        body = None
        if vtype == _T.ARRAY and isinstance(val, Sequence) and not isinstance(val, (str, bytes)) \
                and len(val) >= MIN_ITEMS:
            body = _array(val, sub_type)
        if body is None:
            return slow(val, vtype, add_vtype, sub_type)
        return (struct.pack("<I", vtype) if add_vtype else b"") + body

    writer._pack_val = pack_val  # type: ignore[method-assign]


def _array(val: Sequence[Any], sub_type: gguf.GGUFValueType | None) -> bytes | None:
    """Item type, count and items, or None when the writer's own checks and packing should decide."""
    kind = sub_type if sub_type is not None else _T.get_type(val[0])
    same: Callable[[Any], bool]
    if kind == _T.STRING:
        same = _is_string
    elif kind == _T.INT32 and sub_type is None:
        same = _is_int
    elif kind == _T.FLOAT32 and sub_type is None:
        same = _is_float
    elif kind in _NUMERIC and sub_type is not None:
        same = _is_number
    else:
        return None
    if not all(map(same, val)):
        return None
    head = struct.pack("<IQ", kind, len(val))
    if kind == _T.STRING:
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
        return head + b"".join(_LENGTH.pack(len(b)) + b for b in items)
    arr = np.asarray(val, dtype=np.float64 if kind in (_T.FLOAT32, _T.FLOAT64) else np.int64)
    out = arr.astype(_NUMERIC[kind])
    floats = kind in (_T.FLOAT32, _T.FLOAT64)
    if (not floats and not np.array_equal(out.astype(arr.dtype), arr)) or \
            (floats and not np.array_equal(np.isfinite(out), np.isfinite(arr))):
        return None  # out of range: let the writer raise as it would
    return head + out.tobytes()


def _is_string(v: Any) -> bool:
    return isinstance(v, (str, bytes, bytearray))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, float)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
