"""What `quantkit exl2` takes (bitrates, head bits, calibration rows) and what follows from it: folder names
and size estimates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantkit.backends.base import JobContext
from quantkit.source import Checkpoint

INSTALL_HINT = "pip install 'quantkit-ru[exl2]'"
NO_CUDA = "EXL2 needs an NVIDIA GPU with CUDA (exllamav2 is CUDA-only); none found"
CONFIG_FIX_VERSION = 1  # bump when fix_config changes what the converter sees
HEAD_BITS = (2, 3, 4, 5, 6, 8)  # exllamav2's qparams_headoptions
# Average bits of the head layer per -hb option (mix of bit widths plus 4-bit scales per group), for size estimates.
HEAD_BPW = {2: 2.73, 3: 3.28, 4: 4.43, 5: 5.18, 6: 6.33, 8: 8.03}


class EXL2Options(BaseModel):
    """Options of `quantkit exl2` (and of an ``exl2`` entry in a recipe)."""

    model_config = ConfigDict(extra="forbid")

    bits: list[float] = Field(default_factory=lambda: [4.0, 5.0, 6.5],
                              description="target bits per weight of the decoder layers, one model per value",
                              json_schema_extra={"cli": ["--bits", "-b"]})
    head_bits: int = Field(6, description="bits of the output head: 2, 3, 4, 5, 6 or 8")
    rows: int | None = Field(None, ge=1, description="calibration rows for quantizing (default: --calib-samples)")
    length: int | None = Field(None, ge=16, description="tokens per calibration row (default: --calib-seq-len)")
    measure_rows: int | None = Field(None, ge=1, description="rows for the measurement pass (default: rows)")
    measure_length: int | None = Field(None, ge=16, description="tokens per measurement row (default: length)")
    shard_size: int = Field(8192, ge=0, description="largest output shard in MB (0: one file)")

    @field_validator("bits", mode="before")
    @classmethod
    def _parse_bits(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return [float(p) for p in parts]
            except ValueError as exc:
                raise ValueError(f"bits must be numbers like 4.0,5.0,6.5, not '{value}'") from exc
        if isinstance(value, int | float):
            return [float(value)]
        return value

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one bitrate, e.g. 4.0")
        for b in value:
            if not 2.0 <= b <= 8.0:
                raise ValueError(f"{b:g} bits per weight is outside what exllamav2 can reach (2.0 to 8.0)")
        return sorted({round(float(b), 3) for b in value})

    @field_validator("head_bits")
    @classmethod
    def _check_head_bits(cls, value: int) -> int:
        if value not in HEAD_BITS:
            raise ValueError(f"head bits must be one of {', '.join(map(str, HEAD_BITS))}, not {value}")
        return value


@dataclass(frozen=True)
class Settings:
    """The options with defaults filled in from the job (calibration rows and length)."""

    rows: int
    length: int
    measure_rows: int
    measure_length: int

    @property
    def tokens_needed(self) -> int:
        """The converter cuts rows × length tokens from the concatenated parquet, for each pass."""
        return max(self.rows * self.length, self.measure_rows * self.measure_length)


def settings(ctx: JobContext, options: EXL2Options) -> Settings:
    rows = options.rows or ctx.calib_samples
    length = options.length or ctx.calib_seq_len
    return Settings(rows, length, options.measure_rows or rows, options.measure_length or length)


def bits_name(bits: float) -> str:
    """The folder (and quant) name of a bitrate: 4.0 → ``4.0bpw``, 4.125 → ``4.125bpw``."""
    text = f"{bits:.3f}".rstrip("0")
    return f"{text}0bpw" if text.endswith(".") else f"{text}bpw"


def estimate_size(ckpt: Checkpoint, bits: float, head_bits: int) -> int:
    """About the bytes of an EXL2 model: linear weights at `bits`, the head at `head_bits`, the rest in fp16."""
    total = 0.0
    head_bpw = HEAD_BPW.get(head_bits, head_bits + 0.3)
    has_head = any(name.endswith("lm_head.weight") for name in ckpt.tensors.tensors)
    for name, info in ckpt.tensors.tensors.items():
        n = int(np.prod(info.shape, dtype=np.int64))
        if name.endswith("embed_tokens.weight"):
            total += n * 2
            if not has_head:  # tied embeddings: exllamav2 still writes a quantized head
                total += n * head_bpw / 8
        elif name.endswith("lm_head.weight"):
            total += n * head_bpw / 8
        elif len(info.shape) == 2:
            total += n * bits / 8
        else:
            total += n * 2
    return int(total)
