"""HF safetensors → GGUF, written with `gguf`'s writer, one tensor at a time.

Matches what llama.cpp's ``convert_hf_to_gguf.py`` writes for Llama (Llama-3, Llama-3.1 with its ``rope_freqs``),
Qwen2 (attention biases, tied embeddings) and Mistral: the same tensor names, types, shapes and bytes, and the
same metadata keys. Tensors are streamed: the header is written from the safetensors headers alone, then each
tensor is read, transformed (Q/K rows permuted for llama.cpp's rope layout) and written before the next is read,
so peak memory is about one tensor whatever the model size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantkit import __version__
from quantkit.backends.gguf.tokenizer import add_vocab
from quantkit.errors import QuantkitError
from quantkit.safetensors_io import TensorSource, to_f32
from quantkit.source import Checkpoint
from quantkit.workspace import check_disk, staging_dir

ARCHES = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
}
OUTTYPES = {
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
}


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # returns the data already in the output storage type


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either transformers 5's ``rope_parameters`` or the older top-level keys."""
    params = dict(config.get("rope_parameters") or {})
    if isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    scaling = config.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if v is not None})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    return params


def llama3_rope_factors(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp uses for Llama-3.1's rope scaling.

    Computed in torch float32 like llama.cpp's converter, so the values are bit-identical to its output.
    """
    import torch

    base = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K row order → llama.cpp's interleaved order (works on raw bf16 bits too)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Converter:
    """Plans and writes the GGUF for one checkpoint."""

    def __init__(self, ckpt: Checkpoint, outtype: str = "bf16") -> None:
        if ckpt.architecture not in ARCHES:
            raise QuantkitError(f"unsupported architecture {ckpt.architecture}",
                                f"supported: {', '.join(ARCHES)}")
        if outtype not in OUTTYPES:
            raise QuantkitError(f"unknown --outtype {outtype}", f"choose one of {', '.join(OUTTYPES)}")
        self.ckpt = ckpt
        self.hp = ckpt.config
        self.arch = ARCHES[ckpt.architecture]
        self.ftype, self.qtype = OUTTYPES[outtype]
        self.n_head = int(self.hp["num_attention_heads"])
        self.n_kv = int(self.hp.get("num_key_value_heads") or self.n_head)
        self.n_layer = int(self.hp["num_hidden_layers"])
        self.head_dim = int(self.hp.get("head_dim") or self.hp["hidden_size"] // self.n_head)
        self.rope = rope_parameters(self.hp)
        self.tmap = gguf.get_tensor_name_map(self.arch, self.n_layer)
        self.src: TensorSource = ckpt.tensors

    # -- metadata ----------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(self.ckpt.name)
        w.add_size_label(gguf.size_label(self.ckpt.n_params, 0, 0, 0))
        if self.ckpt.license:
            w.add_license(self.ckpt.license)
        w.add_languages(["ru"])
        if self.ckpt.hub_id:
            w.add_source_repo_url(f"https://huggingface.co/{self.ckpt.hub_id}")
        w.add_quantized_by(f"quantkit {__version__}")
        w.add_block_count(self.n_layer)
        if hp.get("max_position_embeddings") is not None:
            w.add_context_length(int(hp["max_position_embeddings"]))
        w.add_embedding_length(int(hp["hidden_size"]))
        w.add_feed_forward_length(int(hp["intermediate_size"]))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_kv)
        rope_type = str(self.rope.get("rope_type", "default")).lower()
        factor = self.rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(self.rope["original_max_position_embeddings"])
        elif rope_type not in ("default", "llama3"):
            raise QuantkitError(f"unsupported RoPE scaling type {rope_type}",
                                "supported: none, linear, yarn, llama3")
        if self.rope.get("rope_theta") is not None:
            w.add_rope_freq_base(self.rope["rope_theta"])
        w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
        if hp.get("head_dim") is not None:
            w.add_key_length(int(hp["head_dim"]))
            w.add_value_length(int(hp["head_dim"]))
        w.add_file_type(self.ftype)
        if self.arch == gguf.MODEL_ARCH.LLAMA:
            w.add_vocab_size(int(hp["vocab_size"]))
            w.add_rope_dimension_count(self.head_dim)
        add_vocab(w, self.ckpt.path, hp)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # -- tensors -----------------------------------------------------------------------------------------
    def plan(self) -> list[PlannedTensor]:
        out: list[PlannedTensor] = []
        if self.arch == gguf.MODEL_ARCH.LLAMA and str(self.rope.get("rope_type", "")).lower() == "llama3":
            factors = llama3_rope_factors(self.rope, self.head_dim)
            out.append(PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                     factors.shape, gguf.GGMLQuantizationType.F32, lambda f=factors: f))
        for name in self.src.names():
            if name.endswith(("rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")):
                continue
            tied = self.hp.get("tie_word_embeddings") and "model.embed_tokens.weight" in self.src
            if name == "lm_head.weight" and tied:
                continue
            new = self.tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise QuantkitError(f"cannot map tensor {name} to a GGUF name",
                                    "the checkpoint has tensors this architecture does not use")
            info = self.src.tensors[name]
            qtype = self.qtype
            if len(info.shape) <= 1 or new.endswith("_norm.weight"):
                qtype = gguf.GGMLQuantizationType.F32
            out.append(PlannedTensor(new, info.shape, qtype, self._loader(name, qtype)))
        return out

    def _loader(self, name: str, qtype: gguf.GGMLQuantizationType) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            info = self.src.tensors[name]
            data = self.src.read(name)
            if self.arch == gguf.MODEL_ARCH.LLAMA:
                if name.endswith(("q_proj.weight", "q_proj.bias")):
                    data = _permute(data, self.n_head)
                elif name.endswith(("k_proj.weight", "k_proj.bias")):
                    data = _permute(data, self.n_kv)
            if qtype == gguf.GGMLQuantizationType.BF16 and info.dtype == "BF16":
                return np.ascontiguousarray(data)  # bit-exact copy, no float round trip
            f32 = to_f32(data, info.dtype)
            if qtype == gguf.GGMLQuantizationType.F32:
                return np.ascontiguousarray(f32)
            return gguf.quants.quantize(f32, qtype)

        return load

    @staticmethod
    def _storage(qtype: gguf.GGMLQuantizationType) -> tuple[type, int]:
        return {gguf.GGMLQuantizationType.BF16: (np.uint16, 2), gguf.GGMLQuantizationType.F16: (np.float16, 2),
                gguf.GGMLQuantizationType.F32: (np.float32, 4)}[qtype]

    def write(self, out: Path, *, split_max_size: int = 0,
              on_tensor: Callable[[str, int], None] | None = None) -> list[Path]:
        """Write the GGUF (split into parts when `split_max_size` > 0); returns the files, first part first.

        Everything is written into a hidden ``.partial`` folder beside `out` and moved into place when complete.
        """
        planned = self.plan()
        total = 0
        for t in planned:
            total += int(np.prod(t.shape, dtype=np.int64)) * self._storage(t.qtype)[1]
        check_disk(out.parent, int(total * 1.02) + (64 << 20), out.name)
        with staging_dir(out) as stage:
            writer = gguf.GGUFWriter(stage.work / out.name, gguf.MODEL_ARCH_NAMES[self.arch],
                                     split_max_size=split_max_size)
            self.write_metadata(writer)
            for t in planned:
                dtype, size = self._storage(t.qtype)
                writer.add_tensor_info(t.name, t.shape, np.dtype(dtype),
                                       int(np.prod(t.shape, dtype=np.int64)) * size, raw_dtype=t.qtype)
            writer.write_header_to_file(stage.work / out.name)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in planned:
                data = t.load()
                writer.write_tensor_data(data)
                if on_tensor:
                    on_tensor(t.name, data.nbytes)
                del data
            writer.close()
        return stage.files


def gguf_tensor_bytes(ckpt: Checkpoint, outtype: str = "bf16") -> int:
    """The size the converted GGUF's tensor data will have."""
    conv = Converter(ckpt, outtype)
    return sum(int(np.prod(t.shape, dtype=np.int64)) * conv._storage(t.qtype)[1] for t in conv.plan())


def iter_parts(first: Path) -> Iterator[Path]:
    """Every file of a (possibly split) GGUF, given its first part or single file."""
    import re

    m = re.match(r"^(.*)-00001-of-(\d{5})\.gguf$", first.name)
    if not m:
        yield first
        return
    for i in range(1, int(m.group(2)) + 1):
        yield first.with_name(f"{m.group(1)}-{i:05d}-of-{m.group(2)}.gguf")
