"""Tokenizer metadata for GGUF: vocabulary, types, scores, merges, pre-tokenizer, special tokens, chat template.

Byte-level BPE vocabularies (Llama-3, Qwen2/3, Mistral-Nemo's tekken, SmolLM, GPT-2 and every other pre-tokenizer
llama.cpp runs) are read from ``tokenizer.json`` with the `tokenizers` library; SentencePiece vocabularies of any
size (Mistral 7B, YandexGPT-5, Gemma 3) from ``tokenizer.model``. Which one a family prefers, and how it states the
space prefix, is the architecture's policy (`quantkit.arch`). The pre-tokenizer name is found by
`pretokenizer` (llama.cpp's hash, the tokenizer's structure, or a trial against llama.cpp).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.arch import Architecture


def _stamp(path: Path) -> tuple[str, int, int]:
    """A file's version as the per-process caches below key it: resolved path, size, modification time."""
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@lru_cache(maxsize=2)
def _parsed(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def tokenizer_json(folder: Path) -> dict[str, Any]:
    """``tokenizer.json`` parsed once per process while the file is unchanged (a 152k-token vocabulary is ~10 MB of
    JSON; conversion, detection and the vocabulary writer all read it). Do not modify the result."""
    return _parsed(*_stamp(Path(folder) / "tokenizer.json"))


@lru_cache(maxsize=2)
def _fast(path: str, size: int, mtime_ns: int) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def fast_tokenizer(folder: Path) -> Any:
    """``tokenizers.Tokenizer`` of the folder's ``tokenizer.json``, built once per process while the file is
    unchanged (detection and the vocabulary writer both need it; building one for 152k tokens takes ~0.3 s)."""
    return _fast(*_stamp(Path(folder) / "tokenizer.json"))


def uses_sentencepiece(folder: Path, arch: Architecture) -> bool:
    if (folder / "tokenizer.model").exists() and (arch.sentencepiece_first or not (folder / "tokenizer.json").exists()):
        return True
    return False


def vocab_token_count(folder: Path, arch: Architecture) -> int:
    """How many tokens the vocabulary really has, counted the way llama.cpp's converter counts them when it trims
    embeddings: the padded SentencePiece list, or tokenizer.json's vocabulary plus its added tokens."""
    if uses_sentencepiece(folder, arch):
        from sentencepiece import SentencePieceProcessor

        hp = arch.hparams
        size = hp.get("vocab_size_per_layer_input") or hp.get("vocab_size")
        if not size:
            sp = SentencePieceProcessor()
            sp.LoadFromFile(str(folder / "tokenizer.model"))
            size = sp.vocab_size()
        return int(size)
    raw = tokenizer_json(folder)
    return len(raw["model"]["vocab"]) + len(raw.get("added_tokens", []))


def _looks_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def bpe_vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types of a byte-level BPE ``tokenizer.json``, padded to `vocab_size` as llama.cpp does."""
    tokens, types = _bpe_vocab_once(folder, vocab_size)
    return list(tokens), list(types)


def _bpe_vocab_once(folder: Path, vocab_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """`bpe_vocab` as tuples, built once per process while ``tokenizer.json`` is unchanged: a second writer gets the
    very same objects, so `kvpack` reuses their packed bytes."""
    return _bpe_vocab(*_stamp(Path(folder) / "tokenizer.json"), vocab_size)


@lru_cache(maxsize=2)
def _bpe_vocab(path: str, size: int, mtime_ns: int, vocab_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    raw = _parsed(path, size, mtime_ns)
    if raw.get("model", {}).get("type") != "BPE":
        raise QuantkitError(f"tokenizer model {raw.get('model', {}).get('type')} is not supported",
                            "supported: byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model)")
    tok = _fast(path, size, mtime_ns)
    vocab = _token_ids(raw, tok)
    if vocab and max(vocab.values()) >= vocab_size:
        raise QuantkitError("the tokenizer has more tokens than the model's vocab_size",
                            "the checkpoint's config.json and tokenizer do not match")
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    tokens: list[str | None] = [None] * vocab_size
    for token, i in vocab.items():  # a later duplicate id wins, as in a reversed dict
        tokens[i] = token
    types: list[int] = [gguf.TokenType.NORMAL] * vocab_size
    for i, entry in added.items():
        if not (isinstance(i, int) and 0 <= i < vocab_size) or tokens[i] is None:
            continue
        token = tokens[i]
        if not entry.get("normalized", False):
            token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
        if entry.get("special") or _looks_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            token = token.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i] = token
    if None in tokens:
        for i, token in enumerate(tokens):
            if token is None:
                tokens[i] = f"[PAD{i}]"
                types[i] = gguf.TokenType.UNUSED
    return tuple(tokens), tuple(types)  # type: ignore[arg-type]


def _token_ids(raw: dict[str, Any], tok: Any) -> dict[str, int]:
    """``tok.get_vocab(with_added_tokens=True)`` (~0.1 s for 152k tokens) from the parsed file instead: the model's
    vocabulary plus each added token at the id the tokenizer gives it, used when the ids are all distinct and as many
    as the tokenizer counts (then the order, which `get_vocab` does not fix either, cannot matter)."""
    model = raw.get("model", {}).get("vocab")
    if isinstance(model, dict):
        ids = dict(model)
        for entry in raw.get("added_tokens", []):
            ids[entry["content"]] = tok.token_to_id(entry["content"])
        if len(set(ids.values())) == len(ids) == tok.get_vocab_size(with_added_tokens=True) and \
                all(type(i) is int for i in ids.values()):
            return ids
    return tok.get_vocab(with_added_tokens=True)


def _spm_vocab_once(folder: Path, vocab_size: int) -> tuple[tuple[bytes, ...], tuple[float, ...], tuple[int, ...]]:
    """`_spm_vocab` as tuples, built once per process while the files it reads are unchanged: a second writer gets
    the very same objects, so `kvpack` reuses their packed bytes."""
    paths = [Path(folder) / name for name in ("tokenizer.model", "added_tokens.json", "tokenizer_config.json")]
    stamps = [_stamp(path) if path.exists() else None for path in paths]
    return _spm_vocab_cached(str(Path(folder).resolve()), tuple(stamps), vocab_size)


@lru_cache(maxsize=2)
def _spm_vocab_cached(folder: str, stamps: tuple[Any, ...], vocab_size: int
                      ) -> tuple[tuple[bytes, ...], tuple[float, ...], tuple[int, ...]]:
    tokens, scores, types = _spm_vocab(Path(folder), vocab_size)
    return tuple(tokens), tuple(scores), tuple(types)


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


def state_unset_flags(folder: Path, special: gguf.SpecialVocab) -> None:
    """llama.cpp's converter (its vendored gguf-py) states add_bos/add_eos as false when the tokenizer's
    post-processor includes a ByteLevel step and nothing set them; PyPI gguf 0.19 leaves them out. llama.cpp reads a
    missing flag as false, so tokenization is the same either way, but the files would differ."""
    post = tokenizer_json(folder).get("post_processor") or {}
    if any(p.get("type") == "ByteLevel" for p in post.get("processors", [post])):
        for kind in ("bos", "eos"):
            special.add_special_token.setdefault(kind, False)


_gguf_log = logging.getLogger("gguf.vocab")


@lru_cache(maxsize=2)
def _merges(path: str, size: int, mtime_ns: int) -> tuple[str, ...] | None:
    """``tokenizer.json``'s merges as gguf's `SpecialVocab` writes them (``"a b"``; a space inside a part of a
    list-form pair becomes U+0120), or None when gguf should look for them itself (none, merges.txt, odd forms)."""
    merges = _parsed(path, size, mtime_ns).get("model", {}).get("merges")
    if not isinstance(merges, list) or not merges:
        return None
    first = merges[0]
    if isinstance(first, str):
        return tuple(merges)
    if not (isinstance(first, list) and len(first) == 2 and isinstance(first[0], str)):
        return None
    try:
        joined = list(map(" ".join, merges))
        if "".join(joined).count(" ") == sum(map(len, merges)) - len(merges):  # no space inside any part
            return tuple(joined)
        _gguf_log.warning(f'Spaces in merges detected, encoding as {chr(ord(" ") + 256)!r}')
        return tuple(" ".join([part.replace(" ", "\u0120") for part in pair]) for pair in merges)
    except TypeError:
        return None


def special_vocab(folder: Path, *, load_merges: bool = False, n_vocab: int | None = None) -> gguf.SpecialVocab:
    """``gguf.SpecialVocab(folder, load_merges, n_vocab)`` with the same contents, without gguf parsing
    ``tokenizer.json`` a second time: merges come from the once-parsed file (`tokenizer_json`), and gguf reads a copy
    of it without the vocabulary and merges, beside links to the folder's other files. Falls back to gguf's own
    loading where that cannot be arranged (no links, odd merges)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        return gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    key = _stamp(path)
    raw = _parsed(*key)
    merges = _merges(*key) if load_merges else None
    if not isinstance(raw, dict) or (load_merges and merges is None):
        return gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    slim = {k: v for k, v in raw.items() if k != "model"}
    if isinstance(raw.get("model"), dict):
        slim["model"] = {k: v for k, v in raw["model"].items() if k not in ("vocab", "merges")}
    elif "model" in raw:
        slim["model"] = raw["model"]
    with tempfile.TemporaryDirectory(prefix="quantkit-vocab-") as tmp:
        try:
            for entry in os.scandir(folder):
                if entry.name != "tokenizer.json":
                    os.symlink(os.path.abspath(entry.path), os.path.join(tmp, entry.name),
                               target_is_directory=entry.is_dir())
        except OSError:
            return gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
        Path(tmp, "tokenizer.json").write_text(json.dumps(slim), encoding="utf-8")
        special = gguf.SpecialVocab(tmp, load_merges=False, n_vocab=n_vocab)
    if load_merges:
        special.load_merges = True
        special.merges = merges  # type: ignore[assignment]  # a tuple: shared, never changed
    return special
