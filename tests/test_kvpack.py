"""The one-pass metadata packing (`quantkit.backends.gguf.convert.kvpack`) and the vocabulary writer's shortcuts
(`quantkit.backends.gguf.tokenizer`) against gguf's own code: the same bytes, the same errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest

from quantkit.backends.gguf.convert import kvpack
from quantkit.backends.gguf.tokenizer import files as tk

T = gguf.GGUFValueType
N = kvpack.MIN_ITEMS + 3


def _writers() -> tuple[Any, Any]:
    plain = gguf.GGUFWriter(None, "llama")
    fast = gguf.GGUFWriter(None, "llama")
    kvpack.fast_arrays(fast)
    return plain._pack_val, fast._pack_val


def _same(val: Any, sub: gguf.GGUFValueType | None = None) -> None:
    """Packed twice (the second time from the memo when the first was packed in one pass): gguf's bytes or error."""
    slow, fast = _writers()
    try:
        want: Any = slow(val, T.ARRAY, True, sub)
    except Exception as e:  # noqa: BLE001 - whatever gguf raises, the fast path must raise too
        want = type(e)
    for _ in range(2):
        try:
            got: Any = fast(val, T.ARRAY, True, sub)
        except Exception as e:  # noqa: BLE001
            got = type(e)
        assert got == want, (val[:4], sub)


WORDS = ["привет", "", "мир", " ", "Ġж", "\u2581слово", "😀", "<|im_end|>", "a\0b", "ё" * 300, "\x7f", "é"]


@pytest.mark.parametrize("val", [
    [WORDS[i % len(WORDS)] for i in range(N)],  # Cyrillic, empty, NUL inside, long
    [w for w in WORDS if "\0" not in w] * 30,
    [""] * N,
    tuple(WORDS[i % len(WORDS)] for i in range(N)),
    [w.encode() for w in WORDS] * 30,  # SentencePiece tokens are bytes
    [w if i % 2 else w.encode() for i, w in enumerate(WORDS * 30)],
    [bytearray(w.encode()) for w in WORDS] * 30,
    ["\ud800"] * N,  # not encodable: gguf's UnicodeEncodeError
    ["a"] * N + [1],
])
def test_string_arrays(val: Any) -> None:
    _same(val)


@pytest.mark.parametrize("val", [
    [1, -2, 3, 2**31 - 1, -2**31] * 60, [2**31] * N, [gguf.TokenType.NORMAL, gguf.TokenType.CONTROL] * 200,
    [0.5, -0.0, 0.0, float("nan"), float("inf"), 1e-45, -10000.0] * 50, [1e39] * N,
    [1, 2.5] * N, [1.0] * N + [1], [1] * N + [True], [True] * N, [None] * N,
])
@pytest.mark.parametrize("sub", [None, T.UINT8, T.INT16, T.INT32, T.UINT32, T.UINT64, T.INT64, T.FLOAT32,
                                 T.FLOAT64, T.STRING])
def test_number_arrays(val: list[Any], sub: gguf.GGUFValueType | None) -> None:
    _same(val, sub)


def test_numbers_at_the_edges() -> None:
    _same([2**64 - 1] * N, T.UINT64)
    _same([2**64] * N, T.UINT64)
    _same([-1] * N, T.UINT64)
    _same([2**63] * N, T.INT64)
    _same([256] * N, T.UINT8)


