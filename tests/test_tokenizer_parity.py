"""Every format's scorer is checked for tokenizer parity before its numbers are trusted (`Scorer.tokenize`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.quality.evaluate import check_tokenizer


def test_a_transformers_artifact_with_another_tokenizer_is_refused(tmp_path: Path, llama3_ckpt: Path) -> None:
    from transformers import AutoTokenizer

    from quantkit.quality.scorers import TransformersScorer

    original = AutoTokenizer.from_pretrained(str(llama3_ckpt))
    same = tmp_path / "same"
    shutil.copytree(llama3_ckpt, same)
    scorer = TransformersScorer(same, n_ctx=64)
    try:
        check_tokenizer(scorer, original, scorer.n_vocab)  # the same files: accepted
        assert scorer.tokenize("Привет, мир") == original("Привет, мир")["input_ids"]
    finally:
        scorer.close()

    tampered = tmp_path / "tampered"
    shutil.copytree(llama3_ckpt, tampered)
    tok = json.loads((tampered / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["merges"] = tok["model"]["merges"][20:]  # the most frequent merges gone: other ids for Russian
    (tampered / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    scorer = TransformersScorer(tampered, n_ctx=64)
    try:
        with pytest.raises(QuantkitError, match="tokenizes Russian text differently"):
            check_tokenizer(scorer, original, scorer.n_vocab)
    finally:
        scorer.close()
