"""What `quantkit gguf` and a recipe's ``gguf:`` section accept, and the sizes that follow from a type."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

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


FULL_PRECISION = ("BF16", "F16", "F32")
LADDER_TYPES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")  # the sizes people download


def is_stock_target(target: str) -> bool:
    """A size target written as a stock type (``Q4_K_M``): at most the bytes of that type's file."""
    return bool(target) and not target[0].isdigit()


class GGUFOptions(BaseModel):
    """What `quantkit gguf` and a recipe's ``gguf:`` section accept."""

    model_config = {"extra": "forbid"}

    types: list[str] = Field(default_factory=lambda: ["Q4_K_M"],
                             description="llama.cpp file types: q4_k_m,q5_k_m,q8_0 (or --q4_k_m flags)")
    outtype: str = Field("bf16", description="unquantized GGUF type: bf16, f16 or f32")
    imatrix: bool = Field(True, description="quantize with a Russian importance matrix",
                          json_schema_extra={"cli": ["--with-imatrix/--no-imatrix"]})
    imatrix_file: str | None = Field(None, description="use this GGUF imatrix file instead of computing one",
                                     json_schema_extra={"cli": ["--imatrix"]})
    tensor_types: list[str] = Field(default_factory=list, description="PATTERN=TYPE per-tensor override, e.g. "
                                    "attn_v=q8_0", json_schema_extra={"cli": ["--tensor-type"], "split": False})
    tensor_type_file: str | None = Field(None, description="PATTERN=TYPE overrides, one a line (llama-quantize's "
                                         "format; a targeted file's .tensor-types.txt)")
    output_type: str | None = Field(None, description="type of output.weight")
    embedding_type: str | None = Field(None, description="type of token_embd")
    split_max_size: str | int | None = Field(None, description="split files larger than this (e.g. 50G) in "
                                             "llama.cpp's split format")
    verify: bool = Field(True, description="load every file in llama.cpp and check tokenizer and BF16 logits")
    pre_tokenizer: str | None = Field(None, description="llama.cpp pre-tokenizer name for a BPE vocabulary "
                                      "(default: detected)")
    target_sizes: list[str] = Field(default_factory=list, description="also write the best per-tensor mix under "
                                    "this size: 4.5G, or a stock type (Q4_K_M: at most that file's bytes)",
                                    json_schema_extra={"cli": ["--target-size"]})
    target_bpw: list[float] = Field(default_factory=list, description="also write the best per-tensor mix at this "
                                    "many bits per weight")
    ladder: bool = Field(False, description="at each stock type's file size (the types asked, else Q2_K, Q3_K_M, "
                         "Q4_K_M, Q5_K_M, Q6_K) also write the best per-tensor mix")

    @model_validator(mode="after")
    def _imatrix_choice(self) -> GGUFOptions:
        if self.imatrix_file is not None and not self.imatrix:
            raise ValueError("--no-imatrix and --imatrix contradict each other; use one of them")
        if self.imatrix_file is not None and not Path(self.imatrix_file).expanduser().is_file():
            raise ValueError(f"the imatrix file {self.imatrix_file} does not exist (check --imatrix)")
        if self.tensor_type_file is not None:
            lines = type_file_lines(Path(self.tensor_type_file).expanduser())
            self.tensor_types = [*self.tensor_types, *(ln for ln in lines if ln not in self.tensor_types)]
            from quantkit.backends.gguf.quantize.core import parse_tensor_types

            _as_value_error(parse_tensor_types, self.tensor_types)
            self.tensor_type_file = None  # its lines are in tensor_types now (they, not the path, decide the files)
        if self.ladder:
            if "types" not in self.model_fields_set:
                self.types = list(LADDER_TYPES)
            self.target_sizes = [*self.target_sizes, *(t for t in self.types if t not in FULL_PRECISION
                                                       and t not in self.target_sizes)]
        # a stock type as a target is bounded by that type's file, which the run therefore makes too
        self.types = [*self.types, *(t for t in self.target_sizes if is_stock_target(t) and t not in self.types)]
        return self

    @field_validator("target_sizes")
    @classmethod
    def _target_sizes(cls, value: list[str]) -> list[str]:
        from quantkit.backends.gguf.quantize.core import parse_file_type
        from quantkit.backends.gguf.target.allocate import parse_size

        out: list[str] = []
        for v in value:
            if not re.match(r"\s*\d", str(v)):  # a stock type: at most the bytes of that type's file
                try:
                    key = parse_file_type(str(v))
                except QuantkitError:
                    raise ValueError(f"--target-size {v} is neither a size (4.5G) nor a quant type (Q4_K_M)") from None
                if key in FULL_PRECISION:
                    raise ValueError(f"--target-size {v}: a target must be a quantized type, e.g. Q4_K_M")
                out.append(key)
                continue
            size = _as_value_error(parse_size, str(v))
            if size < 1 << 16:  # said now, not after the conversion and the measurement
                raise ValueError(f"--target-size {v} is {size:,} bytes: no model fits under it (e.g. 4.5G)")
            out.append(str(v))
        return out

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
        from quantkit.backends.gguf.tokenizer.pretokenizer import runtime_names

        if value is not None and value not in runtime_names():
            raise ValueError(f"llama.cpp has no pre-tokenizer '{value}'; e.g. {', '.join(runtime_names()[:6])}")
        return value

    @field_validator("types")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        from quantkit.backends.gguf.quantize.core import parse_file_type

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
        from quantkit.backends.gguf.quantize.core import parse_tensor_types

        _as_value_error(parse_tensor_types, value)
        return value

    @field_validator("output_type", "embedding_type")
    @classmethod
    def _tensor_type(cls, value: str | None) -> str | None:
        from quantkit.backends.gguf.quantize.core import parse_ggml_type

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


