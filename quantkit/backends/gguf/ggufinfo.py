"""A GGUF header reader that skips the metadata values: tensor names, shapes, types, offsets and sizes only.

`gguf.GGUFReader` decodes every metadata value into numpy views; a 152k-token vocabulary and its merges make that
take tens of seconds per file (measured: 32 of 46 s of a `--no-verify` run on Qwen2.5-0.5B went to re-reading the
files just written). Here array values are skipped by their lengths alone, so reading the tensor table of any GGUF
takes milliseconds, and nothing of the file is kept in memory.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# fixed-size GGUF value types → bytes (8: string, 9: array are variable)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: np.ndarray  # ne order (ne0 first), like gguf.ReaderTensor.shape
    tensor_type: gguf.GGMLQuantizationType
    data_offset: int  # absolute, in the file
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    tensors: list[TensorEntry]
    alignment: int
    data_start: int


def _skip_value(buf: mmap.mmap, pos: int, vtype: int) -> int:
    if vtype in _SCALAR:
        return pos + _SCALAR[vtype]
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == 9:
        sub, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if sub in _SCALAR:
            return pos + _SCALAR[sub] * count
        if sub == 8:  # a vocabulary or its merges: hundreds of thousands of strings, walked by their lengths
            length = _U64.unpack_from
            for _ in range(count):
                pos += 8 + length(buf, pos)[0]
            return pos
        for _ in range(count):
            pos = _skip_value(buf, pos, sub)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_info(path: Path) -> GGUFInfo:
    """The tensor table of a GGUF file; raises ValueError (or struct.error) for a broken header. Remembered per
    file version (one `quantkit gguf` run reads each file it writes three times: check, size, bits per weight)."""
    st = os.stat(path)
    return _read_info(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _read_info(path: str, size: int, mtime_ns: int, inode: int) -> GGUFInfo:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        pos = 24
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            (klen,) = struct.unpack_from("<Q", buf, pos)
            key = bytes(buf[pos + 8 : pos + 8 + klen])
            pos += 8 + klen
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if key == b"general.alignment" and vtype == 4:
                (alignment,) = struct.unpack_from("<I", buf, pos)
            pos = _skip_value(buf, pos, vtype)
        raw: list[tuple[str, list[int], int, int]] = []
        for _ in range(n_tensors):
            (nlen,) = struct.unpack_from("<Q", buf, pos)
            name = bytes(buf[pos + 8 : pos + 8 + nlen]).decode("utf-8")
            pos += 8 + nlen
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
            pos += 4 + 8 * n_dims
            ttype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            raw.append((name, dims, ttype, offset))
    data_start = pos + (-pos) % alignment
    tensors = []
    for name, dims, ttype, offset in raw:
        qtype = gguf.GGMLQuantizationType(ttype)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        tensors.append(TensorEntry(name, np.array(dims, dtype=np.int64), qtype, data_start + offset, n,
                                   n // block * size))
    return GGUFInfo(tensors, alignment, data_start)


def tensor_bytes(path: Path, entry: TensorEntry) -> np.ndarray:
    """One tensor's stored bytes, memory-mapped (read only when used)."""
    return np.memmap(path, dtype=np.uint8, mode="r", offset=entry.data_offset, shape=(entry.n_bytes,))


def gguf_stats(path: Path) -> tuple[int, float]:
    """Bytes on disk (all split parts) and bits per weight over every tensor (from the tensor table alone)."""

    size = 0
    bits = 0
    elements = 0
    for part in iter_parts(path):
        size += part.stat().st_size
        reader = read_info(part)
        for t in reader.tensors:
            bits += int(t.n_bytes) * 8
            elements += int(t.n_elements)
    return size, (bits / elements if elements else 0.0)


def iter_parts(first: Path) -> Iterator[Path]:
    """Every file of a (possibly split) GGUF, given its first part or single file."""
    import re

    m = re.match(r"^(.*)-00001-of-(\d{5})\.gguf$", first.name)
    if not m:
        yield first
        return
    for i in range(1, int(m.group(2)) + 1):
        yield first.with_name(f"{m.group(1)}-{i:05d}-of-{m.group(2)}.gguf")
