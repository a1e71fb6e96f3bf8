"""What one AWQ quantization takes, and what the checkpoint's headers say about it: the layers are GPTQ's (the
decoder's Linear layers), the packing is AWQ's GEMM layout (``qweight [in, out/8]``, ``qzeros [groups, out/8]`` int32,
``scales [groups, out]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantkit.backends.gptq.options import estimate_with, quant_method_of
from quantkit.safetensors_io import read_header
from quantkit.source import Checkpoint

GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels (vLLM's Marlin, torch's CPU int4pack) take
AWQ_EXTRA_HINT = "pip install 'quantkit-ru[gptq]' (AWQ is made by GPTQModel)"


class AWQOptions(BaseModel):
    """Options of one AWQ quantization (4-bit, GEMM layout: what vLLM, SGLang and transformers load)."""

    model_config = ConfigDict(extra="forbid")

    bits: int = Field(4, description="bits per weight: AWQ's GEMM kernels take 4",
                      json_schema_extra={"cli": ["--bits", "-b"]})
    group_size: int = Field(128, description="columns sharing one scale/zero",
                            json_schema_extra={"cli": ["--group-size", "-g"]})
    zero_point: bool = Field(True, description="asymmetric groups with a zero point (AutoAWQ's default)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v != 4:
            raise ValueError(f"--bits must be 4 for AWQ (its GEMM kernels are 4-bit), not {v}; use gptq for 2, 3 or 8")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} for AWQ, not {v}")
        return v

    @property
    def quant(self) -> str:
        """The artifact's name: ``4bit-g128``, with ``-sym`` when there is no zero point."""
        return f"{self.bits}bit-g{self.group_size}" + ("" if self.zero_point else "-sym")


def estimate_size(ckpt: Checkpoint, opts: AWQOptions) -> int:
    """Bytes of the saved model: packed weights and zeros (int32) and 16-bit scales of the quantized layers, the
    rest as in the source."""
    return estimate_with(ckpt, lambda out_f, in_f: out_f * in_f * opts.bits // 8
                         + max(1, in_f // opts.group_size) * out_f * (opts.bits / 8 + 2))


def bits_per_weight(folder: Path) -> float | None:
    """Stored bits per weight over the quantized layers (qweight + qzeros + scales), from the headers."""
    tensors: dict[str, Any] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(read_header(file)[0])
    stored = weights = 0
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        base = name.removesuffix(".qweight")
        parts = [tensors.get(f"{base}.{s}") for s in ("qweight", "qzeros", "scales")]
        if any(p is None for p in parts):
            continue
        stored += sum(p.nbytes for p in parts) * 8
        weights += parts[0].shape[0] * parts[2].shape[1]
    return round(stored / weights, 4) if weights else None


def is_awq_folder(path: Path) -> bool:
    """A model folder whose config.json says ``quant_method: awq``."""
    return quant_method_of(path) == "awq"
