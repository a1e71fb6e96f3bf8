"""What `quantkit gguf` and a recipe's ``gguf:`` section accept, and the sizes that follow from a type."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, field_validator

from quantkit.errors import QuantkitError


def parse_size(text: str | int | None) -> int:
    """``50G`` / ``500M`` / ``1000`` → bytes (decimal units, like llama.cpp's ``--split-max-size``)."""
    if text in (None, "", 0, "0"):
        return 0
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text).upper())
    if not m:
        raise QuantkitError(f"bad size '{text}'", "use a number with K, M, G or T, e.g. 50G")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


class GGUFOptions(BaseModel):
    """What `quantkit gguf` and a recipe's ``gguf:`` section accept."""

    model_config = {"extra": "forbid"}

    types: list[str] = Field(default_factory=lambda: ["Q4_K_M"], description="llama.cpp file types")
    outtype: str = Field("bf16", description="unquantized GGUF type: bf16, f16 or f32")
    imatrix: bool = Field(True, description="quantize with a Russian importance matrix")
    imatrix_file: str | None = Field(None, description="use this GGUF imatrix file instead of computing one")
    tensor_types: list[str] = Field(default_factory=list, description="PATTERN=TYPE per-tensor overrides")
    output_type: str | None = Field(None, description="type of output.weight")
    embedding_type: str | None = Field(None, description="type of token_embd")
    split_max_size: str | int | None = Field(None, description="split files larger than this (e.g. 50G)")
    verify: bool = Field(True, description="load every file in llama.cpp and check tokenizer and BF16 logits")
    pre_tokenizer: str | None = Field(None, description="llama.cpp pre-tokenizer name (default: detected)")
    target_sizes: list[str] = Field(default_factory=list, description="size-targeted files, e.g. 4.5G")
    target_bpw: list[float] = Field(default_factory=list, description="size-targeted files in bits per weight")

    @field_validator("target_sizes")
    @classmethod
    def _target_sizes(cls, value: list[str]) -> list[str]:
        from quantkit.backends.gguf.target import parse_size

        for v in value:
            _as_value_error(parse_size, str(v))
        return [str(v) for v in value]

    @field_validator("target_bpw")
    @classmethod
    def _target_bpw(cls, value: list[float]) -> list[float]:
        if any(not 1.5 <= v <= 16 for v in value):
            raise ValueError("--target-bpw must be between 1.5 and 16 bits per weight")
        return value

    @property
    def targets(self) -> list[str]:
        """Every size target, as written for steps and names: ``4.5G``, ``4.8bpw``."""
        return [*self.target_sizes, *(f"{v:g}bpw" for v in self.target_bpw)]

    @field_validator("pre_tokenizer")
    @classmethod
    def _pre_tokenizer(cls, value: str | None) -> str | None:
        from quantkit.backends.gguf.pretokenizer import runtime_names

        if value is not None and value not in runtime_names():
            raise ValueError(f"llama.cpp has no pre-tokenizer '{value}'; e.g. {', '.join(runtime_names()[:6])}")
        return value

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        from quantkit.backends.gguf.quantize import parse_file_type

        out: list[str] = []
        for t in value:
            for part in str(t).split(","):
                if part.strip():
                    key = _as_value_error(parse_file_type, part)
                    if key not in out:
                        out.append(key)
        if not out:
            raise ValueError("at least one quant type is needed")
        return out

    @field_validator("outtype")
    @classmethod
    def _outtype(cls, value: str) -> str:
        if value.lower() not in ("bf16", "f16", "f32"):
            raise ValueError("outtype must be bf16, f16 or f32")
        return value.lower()

    @field_validator("tensor_types")
    @classmethod
    def _tensor_types(cls, value: list[str]) -> list[str]:
        from quantkit.backends.gguf.quantize import parse_tensor_types

        _as_value_error(parse_tensor_types, value)
        return value

    @field_validator("output_type", "embedding_type")
    @classmethod
    def _tensor_type(cls, value: str | None) -> str | None:
        from quantkit.backends.gguf.quantize import parse_ggml_type

        if value is not None:
            _as_value_error(parse_ggml_type, value)
        return value

    @field_validator("split_max_size")
    @classmethod
    def _split(cls, value: str | int | None) -> str | int | None:
        _as_value_error(parse_size, value)
        return value


def _as_value_error(func: Any, value: Any) -> Any:
    """Run a parser that raises `QuantkitError` inside a pydantic validator (which wants ValueError)."""
    try:
        return func(value)
    except QuantkitError as exc:
        raise ValueError(str(exc)) from None


# Rough bits per weight of each llama.cpp type on Llama-style models (for plans and disk checks only).
APPROX_BPW = {
    "Q2_K": 3.0, "Q2_K_S": 2.9, "Q3_K_S": 3.5, "Q3_K_M": 3.9, "Q3_K_L": 4.3, "Q4_0": 4.6, "Q4_1": 5.0,
    "Q4_K_S": 4.6, "Q4_K_M": 4.9, "Q5_0": 5.5, "Q5_1": 6.0, "Q5_K_S": 5.5, "Q5_K_M": 5.7, "Q6_K": 6.6,
    "Q8_0": 8.5, "IQ1_S": 1.8, "IQ1_M": 2.0, "IQ2_XXS": 2.2, "IQ2_XS": 2.4, "IQ2_S": 2.6, "IQ2_M": 2.8,
    "IQ3_XXS": 3.2, "IQ3_XS": 3.4, "IQ3_S": 3.6, "IQ3_M": 3.8, "IQ4_NL": 4.6, "IQ4_XS": 4.4, "BF16": 16.0,
    "F16": 16.0, "F32": 32.0, "TQ1_0": 1.8, "TQ2_0": 2.2,
}
