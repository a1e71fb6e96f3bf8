"""What `quantkit mlx` takes (bit widths, group size) and what follows from it offline: folder names, the widths
check, size estimates."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantkit.errors import QuantkitError
from quantkit.source import Checkpoint

INSTALL_HINT = "pip install 'quantkit-ru[mlx]'"
BITS = (2, 3, 4, 5, 6, 8)  # mlx's affine quantization
GROUP_SIZES = (32, 64, 128)
CONFIG_FIX_VERSION = 1  # bump when fix_config changes what mlx_lm.convert reads
_NEVER_QUANTIZED = re.compile(r"norm\.weight$|\.bias$|e_score_correction_bias$|\.gate\.weight$")


class MLXOptions(BaseModel):
    """Options of `quantkit mlx` (and of an ``mlx`` entry in a recipe)."""

    model_config = ConfigDict(extra="forbid")

    bits: list[int] = Field(default_factory=lambda: [4],
                            description="bits per weight (2, 3, 4, 5, 6 or 8), one model per value",
                            json_schema_extra={"cli": ["--bits", "-b"]})
    group_size: int = Field(64, description="weights sharing one scale and bias: 32, 64 or 128")

    @field_validator("bits", mode="before")
    @classmethod
    def _parse_bits(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, int | float):
            value = [value]
        out = []
        for v in value:
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"bits must be whole numbers like 4,8, not '{v}'") from None
            if f != int(f):
                raise ValueError(f"MLX quantizes to whole bits (2, 3, 4, 5, 6 or 8), not {f:g}")
            out.append(int(f))
        return out

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one bit width, e.g. 4")
        for b in value:
            if b not in BITS:
                raise ValueError(f"mlx quantizes to 2, 3, 4, 5, 6 or 8 bits, not {b}")
        return sorted(set(value))

    @field_validator("group_size")
    @classmethod
    def _check_group(cls, value: int) -> int:
        if value not in GROUP_SIZES:
            raise ValueError(f"group size must be 32, 64 or 128, not {value}")
        return value


def bits_name(bits: int) -> str:
    """The folder, quant and branch name of a bit width: 4 → ``4bit``."""
    return f"{bits}bit"


def quantized_widths(ckpt: Checkpoint) -> dict[str, int]:
    """Input width of every matrix mlx-lm quantizes, by tensor name (the text model's: a vision tower is dropped),
    plus the per-head matrices mlx-lm splits MLA's ``kv_b_proj`` into (their widths are head sizes)."""
    arch = ckpt.arch
    out: dict[str, int] = {}
    for name, info in ckpt.tensors.tensors.items():
        if len(info.shape) < 2 or _NEVER_QUANTIZED.search(name) or arch.canonical_name(name) is None:
            continue
        out[name] = int(info.shape[-1])
    hp = arch.hparams
    if hp.get("kv_lora_rank") and hp.get("qk_nope_head_dim"):
        out["model.layers.*.self_attn.embed_q (MLA, from kv_b_proj)"] = int(hp["qk_nope_head_dim"])
        out["model.layers.*.self_attn.unembed_out (MLA, from kv_b_proj)"] = int(hp["kv_lora_rank"])
    return out


def check_widths(ckpt: Checkpoint, group_size: int) -> None:
    """Refuse a group size that does not divide some matrix's input width: mlx-lm would leave that matrix in 16 bits
    without a word while config.json claims every layer is quantized."""
    bad = {n: w for n, w in quantized_widths(ckpt).items() if w % group_size}
    if not bad:
        return
    name, width = next(iter(bad.items()))
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in quantized_widths(ckpt).values())]
    more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
    raise QuantkitError(f"--group-size {group_size} does not divide the input width {width} of {name}{more}: "
                        "mlx-lm would leave it unquantized",
                        f"use --group-size {' or '.join(map(str, fits))}" if fits else "no MLX group size fits")


def estimate_size(ckpt: Checkpoint, bits: int, group_size: int) -> int:
    """About the bytes of the MLX model: quantized matrices at `bits` plus a bf16 scale and bias per group, the
    rest in bf16 (mlx-lm also quantizes the embeddings)."""
    widths = quantized_widths(ckpt)
    total = 0.0
    for name, info in ckpt.tensors.tensors.items():
        if ckpt.arch.canonical_name(name) is None:
            continue
        n = int(np.prod(info.shape, dtype=np.int64))
        total += n * (bits / 8 + 4 / group_size) if name in widths else n * 2
    return int(total)


def approx_size(n_params: int | None, bits: int, group_size: int) -> int | None:
    """The size from the parameter count alone (a model not here yet): nearly every weight is quantized."""
    return int(n_params * (bits / 8 + 4 / group_size)) if n_params else None
