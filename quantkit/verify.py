"""Checks that a GGUF is right: it loads in llama.cpp, its tokenizer splits Russian text exactly like the original,
and (for an unquantized file) its next-token distribution matches transformers' bf16 forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.source import Checkpoint

MAX_BF16_KLD = 0.01  # bf16 GGUF vs bf16 transformers: only accumulation order differs (measured ~2e-6)


def sample_text(chars: int = 6000) -> str:
    from quantkit.calibration import load

    docs = load("builtin:ru-eval").documents
    text = ""
    for d in docs:
        text += d.plain() + "\n\n"
        if len(text) >= chars:
            break
    return text[:chars]


def first_token_difference(model: Any, text: str, hf_ids: list[int]) -> int | None:
    """Where llama.cpp's tokenization of `text` first departs from the HF tokenizer's `hf_ids`; None when identical."""
    cpp_ids = model.tokenize(text, add_special=True)
    if hf_ids == cpp_ids:
        return None
    return next((i for i, (a, b) in enumerate(zip(hf_ids, cpp_ids, strict=False)) if a != b),
                min(len(hf_ids), len(cpp_ids)))


def verify_gguf(ckpt: Checkpoint, path: Path, *, forward: bool, n_tokens: int = 128) -> dict[str, Any]:
    """Raise a `QuantkitError` when the file is broken; return what was checked."""
    from transformers import AutoTokenizer

    from quantkit.backends.gguf.llamacpp import LlamaModel, LlamaScorer

    tok = AutoTokenizer.from_pretrained(ckpt.path)
    text = sample_text()
    hf_ids = tok(text)["input_ids"]
    model = LlamaModel(path)
    try:
        first = first_token_difference(model, text, hf_ids)
    finally:
        model.close()
    if first is not None:
        raise QuantkitError(
            f"{path.name}: llama.cpp tokenizes Russian text differently from the original tokenizer "
            f"(first difference at token {first} of {len(hf_ids)})",
            "the tokenizer metadata is wrong; report it with the model id",
        )
    report: dict[str, Any] = {"loads": True, "tokenizer_parity": True, "tokens_compared": len(hf_ids)}
    if forward:
        from quantkit.layerwise import LayerwiseModel

        ids = np.asarray(hf_ids[:n_tokens], dtype=np.int64)
        ref = next(iter(LayerwiseModel(ckpt).run(ids[None], logits=True)))
        scorer = LlamaScorer(path, n_ctx=max(64, len(ids)))
        try:
            got = scorer.chunk_logits(ids, 0)
        finally:
            scorer.close()
        from quantkit.evaluate import log_softmax

        p, q = log_softmax(ref, np.float64), log_softmax(got, np.float64)
        kld = float((np.exp(p) * (p - q)).sum(-1).mean())
        # positions whose top two reference logits are within 0.01 are ties at any precision: not counted
        top2 = np.sort(ref, -1)[:, -2:]
        decided = (top2[:, 1] - top2[:, 0]) >= 0.01
        top1 = float((ref.argmax(-1) == got.argmax(-1))[decided].mean())
        report.update(kld_vs_transformers=round(kld, 8), top1_vs_transformers=round(top1, 4))
        if kld > MAX_BF16_KLD:
            raise QuantkitError(
                f"{path.name}: llama.cpp's output differs from transformers' (KL-divergence {kld:.4f})",
                "the conversion is wrong for this model; report it with the model id",
            )
    return report
