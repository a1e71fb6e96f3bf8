"""A streaming safetensors reader: headers without loading, one tensor at a time with plain reads.

Reading with ``readinto`` (not a memory map) keeps the resident set at the size of the tensor being read,
so converting a 60 GB checkpoint needs about as much memory as converting a 60 MB one.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError

# safetensors dtype → (numpy storage dtype, bytes per element). BF16 is kept as raw uint16.
DTYPES: dict[str, tuple[type, int]] = {
    "BF16": (np.uint16, 2),
    "F16": (np.float16, 2),
    "F32": (np.float32, 4),
    "F64": (np.float64, 8),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "I16": (np.int16, 2),
    "I32": (np.int32, 4),
    "I64": (np.int64, 8),
    "BOOL": (np.bool_, 1),
    "F8_E4M3": (np.uint8, 1),
    "F8_E5M2": (np.uint8, 1),
}
FLOAT_DTYPES = {"BF16", "F16", "F32"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], bytes]:
    """Parse a safetensors header; raise a clear error for a truncated or corrupt file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw_len)
            if n > min(size - 8, 100_000_000):
                raise ValueError("header length is impossible")
            header_bytes = fh.read(n)
        header = json.loads(header_bytes)
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise QuantkitError(
            f"corrupt safetensors file {path.name}: {exc}", "download the checkpoint again"
        ) from exc
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        try:
            dtype = spec["dtype"]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantkitError(f"corrupt safetensors file {path.name}: bad entry for {name}",
                                "download the checkpoint again") from exc
        if base + end > size:
            raise QuantkitError(
                f"corrupt safetensors file {path.name}: tensor {name} ends past the end of the file "
                f"(truncated download?)",
                "download the checkpoint again",
            )
        if dtype in DTYPES and end - begin != int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]:
            raise QuantkitError(f"corrupt safetensors file {path.name}: tensor {name} has the wrong size",
                                "download the checkpoint again")
        tensors[name] = TensorInfo(name, dtype, shape, path, base + begin, end - begin)
    return tensors, meta, header_bytes


INDEX = "model.safetensors.index.json"


def read_index(folder: Path) -> dict[str, str] | None:
    """The tensor → shard map of a sharded checkpoint (``model.safetensors.index.json``), or None."""
    path = Path(folder) / INDEX
    if not path.is_file():
        return None
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"corrupt {INDEX} in {folder}: {type(exc).__name__}",
                            "download the checkpoint again") from exc
    return {str(k): str(v) for k, v in weight_map.items()}


def check_index(folder: Path, tensors: dict[str, TensorInfo]) -> None:
    """Every shard the index names exists, and holds the tensors the index promises."""
    weight_map = read_index(folder)
    if weight_map is None:
        return
    missing = sorted({shard for shard in weight_map.values() if not (Path(folder) / shard).is_file()})
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise QuantkitError(f"incomplete checkpoint {folder}: shard {missing[0]}{more} named in {INDEX} is missing",
                            "download the checkpoint again (an interrupted download leaves shards out)")
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard:
            raise QuantkitError(f"incomplete checkpoint {folder}: {shard} lacks tensor {name} that {INDEX} promises",
                                "download the checkpoint again")


class TensorSource:
    """Every tensor of a checkpoint folder, by name, read one at a time; a sharded checkpoint is checked against its
    index first (a missing shard or tensor is refused here, before any work)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files = sorted(self.folder.glob("*.safetensors"))
        self.tensors: dict[str, TensorInfo] = {}
        self.headers: dict[str, bytes] = {}
        for file in self.files:
            infos, _, raw = read_header(file)
            self.tensors.update(infos)
            self.headers[file.name] = raw
        check_index(self.folder, self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def view(self, name: str) -> np.ndarray:
        """The tensor as a read-only array mapped from the file, in its storage dtype: no copy is made until it
        is used (the converter writes most tensors straight from the page cache)."""
        info = self.tensors[name]
        np_dtype, _ = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.empty(info.shape, dtype=np_dtype)
        return np.memmap(info.file, dtype=np_dtype, mode="r", offset=info.start, shape=info.shape)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a numpy array in its storage dtype (BF16 as uint16), read with one pread."""
        info = self.tensors[name]
        np_dtype, _ = DTYPES[info.dtype]
        out = np.empty(info.shape, dtype=np_dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < info.nbytes:
                got = os.preadv(fd, [buf[done:]], info.start + done)
                if got <= 0:
                    raise QuantkitError(f"corrupt safetensors file {info.file.name}: short read of {name}",
                                        "download the checkpoint again")
                done += got
        finally:
            os.close(fd)
        return out

    def read_f32(self, name: str) -> np.ndarray:
        return to_f32(self.read(name), self.tensors[name].dtype)


def to_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def f32_to_bf16(arr: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 → bf16 bits (as uint16), NaNs kept quiet, like ggml."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = ((bits.astype(np.uint64) + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(nan, ((bits >> 16) | 64).astype(np.uint16), rounded)
