"""llama.cpp's row-width fallback, applied to the per-tensor types it does not apply it to.

``llama_model_quantize`` replaces a type whose block does not divide a tensor's row (a K-quant on Gemma 3 270M's
640-wide or SmolLM2's 576-wide rows) by a fallback type, but only for the types it chooses itself: a
``--tensor-type`` override, ``--output-tensor-type`` and ``--token-embedding-type`` are used as given, and the
quantization then fails (``ggml_validate_row_data: invalid size``). `fit_rows` resolves every override against the
source's tensor table and puts the fallback llama.cpp would have used in front of it, tensor by tensor, so any mix
can be asked for on any model; where every row fits, the options are returned unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from quantkit.backends.gguf.ggufinfo import iter_parts, read_info

# llama.cpp's own table (llama-quant.cpp, `convert_incompatible_tensor`); F16 where the fallback does not fit either
FALLBACK = {
    **dict.fromkeys((Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M, Q.Q2_K, Q.Q3_K, Q.IQ4_XS),
                    Q.IQ4_NL),
    Q.TQ1_0: Q.Q4_0, Q.TQ2_0: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
}


def fits(qtype: int, row: int) -> bool:
    """Whether rows `row` wide can be stored as `qtype` (its block divides them)."""
    return row % GGML_QUANT_SIZES[Q(qtype)][0] == 0


def fit_type(qtype: int, row: int) -> int:
    """`qtype`, or what llama.cpp falls back to for rows `row` wide."""
    if fits(qtype, row):
        return qtype
    fallback = FALLBACK.get(Q(qtype))
    return int(fallback) if fallback is not None and fits(fallback, row) else int(Q.F16)


def row_widths(src: Path) -> dict[str, int]:
    """Every 2-D (or more) tensor of a GGUF (all parts of a split one) → its row width."""
    return {t.name: int(t.shape[0]) for part in iter_parts(src) for t in read_info(part).tensors if len(t.shape) >= 2}


def fit_rows(src: Path, tensor_types: list[tuple[str, int]], output_type: int | None,
             embedding_type: int | None) -> tuple[list[tuple[str, int]], int | None, int | None]:
    """The overrides (and output / embedding types) with each tensor whose rows its type cannot take sent to
    llama.cpp's fallback: exact-name overrides in front of the others (the first match wins)."""
    if not (tensor_types or output_type is not None or embedding_type is not None):
        return tensor_types, output_type, embedding_type
    widths = row_widths(src)
    compiled = [(re.compile(p), t) for p, t in tensor_types]
    exact: list[tuple[str, int]] = []
    for name, row in widths.items():
        asked = next((t for pattern, t in compiled if pattern.search(name)), None)
        if asked is not None and not fits(asked, row):
            exact.append((f"^{re.escape(name)}$", fit_type(asked, row)))
    if output_type is not None and "output.weight" in widths:
        output_type = fit_type(output_type, widths["output.weight"])
    if embedding_type is not None and "token_embd.weight" in widths:
        embedding_type = fit_type(embedding_type, widths["token_embd.weight"])
    return [*exact, *tensor_types], output_type, embedding_type
