"""Importance matrix from Russian calibration text, in llama.cpp's GGUF imatrix format.

For every linear layer we sum the squares of its inputs per input column over all calibration tokens (what
``llama-imatrix`` collects from the mat-muls), through the layer-by-layer transformers forward. The file holds
``<tensor>.in_sum2`` (f32, ne = [n_in, 1]) and ``<tensor>.counts`` (f32, ne = [1, 1]) with
``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count`` and ``imatrix.chunk_size``, which
``llama-quantize --imatrix`` reads.

Routed experts (transformers 5 keeps a layer's experts as 3-D ``gate_up_proj`` / ``down_proj``) get one row per
expert, as llama-imatrix writes ``mul_mat_id``: ``in_sum2`` ne = [n_in, n_expert] over the tokens routed to each
expert, ``counts`` ne = [1, n_expert] — the router's own choice in the forward, so an expert the calibration text
rarely reaches shows a small count (`expert_coverage`).
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
    dtype: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Sum of squared inputs per column for every linear layer (output head excluded, as llama-imatrix does).

    Each row starts with the BOS token when the model adds one, like llama-imatrix's chunks. The forward runs in
    `dtype` (default `IMATRIX_DTYPE`).
    """
    import torch

    rows = np.array(rows, copy=True)
    if bos is not None:
        rows[:, 0] = bos
    to_gguf = hf_module_to_gguf(ckpt)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, Any] = {}

    last: list[Any] = [None, None, 0]  # input, its column sums of squares, its rows
    buffers: dict[tuple[int, ...], Any] = {}

    def squares(x: Any) -> tuple[Any, int]:
        """Column sums of x² in float32; q/k/v (and gate/up) get the very same input tensor: summed once. The
        float32 copy goes into a buffer kept per shape (a fresh 40 MB tensor per call cost twice the time)."""
        if last[0] is not x:
            flat = x.detach().reshape(-1, x.shape[-1])
            buf = buffers.get(tuple(flat.shape))
            if buf is None:
                buf = buffers[tuple(flat.shape)] = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
            buf.copy_(flat)
            last[:] = [x, buf.square_().sum(0), flat.shape[0]]
        return last[1], last[2]

    def hooks(index: int, layer: Any) -> list[Any]:
        last[:] = [None, None, 0]
        handles = []
        for name, module in layer.named_modules():
            if _is_fused_experts(module):
                handles.append(_expert_hook(module, f"blk.{index}", sums, counts))
                continue
            if not isinstance(module, torch.nn.Linear):
                continue
            if ckpt.arch.split_shapes(f"model.layers.{index}.{name}.weight", tuple(module.weight.shape)):
                continue  # stored as other tensors in the GGUF (MLA's kv_b): no single matrix to weigh
            gguf_name = to_gguf(f"model.layers.{index}.{name}")
            if gguf_name is None:
                continue

            def pre_hook(mod: Any, args: tuple[Any, ...], key: str = gguf_name) -> None:
                s, n = squares(args[0])
                if key in sums:
                    sums[key] += s
                else:
                    sums[key] = s.clone()
                counts[key] = counts.get(key, 0) + n

            handles.append(module.register_forward_pre_hook(pre_hook))
        return handles

    model = LayerwiseModel(ckpt, dtype=dtype or IMATRIX_DTYPE)
    for _ in model.run(rows, hooks=hooks, on_layer=on_layer):
        pass
    last[:] = [None, None, 0]
    buffers.clear()
    out = {k: v.cpu().numpy().astype(np.float32) for k, v in sums.items()}
    counts = {k: (v.cpu().numpy().astype(np.int64) if hasattr(v, "cpu") else v) for k, v in counts.items()}
    for k, v in out.items():
        if not np.all(np.isfinite(v)):
            raise QuantkitError(f"non-finite activations in {k} while computing the importance matrix",
                                "the checkpoint's weights are broken (NaN/inf)")
    return out, counts


# The forward runs in bf16, like llama.cpp's own BF16 mat-muls (which round their inputs to bf16 too) and ~5× faster
# than float32 on CPUs with AVX512-BF16 or AMX; the squares are summed in float32.
IMATRIX_DTYPE = "bfloat16"
MIN_EXPERT_TOKENS = 64  # an expert routed fewer calibration tokens than this has a weak importance estimate


def _is_fused_experts(module: Any) -> bool:
    weights = (getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None))
    return all(w is not None and getattr(w, "ndim", 0) == 3 for w in weights)


def _expert_hook(module: Any, block: str, sums: dict[str, Any], counts: dict[str, Any]) -> Any:
    """Per-expert sums of squared inputs of ``ffn_{gate,up,down}_exps`` from the routing the forward itself does
    (the experts' forward is called with the router's ``top_k_index``)."""
    import torch

    gate_up_key, down_key = f"{block}.ffn_gate_exps.weight", f"{block}.ffn_down_exps.weight"

    def pre_hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = (args[0] if args else kwargs["hidden_states"]).detach().float()
        top_k = args[1] if len(args) > 1 else kwargs["top_k_index"]
        n_exp, n_in = mod.gate_up_proj.shape[0], hidden.shape[-1]
        n_ff = mod.down_proj.shape[-1]
        s_in = torch.zeros(n_exp, n_in)
        s_down = torch.zeros(n_exp, n_ff)
        cnt = torch.zeros(n_exp, dtype=torch.long)
        for e in range(n_exp):
            tokens = (top_k == e).any(-1).nonzero().flatten()
            if len(tokens) == 0:
                continue
            x = hidden[tokens]
            gate, up = torch.nn.functional.linear(x, mod.gate_up_proj[e].float()).chunk(2, dim=-1)
            h = mod.act_fn(gate) * up
            s_in[e] = (x * x).sum(0)
            s_down[e] = (h * h).sum(0)
            cnt[e] = len(tokens)
        for key, s in ((gate_up_key, s_in), (down_key, s_down)):
            sums[key] = sums[key] + s if key in sums else s
            counts[key] = counts[key] + cnt if key in counts else cnt.clone()
        up_key = f"{block}.ffn_up_exps.weight"
        sums[up_key], counts[up_key] = sums[gate_up_key], counts[gate_up_key]

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


def expert_coverage(counts: dict[str, Any], min_tokens: int) -> dict[str, Any]:
    """How many experts received fewer than `min_tokens` calibration tokens (over every MoE layer)."""
    per_expert = [np.asarray(c) for k, c in counts.items() if k.endswith("ffn_gate_exps.weight")]
    if not per_expert:
        return {}
    flat = np.concatenate(per_expert)
    return {"experts": int(flat.size), "min_tokens": min_tokens, "below": int((flat < min_tokens).sum()),
            "unreached": int((flat == 0).sum()), "fewest": int(flat.min()), "median": float(np.median(flat))}


def write_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, Any], *, datasets: list[str],
                  chunk_size: int) -> Path:
    """Write the GGUF imatrix file (atomically); expert tensors get one row and one count per expert."""
    dense = [int(c) for c in counts.values() if np.ndim(c) == 0]
    chunks = max(dense) // chunk_size if dense else 0
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="")
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, datasets)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunks)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for name in sorted(sums):
            n_mat = 1 if sums[name].ndim == 1 else sums[name].shape[0]
            w.add_tensor(f"{name}.in_sum2", sums[name].reshape(n_mat, -1).astype(np.float32))
            w.add_tensor(f"{name}.counts", np.asarray(counts[name], dtype=np.float32).reshape(n_mat, 1))
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