def type_file_lines(path: Path) -> list[str]:
    """The PATTERN=TYPE lines of a --tensor-type-file (blank lines and # comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --tensor-type-file {path}: {type(exc).__name__} (pass a text file with one "
                         "PATTERN=TYPE a line)") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"--tensor-type-file {path} holds no PATTERN=TYPE line (e.g. attn_v=q8_0)")
    return lines


_QUANT_FLAG = re.compile(r"^--(i?q\d|tq\d|bf16|f16|f32)", re.IGNORECASE)


def cli_extra(extra: list[str], values: dict[str, Any], options: list[str], given: dict[str, Any]) -> dict[str, Any]:
    """`quantkit gguf`'s ``--q4_k_m --iq3_xxs`` style flags (what its generated command did not know) → file types,
    added to ``--types`` (the model's default when neither is given); a mistyped option is named as one."""
    from quantkit.backends.gguf.quantize.core import FILE_TYPES, parse_file_type

    chosen = []
    for arg in extra:
        if not arg.startswith("--"):
            raise QuantkitError(f"unexpected argument '{arg}'", "see quantkit gguf --help")
        flag = arg.split("=", 1)[0]
        if flag[2:].upper().replace("-", "_") in FILE_TYPES:
            chosen.append(parse_file_type(flag[2:]))
            continue
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.7)
        if _QUANT_FLAG.match(flag) and not close:
            chosen.append(parse_file_type(flag[2:]))  # raises: unknown quant type, naming the valid ones
            continue
        hint = f"did you mean {close[0]}?" if close else "see quantkit gguf --help"
        raise QuantkitError(f"no such option: {flag}", hint)
    listed = values.get("types")
    if given.get("types") is not None and not listed:
        raw = ",".join(given["types"])
        raise QuantkitError(f"--types '{raw}' names no quant type", "e.g. --types q4_k_m,q8_0")
    types = [*chosen, *(listed or [])]
    rest = {k: v for k, v in values.items() if k != "types"}
    return {**rest, "types": types} if types else rest  # none: the default (Q4_K_M, or --ladder's types)
