"""Importance matrix from Russian calibration text, in llama.cpp's GGUF imatrix format.

For every linear layer we sum the squares of its inputs per input column over all calibration tokens (what
``llama-imatrix`` collects from the mat-muls), through the layer-by-layer transformers forward. The file holds
``<tensor>.in_sum2`` (f32, ne = [n_in, 1]) and ``<tensor>.counts`` (f32, ne = [1, 1]) with
``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``, which
``llama-quantize --imatrix`` reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantkit.errors import QuantkitError
from quantkit.layerwise import LayerwiseModel, hf_module_to_gguf
from quantkit.source import Checkpoint
from quantkit.workspace import atomic_path


def compute_imatrix(
    ckpt: Checkpoint,
    rows: np.ndarray,
    *,
    bos: int | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Sum of squared inputs per column for every linear layer (output head excluded, as llama-imatrix does).

    Each row starts with the BOS token when the model adds one, like llama-imatrix's chunks.
    """
    import torch

    rows = np.array(rows, copy=True)
    if bos is not None:
        rows[:, 0] = bos
    to_gguf = hf_module_to_gguf(ckpt)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hooks(index: int, layer: Any) -> list[Any]:
        handles = []
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            gguf_name = to_gguf(f"model.layers.{index}.{name}")
            if gguf_name is None:
                continue

            def pre_hook(mod: Any, args: tuple[Any, ...], key: str = gguf_name) -> None:
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                s = (x * x).sum(0)
                if key in sums:
                    sums[key] += s
                else:
                    sums[key] = s
                counts[key] = counts.get(key, 0) + x.shape[0]

            handles.append(module.register_forward_pre_hook(pre_hook))
        return handles

    model = LayerwiseModel(ckpt)
    for _ in model.run(rows, hooks=hooks, on_layer=on_layer):
        pass
    out = {k: v.cpu().numpy().astype(np.float32) for k, v in sums.items()}
    for k, v in out.items():
        if not np.all(np.isfinite(v)):
            raise QuantkitError(f"non-finite activations in {k} while computing the importance matrix",
                                "the checkpoint's weights are broken (NaN/inf)")
    return out, counts


def write_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, int], *, datasets: list[str],
                  chunk_size: int) -> Path:
    """Write the GGUF imatrix file (atomically)."""
    chunks = max(counts.values()) // chunk_size if counts else 0
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="")
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, datasets)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunks)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for name in sorted(sums):
            w.add_tensor(f"{name}.in_sum2", sums[name].reshape(1, -1).astype(np.float32))
            w.add_tensor(f"{name}.counts", np.array([[float(counts[name])]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Per-tensor importance (``in_sum2 / counts``, 1.0 where the count is 0), as llama-quantize normalises it."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing
        raise QuantkitError(f"{path} is not a GGUF imatrix file ({type(exc).__name__})",
                            "pass a file written by llama-imatrix or quantkit") from exc
    sums: dict[str, np.ndarray] = {}
    cnts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            cnts[t.name[: -len(".counts")]] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise QuantkitError(f"{path} holds no importance data", "pass a GGUF imatrix file (llama-imatrix ≥ b5942)")
    out = {}
    for name, s in sums.items():
        c = cnts.get(name, np.array([0.0], dtype=np.float32))
        n_mat = len(c)
        per = s.reshape(n_mat, -1)
        vals = np.where(c[:, None] > 0, per / np.maximum(c[:, None], 1e-30), 1.0).astype(np.float32)
        out[name] = vals.reshape(-1)
    return out
