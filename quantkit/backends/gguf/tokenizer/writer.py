"""Tokenizer metadata for GGUF: vocabulary, types, scores, merges, pre-tokenizer, special tokens, chat template.

Byte-level BPE vocabularies (Llama-3, Qwen2/3, Mistral-Nemo's tekken, SmolLM, GPT-2 and every other pre-tokenizer
llama.cpp runs) are read from ``tokenizer.json`` with the `tokenizers` library; SentencePiece vocabularies of any
size (Mistral 7B, YandexGPT-5, Gemma 3) from ``tokenizer.model``. Which one a family prefers, and how it states the
space prefix, is the architecture's policy (`quantkit.arch`). The pre-tokenizer name is found by
`pretokenizer` (llama.cpp's hash, the tokenizer's structure, or a trial against llama.cpp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from quantkit.backends.gguf.tokenizer import pretokenizer
from quantkit.backends.gguf.tokenizer.files import (
    _bpe_vocab_once,
    _spm_vocab_once,
    special_vocab,
    state_unset_flags,
    tokenizer_json,
    uses_sentencepiece,
)
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.arch import Architecture


@dataclass
class VocabInfo:
    model: str  # gpt2 | llama
    pre: str
    n_tokens: int
    pre_method: str = ""  # hash | structure | trial | override ("" for SentencePiece)


def pre_tokenizer_for(folder: Path, arch: Architecture, *, override: str | None = None) -> tuple[str, str]:
    """``(name, method)``: llama.cpp's pre-tokenizer for a byte-level BPE checkpoint; a trial when hash and structure
    do not decide; a one-line refusal when no name llama.cpp knows reproduces the tokenizer."""
    if override:
        if override not in pretokenizer.runtime_names():
            raise QuantkitError(f"unknown --pre-tokenizer {override}",
                                "use a name llama.cpp knows, e.g. " + ", ".join(pretokenizer.runtime_names()[:8]))
        return override, "override"
    raw = tokenizer_json(folder)
    found = pretokenizer.detect(folder, raw)
    if found.name:
        return found.name, found.method
    from quantkit.backends.gguf.tokenizer.trial import trial

    return trial(folder, arch), "trial"


def add_vocab(writer: gguf.GGUFWriter, folder: Path, arch: Architecture, *, pre: str | None = None) -> VocabInfo:
    """Write every tokenizer key llama.cpp needs, following the architecture's policy; returns what was written.
    `pre` overrides the pre-tokenizer name of a byte-level BPE vocabulary."""
    vocab_size = arch.vocab_size
    cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    if arch.space_prefix == "tokenizer_config" and tok_cfg.get("add_prefix_space") is not None:
        writer.add_add_space_prefix(bool(tok_cfg["add_prefix_space"]))
    if uses_sentencepiece(folder, arch):
        tokens, scores, types = _spm_vocab_once(folder, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        info = VocabInfo("llama", "default", len(tokens))
        if arch.space_prefix == "spm_false":
            writer.add_add_space_prefix(False)
    elif (folder / "tokenizer.json").exists():
        name, method = pre_tokenizer_for(folder, arch, override=pre)
        btokens, btypes = _bpe_vocab_once(folder, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(name)
        writer.add_token_list(btokens)
        writer.add_token_types(btypes)
        special = special_vocab(folder, load_merges=True)
        state_unset_flags(folder, special)
        info = VocabInfo("gpt2", name, len(btokens), method)
    else:
        raise QuantkitError(f"{folder} has neither tokenizer.json nor tokenizer.model",
                            "copy the tokenizer files of the base model into the checkpoint folder")
    special.add_to_gguf(writer, quiet=True)
    arch.write_vocab_overrides(writer, info.n_tokens)
    return info
