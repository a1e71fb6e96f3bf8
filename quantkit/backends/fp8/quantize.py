"""FP8_DYNAMIC, streamed: the recipe (bit-exact with llm-compressor / compressed-tensors) and a writer that reads
the checkpoint one block of rows at a time and writes each shard in place.

Every output tensor's shape and dtype is known from the source headers, so each shard's safetensors header is
written first and every tensor then goes straight to its offset (``pwrite``): nothing but one block of rows (at
most `BLOCK` elements) is held in memory, whatever the model's size. Copied tensors (embeddings, norms, the
output head, a vision tower) go file to file with ``copy_file_range``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantkit.backends.fp8.options import (
    COPIED_FILES,
    INDEX,
    FP8Options,
    Item,
    bits_per_weight,
    ignored_modules,
    plan_items,
    quantization_config,
    shard_items,
    shard_names,
)
from quantkit.errors import QuantkitError
from quantkit.source import Checkpoint

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 1 << 24  # elements quantized at a time
COPY_CHUNK = 1 << 26  # bytes copied at a time
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [out, in]`` → (fp8 E4M3 ``[out, in]``, scale ``[out, 1]`` in W's dtype), as compressed-tensors does it:
    per row ``max(|min(row, 0)|, max(row, 0)) / 448`` in W's dtype (0 → the dtype's eps), then
    ``clamp(W / scale, ±448)`` divided in W's dtype and rounded to fp8."""
    zero = torch.zeros((), dtype=w.dtype)
    low = torch.minimum(w.amin(dim=1, keepdim=True), zero)
    high = torch.maximum(w.amax(dim=1, keepdim=True), zero)
    scale = torch.maximum(low.abs(), high.abs()) / torch.tensor(FP8_MAX, dtype=w.dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype), scale)
    return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _pread(fd: int, nbytes: int, offset: int, name: str) -> np.ndarray:
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise QuantkitError(f"short read of {name} from the checkpoint", "download the checkpoint again")
        done += got
    return buf


def _pwrite(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _copy(src: int, dst: int, nbytes: int, src_offset: int, dst_offset: int, name: str) -> None:
    done = 0
    while done < nbytes:
        n = min(COPY_CHUNK, nbytes - done)
        try:
            got = os.copy_file_range(src, dst, n, src_offset + done, dst_offset + done)
        except OSError:  # another filesystem on an old kernel, or no copy_file_range: through memory
            got = 0
        if got <= 0:
            _pwrite(dst, _pread(src, n, src_offset + done, name), dst_offset + done)
            got = n
        done += got


def _layout(items: list[Item]) -> tuple[bytes, dict[str, int]]:
    """The shard's header (length prefix included, padded to 8 bytes) and each tensor's absolute offset. Wider
    dtypes first, as safetensors orders them, so every tensor is aligned to its element size."""
    tensors = sorted((t for i in items for t in i.outputs), key=lambda t: -t.itemsize)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    offsets: dict[str, int] = {}
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offsets[t.name] = offset
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {k: base + v for k, v in offsets.items()}


def _quantize_item(src: int, dst: int, item: Item, offsets: dict[str, int]) -> None:
    info = item.source
    weight, scale = item.outputs
    rows, cols = info.shape
    dtype = TORCH_DTYPES[info.dtype]
    width = scale.itemsize
    step = max(1, BLOCK // max(cols, 1))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        raw = _pread(src, n * cols * width, info.start + r0 * cols * width, info.name)
        w = torch.from_numpy(raw).view(dtype).view(n, cols)
        q, s = quantize_weight(w)
        _pwrite(dst, q.view(torch.uint8).numpy(), offsets[weight.name] + r0 * cols)
        _pwrite(dst, s.contiguous().view(torch.uint8).numpy(), offsets[scale.name] + r0 * width)


def write_shard(path: Path, items: list[Item], sources: dict[Path, int],
                on_item: Callable[[Item], None] | None = None) -> None:
    """One shard: its header, then each item (in source order) at its offset."""
    head, offsets = _layout(items)
    end = max((offsets[t.name] + t.nbytes for i in items for t in i.outputs), default=len(head))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, head, 0)
        os.ftruncate(fd, end)
        for item in items:
            info = item.source
            if info.file not in sources:
                sources[info.file] = os.open(info.file, os.O_RDONLY)
            if item.quantized:
                _quantize_item(sources[info.file], fd, item, offsets)
            else:
                _copy(sources[info.file], fd, info.nbytes, info.start, offsets[info.name], info.name)
            if on_item is not None:
                on_item(item)
    finally:
        os.close(fd)


def write_model(ckpt: Checkpoint, out: Path, opts: FP8Options, *, version: str | None,
                on_item: Callable[[Item], None] | None = None) -> dict[str, Any]:
    """The whole FP8 model folder: shards (and their index when there are several), config.json with
    ``quantization_config``, the source's tokenizer, chat template and generation config."""
    from quantkit.files import check_disk

    items = plan_items(ckpt)
    shards = shard_items(items, opts.shard_size)
    names = shard_names(len(shards))
    total = sum(i.nbytes for i in items)
    check_disk(out, total, f"FP8 {opts.quant}")
    out.mkdir(parents=True, exist_ok=True)
    sources: dict[Path, int] = {}
    try:
        for name, shard in zip(names, shards, strict=True):
            write_shard(out / name, shard, sources, on_item)
    finally:
        for fd in sources.values():
            os.close(fd)
    if len(shards) > 1:
        weight_map = {t.name: name for name, shard in zip(names, shards, strict=True) for i in shard
                      for t in i.outputs}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    src = Path(ckpt.path)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    ignore = ignored_modules(ckpt)
    config["quantization_config"] = quantization_config(ignore, version)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    quantized = [i for i in items if i.quantized]
    return {"tensors_quantized": len(quantized), "tensors_kept": len(items) - len(quantized),
            "shards": len(shards), "ignore": ignore, "bpw": bits_per_weight(items), "size": total}


__all__ = ["FP8_MAX", "quantize_weight", "write_model", "write_shard"]
