"""What one FP8 quantization takes, and what can be said about it from the checkpoint's headers alone: which
tensors become fp8, how the output is laid out in shards, its size and bits per weight, and the
``quantization_config`` that compressed-tensors (vLLM, transformers) reads."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from quantkit.safetensors_io import DTYPES, TensorInfo
from quantkit.source import TOKENIZER_FILES, Checkpoint

FP8_EXTRA_HINT = "pip install 'quantkit-ru[fp8]'"
CT_VERSION = "0.20.0"  # the compressed-tensors version written when it is not installed here
SCHEME = "FP8_DYNAMIC"
FP8_DTYPE = "F8_E4M3"
INDEX = "model.safetensors.index.json"
# copied from the source as they are
COPIED_FILES = (*TOKENIZER_FILES, "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
                "preprocessor_config.json", "processor_config.json")
# the Linear layers of a decoder layer (canonical names): attention and MLP projections, MLA's, routed and shared
# experts; not the MoE router (``mlp.gate``), norms, embeddings or the output head
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.([\w.]+\.)?\w+_proj(_with_mqa)?\.weight$")
ROUTER = re.compile(r"^model\.layers\.\d+\.mlp\.gate\.weight$")
SOURCE_DTYPES = ("BF16", "F16", "F32")  # a weight's scale is stored in the weight's own dtype
GB = 10**9


class FP8Options(BaseModel):
    """Options of one FP8 quantization."""

    model_config = ConfigDict(extra="forbid")

    scheme: Literal["FP8_DYNAMIC"] = Field(
        SCHEME, description="FP8_DYNAMIC: fp8 (E4M3) weights with one scale per output channel, activations "
                            "quantized per token at run time (W8A8, what vLLM serves); needs no calibration")
    shard_size: float = Field(5.0, gt=0, description="largest output shard in GB (10^9 bytes), like transformers'")

    @property
    def quant(self) -> str:
        return self.scheme


@dataclass(frozen=True)
class Output:
    """One output tensor: its name, safetensors dtype, shape and size."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Item:
    """One source tensor and what it becomes: itself (copied), or an fp8 weight and its scale."""

    source: TensorInfo
    outputs: tuple[Output, ...]

    @property
    def quantized(self) -> bool:
        return len(self.outputs) == 2

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


def quantized_names(ckpt: Checkpoint) -> set[str]:
    """The checkpoint's own names of the weights that become fp8."""
    out = set()
    for canonical, name in ckpt.canonical_names.items():
        info = ckpt.tensors.tensors[name]
        if LINEAR.match(canonical) and len(info.shape) == 2 and info.dtype in SOURCE_DTYPES:
            out.add(name)
    return out


def plan_items(ckpt: Checkpoint) -> list[Item]:
    """Every source tensor in file order, and what it becomes."""
    chosen = quantized_names(ckpt)
    items = []
    for info in sorted(ckpt.tensors.tensors.values(), key=lambda i: (i.file.name, i.start)):
        if info.name in chosen:
            rows, cols = info.shape
            outputs = (Output(info.name, FP8_DTYPE, (rows, cols)),
                       Output(info.name.removesuffix("weight") + "weight_scale", info.dtype, (rows, 1)))
        else:
            outputs = (Output(info.name, info.dtype, info.shape),)
        items.append(Item(info, outputs))
    return items


def shard_items(items: list[Item], shard_size: float) -> list[list[Item]]:
    """Items split into shards of at most `shard_size` GB (a larger single item gets a shard of its own)."""
    limit = int(shard_size * GB)
    shards: list[list[Item]] = [[]]
    used = 0
    for item in items:
        if shards[-1] and used + item.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += item.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' shard names."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def bits_per_weight(items: list[Item]) -> float | None:
    """Stored bits per weight over the quantized layers (fp8 weight + one scale per row)."""
    quantized = [i for i in items if i.quantized]
    weights = sum(i.outputs[0].nbytes for i in quantized)
    return round(sum(i.nbytes for i in quantized) * 8 / weights, 4) if weights else None


def estimate_size(ckpt: Checkpoint) -> int:
    """Bytes of the saved weights."""
    return sum(i.nbytes for i in plan_items(ckpt))


def approx_size(n_params: int | None) -> int | None:
    """The saved size from the parameter count alone (a model not here yet): decoder Linear layers are ~87% of a
    Llama-style model's parameters (1 byte each in fp8), the rest stays 16-bit."""
    return int(n_params * (0.87 * 1 + 0.13 * 2)) if n_params else None


def ignored_modules(ckpt: Checkpoint) -> list[str]:
    """What stays unquantized, as llm-compressor names it in ``ignore``: the output head, a MoE router, and
    whatever lies outside the text model (a vision tower and its projector)."""
    ignore = ["lm_head"]
    if any(ROUTER.match(c) for c in ckpt.canonical_names):
        ignore.append("re:.*mlp.gate$")
    text = set(ckpt.canonical_names.values())
    roots: list[str] = []
    for name in ckpt.tensors.names():
        if name in text or name.endswith(("rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")):
            continue
        parts = name.split(".")
        root = parts[1] if parts[0] == "model" and len(parts) > 2 else parts[0]
        if root not in roots:
            roots.append(root)
    return ignore + [f"re:.*{re.escape(root)}.*" for root in roots]


def quantization_config(ignore: list[str], version: str | None) -> dict[str, Any]:
    """The ``quantization_config`` llm-compressor's oneshot FP8_DYNAMIC writes (compressed-tensors format)."""
    def args(**kw: Any) -> dict[str, Any]:
        full = {"actorder": None, "block_structure": None, "group_size": None, "num_bits": 8, "observer_kwargs": {},
                "scale_dtype": None, "symmetric": True, "type": "float", "zp_dtype": None, **kw}
        return dict(sorted(full.items()))

    group = {"format": "float-quantized",
             "input_activations": args(dynamic=True, observer=None, strategy="token"),
             "output_activations": None, "targets": ["Linear"],
             "weights": args(dynamic=False, observer="memoryless_minmax", strategy="channel")}
    return {"config_groups": {"group_0": {k: group[k] for k in sorted(group)}}, "format": "float-quantized",
            "global_compression_ratio": None, "ignore": list(ignore), "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": version or CT_VERSION}


def read_quantization_config(path: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a model folder, or None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        qcfg = json.loads(config.read_text(encoding="utf-8")).get("quantization_config")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return qcfg if isinstance(qcfg, dict) else None


def is_fp8_folder(path: Path) -> bool:
    """A model folder whose config.json says compressed-tensors with 8-bit float weights."""
    qcfg = read_quantization_config(path)
    if not qcfg or qcfg.get("quant_method") != "compressed-tensors":
        return False
    groups = qcfg.get("config_groups")
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)] \
        if isinstance(groups, dict) else []
    return bool(weights) and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)
