"""The Russian text checks read (held-out, never calibration text), and where two tokenizations of it part."""

from __future__ import annotations

from typing import Any


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
