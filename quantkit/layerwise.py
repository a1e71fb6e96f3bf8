"""A transformers forward pass that holds one decoder layer in memory at a time.

The model is built on the ``meta`` device; each layer is materialised, filled from the safetensors files,
run over every row, and dropped before the next. Hidden states for all rows stay in memory
(rows × length × hidden in bf16: 64 × 512 × 4096 × 2 B = 268 MB for an 8B model), the weights never do.
Used for the importance matrix and the bf16 reference logits, so a 32B model needs a few GB, not 64.

The bf16 weights are computed with in float32 by default: that is the model's exact function, free of the
activation rounding of a bf16 forward (which alone moves logits by ~1e-2 and flips near-tied top-1 tokens), and it
is what llama.cpp does with a BF16 GGUF.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from quantkit.source import Checkpoint

HEAD_SLICE = 16384  # vocabulary rows of the output head converted to float32 at a time


def _torch() -> Any:
    import torch

    threads = int(os.environ.get("QUANTKIT_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return torch


def device() -> str:
    torch = _torch()
    return "cuda" if torch.cuda.is_available() else "cpu"


class LayerwiseModel:
    """Runs the checkpoint's layers one by one over a batch of token rows."""

    def __init__(self, ckpt: Checkpoint, *, dtype: str = "float32") -> None:
        torch = _torch()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt = ckpt
        self.arch = ckpt.arch
        self.dtype = getattr(torch, dtype)
        self.device = device()
        self.config = self.arch.text_config(AutoConfig.from_pretrained(ckpt.path))
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.prefix = "model."
        self.n_layers = len(self.model.model.layers)

    def _load(self, module: Any, prefix: str, rows: Any = None) -> Any:
        """Materialise `module` from the checkpoint; with `rows` (an embedding), its weight holds only those rows.
        The converted tensors are assigned, not copied into the module: with the numpy widening (`_widen`) a
        Qwen2.5-0.5B layer loads in ~12 ms instead of 35-120 ms (2 cores, shared)."""
        torch = self._torch = _torch()
        module = module.to_empty(device=self.device)
        names = self.ckpt.canonical_names
        state = {}
        for name in module.state_dict():  # parameters and persistent buffers (a router's score correction)
            full = prefix + name
            if rows is not None and name == "weight":
                continue  # set below
            if full not in names:
                if full == "lm_head.weight":
                    full = "model.embed_tokens.weight"  # tied embeddings
                elif (fused := self.arch.fused_parameter(full, self.ckpt.read_f32)) is not None:
                    state[name] = torch.from_numpy(fused).to(self.dtype)
                    continue
                else:
                    raise KeyError(full)
            state[name] = self._tensor(full)
        state = {k: v.to(self.device) for k, v in state.items()}
        module.load_state_dict(state, strict=False, assign=True)  # the converted tensors themselves, not a copy
        if rows is not None:
            module.weight = torch.nn.Parameter(self._rows(prefix + "weight", rows).to(self.device),
                                               requires_grad=False)
            module.padding_idx = None  # it only masks gradients, and indexes the full table
        self.arch.fix_buffers(prefix.removeprefix(self.prefix).rstrip("."), module)
        if self.device == "cpu" and self.dtype == torch.float32 and prefix != "lm_head.":  # the head: see below
            _onednn_linears(module)
        return module

    def _tensor(self, name: str) -> Any:
        """A checkpoint tensor in the compute dtype."""
        torch = self._torch
        hf_name = self.ckpt.canonical_names[name]
        kind = self.ckpt.tensors.tensors[hf_name].dtype
        if kind not in ("BF16", "F16"):
            return torch.from_numpy(self.ckpt.read_f32(name)).to(self.dtype)
        return self._widen(self._raw(hf_name, kind), kind)

    def _raw(self, hf_name: str, kind: str) -> np.ndarray:
        """A BF16 tensor widened to float32 is read straight from the mapped file (no copy first); anything torch
        converts itself is read into a writable array."""
        if kind == "BF16" and self.dtype == self._torch.float32:
            return self.ckpt.tensors.view(hf_name)
        return self.ckpt.tensors.read(hf_name)

    def _widen(self, raw: np.ndarray, kind: str, out: Any = None) -> Any:
        """BF16 / F16 storage in the compute dtype (into `out` when given). BF16 → float32 is a 16-bit shift, which
        numpy does ~4× faster than torch's conversion here (1.7 vs 8.1 ms for a 4864 × 896 matrix on 2 cores)."""
        torch = self._torch
        if kind == "BF16" and self.dtype == torch.float32:
            if out is None:
                return torch.from_numpy((raw.astype(np.uint32) << 16).view(np.float32))
            np.left_shift(raw, np.uint32(16), out=out.numpy().view(np.uint32))
            return out
        t = torch.from_numpy(raw)
        t = t.view(torch.bfloat16) if kind == "BF16" else t
        return t.to(self.dtype) if out is None else out.copy_(t)

    def _rows(self, name: str, rows: Any) -> Any:
        """Rows of a 2-D checkpoint tensor (the embedding's, for the tokens at hand), read through a memory map:
        the whole of it in float32 is 0.5 GB for a 152k vocabulary, and a 0.25 s conversion."""
        hf_name = self.ckpt.canonical_names[name]
        kind = self.ckpt.tensors.tensors[hf_name].dtype
        if kind not in ("BF16", "F16"):
            return self._torch.from_numpy(self.ckpt.read_f32(name)[rows.numpy()]).to(self.dtype)
        return self._widen(np.ascontiguousarray(self.ckpt.tensors.view(hf_name)[rows.numpy()]), kind)

    def _sliced_head(self) -> Callable[[Any], Any] | None:
        """The output head as float32 mat-muls over slices of the vocabulary, its weight kept in its bf16 / f16
        storage: a float32 copy of a 152k × 896 head is 0.5 GB, and loading it as a module held three copies at
        once. Each slice is widened into one reused buffer and multiplied on oneDNN (see `_onednn_linears`): 0.63 s
        instead of 1.23 s for 256 positions × 152k × 896 on 2 cores. None where the plain module is needed (a biased
        head, another device or dtype)."""
        torch = self._torch = _torch()
        name = "lm_head.weight" if "lm_head.weight" in self.ckpt.canonical_names else "model.embed_tokens.weight"
        hf_name = self.ckpt.canonical_names.get(name)
        if (hf_name is None or self.device != "cpu" or self.dtype != torch.float32
                or getattr(self.model.lm_head, "bias", None) is not None
                or self.ckpt.tensors.tensors[hf_name].dtype not in ("BF16", "F16")):
            return None
        kind = self.ckpt.tensors.tensors[hf_name].dtype
        raw = self._raw(hf_name, kind)
        vocab = raw.shape[0]
        buf = torch.empty(min(HEAD_SLICE, vocab), raw.shape[1], dtype=torch.float32)
        op = _onednn_op()

        def logits(x: Any) -> Any:
            flat = x.reshape(-1, x.shape[-1]).float().contiguous()
            out = torch.empty(flat.shape[0], vocab, dtype=torch.float32)
            for start in range(0, vocab, HEAD_SLICE):
                n = min(HEAD_SLICE, vocab - start)
                part = self._widen(raw[start : start + n], kind, buf[:n])
                out[:, start : start + n] = op(flat, part, None, "none", [], "") if op else flat @ part.T
            return out.reshape(*x.shape[:-1], vocab)

        return logits

    def _mask(self, cache: dict[tuple[str, int], Any], kind: str, h: Any, pos: Any) -> Any:
        """The attention mask transformers builds for a layer of this type (None: plain causal attention)."""
        key = (kind, h.shape[0])
        if key not in cache:
            from transformers import masking_utils

            build = (masking_utils.create_sliding_window_causal_mask if kind == "sliding_attention"
                     else masking_utils.create_causal_mask)
            cache[key] = build(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                               position_ids=pos)
        return cache[key]

    def run(
        self,
        rows: np.ndarray,
        *,
        hooks: Callable[[int, Any], list[Any]] | None = None,
        logits: bool = False,
        first: int = 0,
        on_layer: Callable[[int], None] | None = None,
        batch: int = 4,
    ) -> Iterator[np.ndarray]:
        """Forward every row; `hooks(layer_index, layer)` may register hooks (removed after the layer).

        With `logits`, yields float32 logits ``[len(row) - first, vocab]`` per row, in order.
        """
        torch = _torch()
        ids = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=self.device)
        with torch.no_grad():
            emb = self.model.model.embed_tokens
            if isinstance(emb, torch.nn.Embedding) and self.device == "cpu":  # only the rows of the tokens at hand
                used, local = torch.unique(ids, return_inverse=True)
                emb = self._load(emb, "model.embed_tokens.", rows=used)
            else:
                local, emb = ids, self._load(emb, "model.embed_tokens.")
            hidden = [emb(local[i : i + batch]) for i in range(0, len(ids), batch)]
            self.model.model.embed_tokens = emb.to("meta")
            rotary_cls = type(self.model.model.rotary_emb)
            with torch.device(self.device):
                rotary = rotary_cls(config=self.config)
            pos = torch.arange(ids.shape[1], device=self.device)[None]
            types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * self.n_layers)
            per_type = "layer_type" in inspect.signature(rotary.forward).parameters
            rope = {t: rotary(hidden[0], pos, t) if per_type else rotary(hidden[0], pos) for t in set(types)}
            masks: dict[tuple[str, int], Any] = {}
            for i in range(self.n_layers):
                layer = self._load(self.model.model.layers[i], f"model.layers.{i}.")
                handles = hooks(i, layer) if hooks else []
                for b, h in enumerate(hidden):
                    mask = self._mask(masks, types[i], h, pos)
                    hidden[b] = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=rope[types[i]])
                for handle in handles:
                    handle.remove()
                self.model.model.layers[i] = layer.to("meta")
                del layer
                if on_layer:
                    on_layer(i)
            if not logits:
                return
            norm = self._load(self.model.model.norm, "model.norm.")
            sliced = self._sliced_head()
            head = None if sliced is not None else self._load(self.model.lm_head, "lm_head.")
            for h in hidden:
                x = norm(h[:, first:])
                out = sliced(x) if sliced is not None else head(x).float()  # type: ignore[misc]
                yield from out.cpu().numpy()


