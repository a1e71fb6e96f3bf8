"""The last way to name a pre-tokenizer: try llama.cpp's runtime with each name it knows.

A vocabulary-only GGUF is written once, with ``tokenizer.ggml.pre`` as its last key; for each candidate name only
that last key is rewritten in place (the file is cut where the key begins and the new value appended), then llama.cpp
loads the vocabulary and tokenizes Russian text and llama.cpp's probe text. The first name whose ids equal the
Hugging Face tokenizer's on both is kept. A 150k-token vocabulary is written once, not once per candidate.

The candidates run in a child process: some names make llama.cpp's BPE code abort the process on a vocabulary built
for another pre-tokenizer (``GGML_ASSERT`` in ``find_bpe_rank``). A crash counts as "does not reproduce" and the
child is restarted after the name that crashed it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit import console
from quantkit.backends.gguf.tokenizer import pretokenizer
from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.arch import Architecture

_KEY = "tokenizer.ggml.pre"


def _write_vocab_file(path: Path, folder: Path, arch: Architecture) -> int:
    """A vocabulary-only GGUF whose last key is ``tokenizer.ggml.pre``; returns the offset where that key starts."""
    import gguf

    from quantkit.backends.gguf.convert.metadata import write_common_metadata
    from quantkit.backends.gguf.tokenizer.files import bpe_vocab, state_unset_flags

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch.gguf_model_arch()])
    w.add_type(gguf.GGUFType.MODEL)
    write_common_metadata(w, arch.hparams, gguf.LlamaFileType.MOSTLY_BF16)
    arch.write_metadata(w)
    tokens, types = bpe_vocab(folder, arch.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True)
    state_unset_flags(folder, special)
    special.add_to_gguf(w, quiet=True)
    w.add_tokenizer_pre("default")  # last key
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    data = path.read_bytes()
    key = struct.pack("<Q", len(_KEY)) + _KEY.encode()
    return data.rindex(key)


def _set_pre(path: Path, offset: int, name: str) -> None:
    key = _KEY.encode()
    value = name.encode()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.truncate()
        fh.write(struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value)
        pad = (-fh.tell()) % 32  # GGUF aligns what follows the header; there is nothing after it here
        fh.write(b"\0" * pad)


def sample(chars: int = 4000) -> str:
    """Russian text from the held-out set plus llama.cpp's probe text (digits, whitespace runs, CJK, emoji)."""
    from quantkit.calibration import load

    text = ""
    for doc in load("builtin:ru-eval").documents:
        text += doc.plain() + "\n\n"
        if len(text) >= chars:
            break
    return text[:chars] + "\n" + pretokenizer.probe_text() + "\n12345 3.14159 2026-12-02  \t x"


def trial(folder: Path, arch: Architecture) -> str:
    """The first name llama.cpp knows whose tokenization equals the original's; refuses in one line naming what was
    tried when none does."""
    from tokenizers import Tokenizer

    from quantkit.backends.gguf.tokenizer.files import tokenizer_json

    text = sample()
    # the file as the tokenizers library runs it: transformers 5's AutoTokenizer replaces the pre-tokenizer of a
    # qwen2/qwen3 checkpoint with Qwen2's own, whatever tokenizer.json says
    want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    names = pretokenizer.runtime_names()
    console.info(f"the tokenizer's pre-tokenizer is not one llama.cpp's converter knows by hash or structure; "
                 f"trying llama.cpp's {len(names)} pre-tokenizers on Russian text")
    with tempfile.TemporaryDirectory(prefix="quantkit-pre-") as tmp:
        path = Path(tmp) / "vocab.gguf"
        offset = _write_vocab_file(path, folder, arch)
        (Path(tmp) / "text.txt").write_text(text, encoding="utf-8")
        (Path(tmp) / "want.json").write_text(json.dumps(want), encoding="utf-8")
        left = list(names)
        while left:
            found, left = _run_child(Path(tmp), offset, left)
            if found:
                console.info(f"pre-tokenizer: {found} reproduces the tokenizer exactly")
                return found
    shape = pretokenizer.describe(tokenizer_json(folder))
    raise QuantkitError(
        f"no pre-tokenizer llama.cpp knows reproduces this tokenizer ({shape}); tried {len(names)}: "
        f"{', '.join(names[:6])}, …",
        "llama.cpp cannot run this tokenizer as it is; if you know the right name, pass --pre-tokenizer NAME",
    )


def _run_child(tmp: Path, offset: int, names: list[str]) -> tuple[str | None, list[str]]:
    """Try `names` in order in a child; returns (the match or None, the names not tried yet)."""
    cmd = [sys.executable, "-m", "quantkit.backends.gguf.tokenizer.trial", str(tmp), str(offset), *names]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=False)
    tried = [ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("TRY ")]
    match = next((ln.split(" ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("MATCH ")), None)
    if match or proc.returncode == 0:
        return match, []
    return None, names[len(tried):] if tried else names[1:]  # the last name tried crashed the child


def _child(tmp: Path, offset: int, names: list[str]) -> None:
    from quantkit.backends.gguf.llamacpp import LlamaModel

    path = tmp / "vocab.gguf"
    text = (tmp / "text.txt").read_text(encoding="utf-8")
    want = json.loads((tmp / "want.json").read_text(encoding="utf-8"))
    for name in names:
        print(f"TRY {name}", flush=True)
        _set_pre(path, offset, name)
        try:
            model = LlamaModel(path, vocab_only=True)
        except QuantkitError:
            continue
        try:
            got = model.tokenize(text, add_special=False)
        finally:
            model.close()
        if got == want:
            print(f"MATCH {name}", flush=True)
            return


if __name__ == "__main__":
    _child(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
