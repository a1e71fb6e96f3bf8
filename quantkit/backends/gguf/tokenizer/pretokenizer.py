"""Which of llama.cpp's pre-tokenizers (``tokenizer.ggml.pre``) reproduces a byte-level BPE tokenizer.

Three ways, in order, each used only when the one before does not decide:

1. llama.cpp's own method: the hash of the token ids the tokenizer gives for llama.cpp's probe text, looked up in
   the table of llama.cpp's converter (so a known tokenizer gets exactly the name llama.cpp's converter writes);
2. the structure of ``tokenizer.json``'s pre-tokenizer (Split regex, Digits, ByteLevel, Sequence): a fine-tune or a
   retrained vocabulary keeps the pre-tokenizer of its base, so T-pro 2.x's Cyrillic-dense vocabulary is still
   Qwen2's pre-tokenizer;
3. a trial (`quantkit.backends.gguf.tokenizer.trial`): every name llama.cpp's runtime knows, keeping the first
   whose tokenization of Russian text and of the probe text is identical to the Hugging Face tokenizer's.

The hash table and the list of names are facts read from llama.cpp (``pre_tokenizers.json`` beside this file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from hashlib import sha256
from pathlib import Path
from typing import Any

_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
_TAIL = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_CASED = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
          r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*")

# The Split regex of tokenizer.json → llama.cpp's name (each followed by ByteLevel without its own regex).
SPLIT_REGEXES: dict[str, str] = {
    _LETTERS + r"|\p{N}{1,3}|" + _TAIL: "llama-bpe",
    _LETTERS + r"|\p{N}|" + _TAIL: "qwen2",
    _CASED + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
}
# Pre-tokenizers without a Split regex, by structure.
STRUCTURES: dict[tuple[Any, ...], str] = {
    (("digits", True), ("bytelevel", True)): "smollm",  # SmolLM: digits one by one, then GPT-2's regex
    (("bytelevel", True),): "gpt-2",
}
# Tried first in a trial: the pre-tokenizers of the model families people bring.
PREFERRED = ("qwen2", "llama-bpe", "tekken", "gpt-4o", "deepseek-v3", "deepseek-llm", "smollm", "gpt-2", "qwen35")


@dataclass(frozen=True)
class Detection:
    name: str | None
    method: str  # hash | structure | override | none


@cache
def _data() -> dict[str, Any]:
    return json.loads((Path(__file__).with_name("pre_tokenizers.json")).read_text(encoding="utf-8"))


def runtime_names() -> list[str]:
    """Every ``tokenizer.ggml.pre`` value llama.cpp's runtime accepts, most common families first."""
    names = list(_data()["runtime_names"])
    return [n for n in PREFERRED if n in names] + [n for n in names if n not in PREFERRED]


def probe_text() -> str:
    """llama.cpp's probe text (whitespace runs, emoji, digits, CJK, Cyrillic, contractions)."""
    return str(_data()["probe_text"])


def by_hash(folder: Path) -> str | None:
    """llama.cpp's converter's name for this tokenizer, found by the hash of its ids for the probe text."""
    from quantkit.backends.gguf.tokenizer.files import fast_tokenizer

    # the tokenizers library gives the ids transformers' fast tokenizer gives (special tokens added by the file's
    # post-processor), without importing transformers and torch
    ids = fast_tokenizer(folder).encode(probe_text()).ids
    return _data()["hashes"].get(sha256(str(ids).encode()).hexdigest())


def _signature(node: Any) -> tuple[Any, ...] | None:
    if not isinstance(node, dict):
        return None
    kind = node.get("type")
    if kind == "Sequence":
        parts: list[Any] = []
        for child in node.get("pretokenizers") or []:
            sig = _signature(child)
            if sig is None:
                return None
            parts.extend(sig)
        return tuple(parts)
    if kind == "Split":
        pattern = node.get("pattern", {})
        return (("split", pattern.get("Regex") or pattern.get("String")),)
    if kind == "ByteLevel":
        return (("bytelevel", bool(node.get("use_regex", True))),)
    if kind == "Digits":
        return (("digits", bool(node.get("individual_digits", False))),)
    return ((str(kind).lower(),),)


def by_structure(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer tree of ``tokenizer.json``, when its structure says it."""
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    if not sig:
        return None
    if sig in STRUCTURES:
        return STRUCTURES[sig]
    if len(sig) == 2 and sig[0][0] == "split" and sig[1] == ("bytelevel", False):
        return SPLIT_REGEXES.get(sig[0][1])
    return None


def describe(tokenizer_json: dict[str, Any]) -> str:
    """A short description of the pre-tokenizer tree for messages."""
    sig = _signature(tokenizer_json.get("pre_tokenizer")) or ()
    parts = []
    for item in sig:
        if item[0] == "split":
            parts.append(f"Split({str(item[1])[:40]}…)")
        else:
            parts.append(item[0] if len(item) == 1 else f"{item[0]}({item[1]})")
    return " + ".join(parts) or "none"


def detect(folder: Path, tokenizer_json: dict[str, Any]) -> Detection:
    """Hash first (exactly what llama.cpp's converter writes), then structure; `Detection(None, "none")` when
    neither decides (then run a trial)."""
    try:
        name = by_hash(folder)
    except Exception:  # noqa: BLE001 - a tokenizer transformers cannot load still has a structure to read
        name = None
    if name:
        return Detection(name, "hash")
    name = by_structure(tokenizer_json)
    if name:
        return Detection(name, "structure")
    return Detection(None, "none")
