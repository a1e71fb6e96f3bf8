"""An upper bound of the size llama.cpp's quantizer will write, from the unquantized GGUF it reads.

llama.cpp picks each tensor's type from the file type (its base type), raises some tensors to more bits
(``llama_tensor_get_type_impl`` in ``src/llama-quant.cpp``: the output matrix to Q6_K or Q5_K; attn_v, attn_k,
attn_output, attn_qkv, ffn_down up to `CAP`; Q8_0 in 8-expert models), falls back to Q8_0 or F16 when a row width
is not a multiple of the type's block, and copies 1-D tensors as they are. The bound takes the largest type each
tensor can get, plus the metadata of the source file; the disk pre-check uses it, so it must never be below what
is written (tests/test_hardening.py measures it against real outputs for many types).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

Q = gguf.GGMLQuantizationType

# llama.cpp file type → its base tensor type (``llama_model_quantize_impl``)
BASE: dict[str, Q] = {
    "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1, "Q8_0": Q.Q8_0, "F16": Q.F16, "BF16": Q.BF16,
    "Q2_K": Q.Q2_K, "Q2_K_S": Q.Q2_K, "Q3_K_S": Q.Q3_K, "Q3_K_M": Q.Q3_K, "Q3_K_L": Q.Q3_K, "Q4_K_S": Q.Q4_K,
    "Q4_K_M": Q.Q4_K, "Q5_K_S": Q.Q5_K, "Q5_K_M": Q.Q5_K, "Q6_K": Q.Q6_K, "IQ2_XXS": Q.IQ2_XXS, "IQ2_XS": Q.IQ2_XS,
    "IQ2_S": Q.IQ2_S, "IQ2_M": Q.IQ2_S, "IQ3_XXS": Q.IQ3_XXS, "IQ3_XS": Q.IQ3_S, "IQ3_S": Q.IQ3_S, "IQ3_M": Q.IQ3_S,
    "IQ1_S": Q.IQ1_S, "IQ1_M": Q.IQ1_M, "IQ4_NL": Q.IQ4_NL, "IQ4_XS": Q.IQ4_XS, "TQ1_0": Q.TQ1_0, "TQ2_0": Q.TQ2_0,
}
RAISED = ("attn_v.", "attn_k.", "attn_output.", "attn_qkv.", "ffn_down")  # tensors llama.cpp may give more bits
_LOWEST = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M", "IQ2_S", "IQ2_M")
# the most bits a raised tensor gets per file type (70B models included); 8-expert models: Q8_0 (Q5_K lowest)
CAP: dict[str, Q] = {
    **dict.fromkeys(_LOWEST, Q.Q4_K), "Q4_K_M": Q.Q6_K, "Q5_K_M": Q.Q6_K, "Q4_0": Q.Q4_1, "Q5_0": Q.Q5_1,
    **dict.fromkeys(("IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                     "IQ4_NL", "IQ4_XS", "Q4_K_S"), Q.Q5_K),
}
OUTPUT_CAP = {**dict.fromkeys((*_LOWEST, "IQ3_XXS"), Q.Q5_K)}  # else Q6_K (Q8_0 stays Q8_0)
EMBD_CAP = {**dict.fromkeys(("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"), Q.Q2_K),
            **dict.fromkeys(("IQ2_S", "IQ2_M", "IQ3_XXS"), Q.IQ3_S), "TQ1_0": Q.Q4_K, "TQ2_0": Q.Q4_K}
SLACK = 64 * 1024  # keys llama.cpp adds (quantization version, file type), padding


def bits(t: Q) -> float:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return size * 8 / block


def _fits(width: int, t: Q) -> bool:
    return width % gguf.GGML_QUANT_SIZES[t][0] == 0


def tensor_bound(name: str, shape: tuple[int, ...], src_bytes: int, ftype: str, *, moe: bool, tied: bool,
                 overrides: list[tuple[str, int]], output_type: int | None, embedding_type: int | None) -> int:
    """Most bytes one tensor can take in the quantized file."""
    n = 1
    for d in shape:
        n *= int(d)
    if len(shape) < 2 or not name.endswith(".weight"):
        return src_bytes  # copied as is (norms, biases, rope factors)
    base = BASE.get(ftype, Q.Q8_0)
    if base in (Q.F16, Q.BF16):
        return max(src_bytes, n * 2)
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    chosen: list[Q] = [base]
    for pattern, type_id in overrides:
        if re.search(pattern, name):
            chosen = [Q(type_id)]
            break
    else:
        if is_output:
            chosen = [Q(output_type)] if output_type is not None else [base, OUTPUT_CAP.get(ftype, Q.Q6_K)]
        elif name == "token_embd.weight":
            chosen = [Q(embedding_type)] if embedding_type is not None else [base, EMBD_CAP.get(ftype, base)]
        elif any(r in name for r in RAISED):
            chosen = [base, CAP.get(ftype, base)]
            if moe:
                chosen.append(Q.Q5_K if ftype in _LOWEST else Q.Q8_0)
    width = int(shape[-1])
    worst = 0.0
    for t in chosen:
        if t in (Q.F32, Q.F16, Q.BF16):
            worst = max(worst, bits(t))
        elif _fits(width, t):
            worst = max(worst, bits(t))
        else:  # llama.cpp's fallback: Q8_0 family, else F16
            worst = max(worst, bits(Q.Q8_0) if width % 32 == 0 else 16.0)
    return int(n * worst / 8) + 64


def quantized_size_bound(src: Path, ftype: str, *, overrides: list[tuple[str, int]] | None = None,
                         output_type: int | None = None, embedding_type: int | None = None) -> int:
    """Upper bound of the bytes llama.cpp writes when quantizing `src` (every split part) to `ftype`."""
    from quantkit.backends.gguf.ggufinfo import iter_parts, read_info

    total = 0
    for part in iter_parts(Path(src)):
        reader = read_info(part)
        names = {t.name for t in reader.tensors}
        moe = any(".ffn_gate_exps." in n or "ffn_gate_inp" in n for n in names)
        tied = "output.weight" not in names
        first_data = min((int(t.data_offset) for t in reader.tensors), default=part.stat().st_size)
        total += first_data + SLACK
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # gguf keeps ne0 first; rows last
            total += tensor_bound(t.name, shape, int(t.n_bytes), ftype, moe=moe, tied=tied,
                                  overrides=overrides or [], output_type=output_type, embedding_type=embedding_type)
    return total
