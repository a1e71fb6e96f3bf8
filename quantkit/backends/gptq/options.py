"""What one GPTQ quantization takes, and what can be said about it from the checkpoint's headers alone: which
layers are quantized, which group sizes work, how big the output is."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantkit.errors import QuantkitError
from quantkit.safetensors_io import read_header
from quantkit.source import TOKENIZER_FILES, Checkpoint

GPTQ_EXTRA_HINT = "pip install 'quantkit-ru[gptq]'"
ALLOWED_BITS = (2, 3, 4, 8)
# Group sizes we suggest (GPTQModel accepts any divisor; kernels are built for powers of two).
COMMON_GROUPS = (16, 32, 64, 128, 256, 512, 1024)
# Files copied from the source checkpoint as they are (GPTQModel rewrites its own versions of some).
COPIED_FILES = (*TOKENIZER_FILES, "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")

CPU_INT4_GROUPS = (32, 64, 128)  # group sizes GPTQModel's CPU int4pack kernel handles


class GPTQOptions(BaseModel):
    """Options of one GPTQ quantization."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, description="bits per weight: 2, 3, 4 or 8", json_schema_extra={"cli": ["--bits", "-b"]})
    group_size: int = Field(128, description="columns sharing one scale/zero; -1 = one group per output column",
                            json_schema_extra={"cli": ["--group-size", "-g"]})
    desc_act: bool = Field(False, description="quantize columns in order of decreasing activation (act-order)")
    sym: bool = Field(True, description="symmetric quantization (no per-group zero offset)")
    damp: float = Field(0.05, description="damp_percent: fraction of the mean Hessian diagonal added to it")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in ALLOWED_BITS:
            raise ValueError(f"--bits must be one of {', '.join(map(str, ALLOWED_BITS))}, not {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError(f"--group-size must be a positive number of columns or -1, not {v}")
        return v

    @field_validator("damp")
    @classmethod
    def _damp(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError(f"--damp must be between 0 and 1 (exclusive), not {v}")
        return v

    @property
    def quant(self) -> str:
        """The artifact's name: ``4bit-g128``, ``4bit-g-1``, with ``-desc`` / ``-asym`` when not the default."""
        name = f"{self.bits}bit-g{self.group_size}"
        return name + ("-desc" if self.desc_act else "") + ("-asym" if not self.sym else "")


# -- pure helpers (no heavy imports) ------------------------------------------------------------------------

def quantized_layers(ckpt: Checkpoint) -> dict[str, tuple[int, int]]:
    """Every Linear weight GPTQModel will quantize → ``(out_features, in_features)``, from the safetensors headers."""
    pattern = ckpt.arch.gptq_layers
    return {name: (info.shape[0], info.shape[1]) for name, info in ckpt.tensors.tensors.items()
            if pattern.match(name) and len(info.shape) == 2}


def check_group_size(ckpt: Checkpoint, group_size: int) -> None:
    """Refuse a group size that does not divide every quantized layer's input width, naming the layer.

    GPTQModel quantizes such a model, but the CPU int4 kernel then fails to load it (see FACTS.md).
    """
    layers = quantized_layers(ckpt)
    if not layers:
        raise QuantkitError(f"{ckpt.name} has no decoder Linear layers that GPTQ can quantize",
                            "GPTQ quantizes the decoder layers of the architectures `quantkit models` lists")
    if group_size == -1:
        return
    widths = {name: shape[1] for name, shape in layers.items()}
    bad = next((n for n, w in widths.items() if w % group_size), None)
    if bad is None:
        return
    good = [g for g in COMMON_GROUPS if all(w % g == 0 for w in widths.values())]
    layer = re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", bad.removesuffix(".weight"))
    raise QuantkitError(
        f"--group-size {group_size} does not divide the input width {widths[bad]} of {layer}",
        f"group sizes that work for {ckpt.name}: {', '.join(map(str, good))}, or -1 for one group per column",
    )


def estimate_with(ckpt: Checkpoint, layer_bytes: Callable[[int, int], float]) -> int:
    """Bytes of a saved model whose quantized layers (out × in) take `layer_bytes(out, in)` each and whose other
    tensors (embeddings, norms, output head) stay as in the source."""
    layers = quantized_layers(ckpt)
    return int(sum(layer_bytes(*layers[name]) if name in layers else info.nbytes
                   for name, info in ckpt.tensors.tensors.items()))


def estimate_size(ckpt: Checkpoint, opts: GPTQOptions) -> int:
    """Bytes of the saved model: packed weights, fp16 scales, packed zeros and g_idx of quantized layers, the rest
    as in the source."""

    def layer(out_f: int, in_f: int) -> float:
        groups = 1 if opts.group_size == -1 else in_f // opts.group_size
        # qweight, scales (fp16) + qzeros, g_idx
        return out_f * in_f * opts.bits // 8 + groups * out_f * (2 + opts.bits / 8) + in_f * 4

    return estimate_with(ckpt, layer)


def bits_per_weight(folder: Path) -> float | None:
    """Stored bits per weight over the quantized layers (qweight + qzeros + scales + g_idx), from the headers."""
    stored = weights = 0
    tensors: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(read_header(file)[0])
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        base = name.removesuffix(".qweight")
        parts = [tensors.get(f"{base}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")]
        if any(p is None for p in parts):
            continue
        in_f, out_f = parts[3].shape[0], parts[2].shape[1]
        stored += sum(p.nbytes for p in parts) * 8
        weights += in_f * out_f
    return round(stored / weights, 4) if weights else None


def quant_method_of(path: Path) -> str | None:
    """The ``quant_method`` a model folder's config.json names, or None (no config, none named, unreadable)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        qcfg = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return qcfg.get("quant_method") if isinstance(qcfg, dict) else None


def is_gptq_folder(path: Path) -> bool:
    """A model folder whose config.json says ``quant_method: gptq``."""
    return quant_method_of(path) == "gptq"
