"""Put back the unquantized tensors GPTQModel's saved checkpoint lacks.

GPTQModel 7.6 with transformers 5 saves a DeepSeek-V3 mixture of experts without the routers'
``e_score_correction_bias`` (a buffer, not a parameter): the published model would then route tokens with a zero
bias, to other experts than the original. Every source tensor that is neither quantized (replaced by
``qweight``/``qzeros``/``scales``/``g_idx``) nor present in the output is copied, as stored, into the output shard
that holds the rest of its layer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from quantkit.safetensors_io import read_header
from quantkit.source import Checkpoint

_LAYER = re.compile(r"^(model\.layers\.\d+\.)")


def missing_tensors(ckpt: Checkpoint, folder: Path) -> list[str]:
    """Source tensors the GPTQ folder lacks that were never meant to be quantized."""
    present: set[str] = set()
    for file in folder.glob("*.safetensors"):
        present |= set(read_header(file)[0])
    quantized = ckpt.arch.gptq_layers
    tied = ckpt.arch.tied_embeddings
    out = []
    for name in ckpt.tensors.names():
        if name in present or quantized.match(name) or f"{name.removesuffix('.weight')}.qweight" in present:
            continue
        if tied and name == "lm_head.weight":
            continue
        out.append(name)
    return out


def restore(ckpt: Checkpoint, folder: Path) -> list[str]:
    """Copy the missing tensors in; returns their names."""
    import torch
    from safetensors.torch import load_file, save_file

    names = missing_tensors(ckpt, folder)
    if not names:
        return []
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.exists() else None
    shards = sorted(folder.glob("*.safetensors"))
    by_shard: dict[Path, list[str]] = {}
    for name in names:
        target = shards[0]
        if index is not None:
            layer = _LAYER.match(name)
            same = [f for n, f in index["weight_map"].items() if layer and n.startswith(layer.group(1))]
            target = folder / (same[0] if same else index["weight_map"][next(iter(index["weight_map"]))])
        by_shard.setdefault(target, []).append(name)
    for shard, add in by_shard.items():
        with open(shard, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            metadata = json.loads(fh.read(n)).get("__metadata__")
        tensors = load_file(shard)
        for name in add:
            info = ckpt.tensors.tensors[name]
            raw = np.ascontiguousarray(ckpt.tensors.read(name))
            t = torch.from_numpy(raw)
            tensors[name] = t.view(torch.bfloat16) if info.dtype == "BF16" else t
            if index is not None:
                index["weight_map"][name] = shard.name
        tmp = shard.with_name(f".{shard.name}.partial-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, shard)
    if index is not None:
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names
