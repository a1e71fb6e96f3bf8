"""Tokenizer metadata for GGUF: vocabulary, types, scores, merges, pre-tokenizer, special tokens, chat template.

Byte-level BPE vocabularies (Llama-3, Qwen2, Mistral-Nemo's tekken) are read from ``tokenizer.json`` with the
`tokenizers` library; SentencePiece vocabularies (Mistral 7B) from ``tokenizer.model``. The pre-tokenizer is
recognised from the regular expression in ``tokenizer.json`` and named the way llama.cpp names it, so a
vocabulary trained by the user (or a fine-tune that extended one) works as long as its pre-tokenizer is known.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from quantkit.errors import QuantkitError

# tokenizer.json Split regex → llama.cpp's tokenizer.ggml.pre
PRE_TOKENIZERS: dict[str, str] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "tekken",
}
SUPPORTED_PRE = "llama-bpe (Llama-3), qwen2 (Qwen2/2.5), tekken (Mistral-Nemo), SentencePiece (Mistral 7B)"


@dataclass
class VocabInfo:
    model: str  # gpt2 | llama
    pre: str
    n_tokens: int


def _split_regex(node: Any) -> str | None:
    """The first Split pre-tokenizer regex in a tokenizer.json pre_tokenizer tree."""
    if not isinstance(node, dict):
        return None
    if node.get("type") == "Split":
        pattern = node.get("pattern", {})
        return pattern.get("Regex") or pattern.get("String")
    for child in node.get("pretokenizers", []) or []:
        found = _split_regex(child)
        if found:
            return found
    return None


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer; refuses unknown ones."""
    regex = _split_regex(tokenizer_json.get("pre_tokenizer"))
    if regex is None:
        raise QuantkitError("the tokenizer's pre-tokenizer has no split pattern that llama.cpp knows",
                            f"supported: {SUPPORTED_PRE}")
    if regex not in PRE_TOKENIZERS:
        raise QuantkitError(f"unknown pre-tokenizer pattern {regex[:60]!r}…", f"supported: {SUPPORTED_PRE}")
    return PRE_TOKENIZERS[regex]


def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _bpe_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("model", {}).get("type") != "BPE":
        raise QuantkitError(f"tokenizer model {raw.get('model', {}).get('type')} is not supported",
                            f"supported: {SUPPORTED_PRE}")
    pre = detect_pre_tokenizer(raw)
    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise QuantkitError("the tokenizer has more tokens than the model's vocab_size",
                            "the checkpoint's config.json and tokenizer do not match")
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            entry = added[i]
            if not entry.get("normalized", False):
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if entry.get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, pre


def _spm_vocab(folder: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    if sp.vocab_size() > vocab_size:
        raise QuantkitError(f"tokenizer.model has {sp.vocab_size()} tokens but config.json says vocab_size {vocab_size}",
                            "the checkpoint's config.json and tokenizer do not match")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = kind
    added_file = folder / "added_tokens.json"
    if added_file.exists():
        for text, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, gguf.TokenType.USER_DEFINED
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.exists():
        decoder = json.loads(cfg_file.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for key, data in decoder.items():
            i = int(key)
            if i >= vocab_size:
                continue
            text = data["content"]
            if data.get("special") or _looks_special(text):
                types[i] = gguf.TokenType.CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[i] = gguf.TokenType.USER_DEFINED
            scores[i] = -1000.0
            tokens[i] = text.encode("utf-8")
    return tokens, scores, types


def add_vocab(writer: gguf.GGUFWriter, folder: Path, config: dict[str, Any]) -> VocabInfo:
    """Write every tokenizer key llama.cpp needs; returns what was written."""
    vocab_size = int(config["vocab_size"])
    cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.exists() else {}
    if (folder / "tokenizer.model").exists():
        if tok_cfg.get("add_prefix_space") is not None:
            writer.add_add_space_prefix(bool(tok_cfg["add_prefix_space"]))
        tokens, scores, types = _spm_vocab(folder, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        info = VocabInfo("llama", "default", len(tokens))
    elif (folder / "tokenizer.json").exists():
        if tok_cfg.get("add_prefix_space") is not None and config.get("architectures", [""])[0] != "Qwen2ForCausalLM":
            writer.add_add_space_prefix(bool(tok_cfg["add_prefix_space"]))
        btokens, btypes, pre = _bpe_vocab(folder, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(btokens)
        writer.add_token_types(btypes)
        special = gguf.SpecialVocab(folder, load_merges=True)
        # llama.cpp's converter states both flags for byte-level BPE; PyPI gguf 0.19 only writes the ones it
        # finds set, and llama.cpp reads a missing flag as false, so write the false ones explicitly.
        for kind in ("bos", "eos"):
            special.add_special_token.setdefault(kind, False)
        info = VocabInfo("gpt2", pre, len(btokens))
    else:
        raise QuantkitError(f"{folder} has neither tokenizer.json nor tokenizer.model",
                            "copy the tokenizer files of the base model into the checkpoint folder")
    special.add_to_gguf(writer, quiet=True)
    return info
