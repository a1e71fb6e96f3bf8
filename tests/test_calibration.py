"""The built-in Russian data and the calibration loader every backend uses."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from quantkit.calibration import CalibrationSpec, builtin_dir, load, split_paragraphs, token_rows
from quantkit.errors import QuantkitError

ROOT = Path(__file__).resolve().parent.parent


def _sentences(text: str) -> set[str]:
    parts = re.split(r"(?<=[.!?…])\s+", text)
    return {re.sub(r"\s+", " ", p.strip()).lower() for p in parts if len(p.strip()) >= 40}


def test_builtin_sets_are_big_varied_and_separate() -> None:
    mix = load("builtin:ru-mix")
    ev = load("builtin:ru-eval")
    mix_bytes = sum((builtin_dir() / "ru-mix").joinpath(p).stat().st_size for p in
                    [f.name for f in (builtin_dir() / "ru-mix").iterdir()])
    assert mix_bytes >= 300_000
    assert (builtin_dir() / "ru-eval" / "ru-eval.txt").stat().st_size >= 80_000
    text_domains = {d.domain for d in mix.documents if d.text is not None}
    assert len(text_domains) >= 8
    assert sum(1 for d in mix.documents if d.messages is not None) >= 150
    assert mix.cyrillic_share() > 0.8 and ev.cyrillic_share() > 0.8
    paragraphs = [d.plain() for d in mix.documents if d.text is not None]
    assert len(paragraphs) == len(set(paragraphs)), "duplicate paragraphs in ru-mix"
    mix_sents = set().union(*(_sentences(d.plain()) for d in mix.documents))
    shared = set().union(*(_sentences(d.plain()) for d in ev.documents)) & mix_sents
    assert not shared, f"ru-eval shares sentences with ru-mix: {sorted(shared)[:3]}"


def test_spec_kinds_load(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("Первый абзац про реки.\n\nВторой абзац про горы.", encoding="utf-8")
    assert [d.text for d in load(str(txt)).documents] == ["Первый абзац про реки.", "Второй абзац про горы."]
    jl = tmp_path / "a.jsonl"
    jl.write_text(json.dumps({"text": "Просто текст."}, ensure_ascii=False) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуйте"}]},
        ensure_ascii=False) + "\n", encoding="utf-8")
    docs = load(str(jl)).documents
    assert docs[0].text == "Просто текст." and docs[1].messages[1]["content"] == "Здравствуйте"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Строка один.", "Строка два."]}), tmp_path / "a.parquet")
    assert len(load(str(tmp_path / "a.parquet")).documents) == 2
    assert CalibrationSpec.parse("hf:org/set:validation:content") == CalibrationSpec("hf", "org/set", "validation",
                                                                                     "content")


def test_bad_input_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantkitError, match="does not exist"):
        load(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(QuantkitError, match="is empty"):
        load(str(tmp_path / "empty.txt"))
    (tmp_path / "cp1251.txt").write_bytes("Привет, мир".encode("cp1251"))
    with pytest.raises(QuantkitError, match="not UTF-8"):
        load(str(tmp_path / "cp1251.txt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QuantkitError, match="offline"):
        load("hf:some/dataset")
    with pytest.raises(QuantkitError, match="unknown built-in"):
        CalibrationSpec.parse("builtin:en-mix")


def test_rows_deterministic_and_too_short(llama3_ckpt: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(llama3_ckpt)
    a = token_rows("builtin:ru-mix", tok, n_samples=8, seq_len=128, seed=1)
    b = token_rows("builtin:ru-mix", tok, n_samples=8, seq_len=128, seed=1)
    c = token_rows("builtin:ru-mix", tok, n_samples=8, seq_len=128, seed=2)
    assert a.shape == (8, 128) and np.array_equal(a, b) and not np.array_equal(a, c)
    short = tmp_path / "short.txt"
    short.write_text("Короткий текст о погоде.", encoding="utf-8")
    with pytest.raises(QuantkitError, match=r"has \d+ tokens .* need 1,024"):
        token_rows(str(short), tok, n_samples=8, seq_len=128)


def test_cyrillic_warning(llama3_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = AutoTokenizer.from_pretrained(llama3_ckpt)
    english = tmp_path / "en.txt"
    english.write_text("\n\n".join(f"Paragraph {i} about rivers, hills and weather." for i in range(400)))
    token_rows(str(english), tok, n_samples=2, seq_len=64)
    assert "Cyrillic" in capsys.readouterr().err


def test_chat_template_only_for_instruct(llama3_ckpt: Path, qwen2_ckpt: Path) -> None:
    data = load("builtin:ru-mix")
    base_tok = AutoTokenizer.from_pretrained(llama3_ckpt)
    inst_tok = AutoTokenizer.from_pretrained(qwen2_ckpt)
    im_start = inst_tok.convert_tokens_to_ids("<|im_start|>")
    inst = token_rows(None, inst_tok, n_samples=16, seq_len=256, chat=True, data=data)
    plain = token_rows(None, inst_tok, n_samples=16, seq_len=256, chat=False, data=data)
    assert (inst == im_start).sum() > 0 and (plain == im_start).sum() == 0
    base = token_rows(None, base_tok, n_samples=16, seq_len=256, chat=True, data=data)  # no template: plain
    header = base_tok.convert_tokens_to_ids("<|start_header_id|>")
    assert (base == header).sum() == 0


def test_wheel_carries_the_data(tmp_path: Path) -> None:
    """The installed package (a wheel), not the source tree, holds the built-in sets."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("quantkit_ru-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "quantkit/calibration_data/ru-eval/ru-eval.txt" in names
    assert "quantkit/calibration_data/ru-mix/chat.jsonl" in names
    assert sum(n.startswith("quantkit/calibration_data/ru-mix/") and n.endswith(".txt") for n in names) >= 8


def test_split_paragraphs() -> None:
    assert split_paragraphs("a\n\n\nb\n \nc") == ["a", "b", "c"]