def _onednn_linears(module: Any) -> None:
    """Run a loaded module's float32 ``nn.Linear`` layers on oneDNN's GEMM with the weights as they are: torch's
    default float32 GEMM (MKL) ran at 40% of its speed here (178 vs 435 GFLOPS on 2 AMD Zen 4 cores), with the same
    float32 accuracy (relative error 4e-7 against float64). The output head is no module here: `_sliced_head` calls
    the same op per vocabulary slice, so no float32 copy of a 152k-row weight is ever whole."""
    torch = _torch()
    op = _onednn_op()
    if op is None:
        return
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear) and sub.weight.dtype == torch.float32:
            sub.forward = functools.partial(_onednn_linear, op, sub)


def _onednn_op() -> Any:
    """oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``), or None where this torch build lacks it."""
    torch = _torch()
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    return op if op is not None and torch.backends.mkldnn.is_available() else None


def _onednn_linear(op: Any, linear: Any, x: Any) -> Any:
    return op(x, linear.weight, linear.bias, "none", [], "")


def hf_module_to_gguf(ckpt: Checkpoint) -> Callable[[str], str | None]:
    """Maps ``model.layers.0.self_attn.q_proj`` → ``blk.0.attn_q.weight`` (the names llama.cpp's imatrix uses)."""
    import gguf

    tmap = gguf.get_tensor_name_map(ckpt.arch.gguf_model_arch(), ckpt.arch.n_layer)

    def mapper(module_name: str) -> str | None:
        new = tmap.get_name(module_name + ".weight", try_suffixes=(".weight",))
        return new

    return mapper