def test_memo_returns_the_same_bytes_and_never_stale_ones() -> None:
    slow, fast = _writers()
    tokens = tuple(f"токен{i}" for i in range(N))
    first = kvpack.packed_array(tokens)
    assert first is not None and kvpack.packed_array(tokens) is first  # another writer: the very same bytes
    assert fast(tokens, T.ARRAY, True) == slow(tokens, T.ARRAY, True)
    changed = [f"w{i}" for i in range(N)]
    before = fast(changed, T.ARRAY, True)
    changed[7] = "другое"  # changed in place between two packings
    assert fast(changed, T.ARRAY, True) == slow(changed, T.ARRAY, True) != before
    changed.append("ещё")
    assert fast(changed, T.ARRAY, True) == slow(changed, T.ARRAY, True)
    zeros = [0.0] * N
    fast(zeros, T.ARRAY, True)
    zeros[3] = -0.0  # equal, but not the same bytes
    assert fast(zeros, T.ARRAY, True) == slow(zeros, T.ARRAY, True)
    ints = [1] * N
    fast(ints, T.ARRAY, True)
    ints[3] = True  # equal, but gguf refuses the mixed array
    with pytest.raises(ValueError):
        fast(ints, T.ARRAY, True)
    small = [3] * N
    assert fast(small, T.ARRAY, True, T.UINT8) == slow(small, T.ARRAY, True, T.UINT8)
    assert fast(small, T.ARRAY, True, T.UINT32) == slow(small, T.ARRAY, True, T.UINT32)  # another sub type
    for i in range(kvpack.MEMO_SIZE + 2):
        kvpack.packed_array([i] * N)
    assert len(kvpack._memo) <= kvpack.MEMO_SIZE
    kvpack.clear_memo()
    assert not kvpack._memo


def _tokenizer_folder(root: Path, merges: list[Any]) -> Path:
    root.mkdir()
    vocab = {c: i for i, c in enumerate(["a", "b", "c", "ab", "a b", "Ġ", "ж"])}
    raw = {"version": "1.0",
           "added_tokens": [{"id": 7, "content": "<|end|>", "special": True, "normalized": False},
                            {"id": 8, "content": "<s>", "special": True, "normalized": False}],
           "post_processor": {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [], "special_tokens": {}},
           "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    (root / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|end|>",
                                                            "chat_template": "{{ messages }}"}), encoding="utf-8")
    (root / "config.json").write_text(json.dumps({"pad_token_id": 7}), encoding="utf-8")
    return root


@pytest.mark.parametrize("merges", [
    ["a b", "ab c", "ж ж"],  # string form: kept as is
    [["a", "b"], ["ab", "c"], ["ж", "ж"]],  # list form (transformers >= 4.45)
    [["a", "b"], ["a b", "c"], [" ", "ж"]],  # list form with spaces inside parts: U+0120 as gguf writes it
    [],  # none: gguf's own loading (and its warning)
])
def test_special_vocab_matches_gguf(merges: list[Any], tmp_path: Path) -> None:
    folder = _tokenizer_folder(tmp_path / "tok", merges)
    want = gguf.SpecialVocab(folder, load_merges=True)
    got = tk.special_vocab(folder, load_merges=True)
    assert list(got.merges) == want.merges
    assert (got.special_token_ids, got.add_special_token, got.chat_template) == \
        (want.special_token_ids, want.add_special_token, want.chat_template)
    assert tk.special_vocab(folder, load_merges=True).merges is got.merges or not merges  # parsed once
    slow, _ = _writers()
    for sv in (want, got):  # and the keys they write
        w = gguf.GGUFWriter(None, "llama")
        sv.add_to_gguf(w, quiet=True)
        sv.kv = {k: slow(v.value, v.type, True, v.sub_type) for k, v in w.kv_data[0].items()}  # type: ignore[attr-defined]
    assert got.kv == want.kv  # type: ignore[attr-defined]


def _bpe_vocab_reference(folder: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """The vocabulary as it was built before the one-pass version: every id looked up in ``get_vocab``."""
    raw = tk.tokenizer_json(folder)
    tok = tk.fast_tokenizer(folder)
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].get("normalized", False):
                token = tok.decode(tok.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].get("special") or tk._looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


@pytest.mark.parametrize("fixture", ["qwen2_ckpt", "llama31_ckpt", "nemo_ckpt"])
def test_bpe_vocab_matches_the_per_id_lookup(fixture: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    size = json.loads((folder / "config.json").read_text())["vocab_size"] + 5  # padded too
    want = _bpe_vocab_reference(folder, size)
    assert tk.bpe_vocab(folder, size) == want
    assert [type(t) for t in tk.bpe_vocab(folder, size)[1]] == [type(t) for t in want[1]]
    assert tk._bpe_vocab_once(folder, size)[0] is tk._bpe_vocab_once(folder, size)[0]  # a second writer's memo hit
