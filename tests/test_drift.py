"""Does the quant still answer in Russian? Measures on hand-written answers, the built-in prompts, greedy generation
through llama.cpp and transformers, the drift gate and its CLI."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.quality import drift

QK = [sys.executable, "-m", "quantkit.cli.app"]
ROOT = Path(__file__).resolve().parents[1]

RU = "Хлеб черствеет в холодильнике быстрее, потому что крахмал при низкой температуре кристаллизуется."
RU_TERMS = ("Для этого удобно взять библиотеку NumPy: функция np.mean считает среднее, а PyTorch нужен "
            "для обучения моделей на GPU.")
RU_TO_CHINESE = "Чтобы сварить гречку, промойте крупу. 然后把水烧开，加入盐，煮十五分钟。"
RU_TO_ENGLISH = "Промойте крупу и залейте водой. Then bring the water to a boil and add some salt."
CODE = ('Вот функция на Python:\n```python\ndef is_palindrome(s: str) -> bool:\n    """Check the string."""\n'
        '    return s == s[::-1]\n```\nОна сравнивает строку с её обратной копией, например `is_palindrome("шалаш")`.')


# -- measures on hand-written answers -----------------------------------------------------------------------

def test_script_shares() -> None:
    assert drift.script_shares(RU) == {"cyrillic": 1.0, "latin": 0.0, "cjk": 0.0, "other": 0.0}
    shares = drift.script_shares(RU_TERMS)
    assert 0.7 < shares["cyrillic"] < 0.9 and shares["latin"] == pytest.approx(1 - shares["cyrillic"])
    mixed = drift.script_shares(RU_TO_CHINESE)
    assert mixed["cjk"] > 0.3 and mixed["cyrillic"] > 0.5 and mixed["latin"] == 0
    assert drift.script_shares(CODE)["cyrillic"] > 0.9  # the code block and `inline` code are not counted
    assert drift.script_shares("123, 456!") == {"cyrillic": None, "latin": None, "cjk": None, "other": None}
    assert drift.script_shares("Ελληνικά и русский")["other"] == 0.5


def test_left_russian_flags_switches_not_terms_or_code() -> None:
    assert drift.left_russian(RU) is None
    assert drift.left_russian(RU_TERMS) is None  # single Latin terms inside Russian sentences
    assert drift.left_russian(CODE) is None  # code, identifiers and `inline` code are not language
    assert "CJK" in (drift.left_russian(RU_TO_CHINESE) or "")
    why = drift.left_russian(RU_TO_ENGLISH)
    assert why is not None and "Then bring the water" in why
    assert drift.left_russian("Ответ: 42, 3.14 и 1e-5; см. https://example.org/a_b.") is None
    # a Latin term the bf16 answer also used is allowed, however long
    phrase = "Это называется machine learning model training и давно известно."
    assert drift.left_russian(phrase) is not None
    assert drift.left_russian(phrase, reference="Речь о machine learning model training в целом.") is None
    # Chinese that bf16 also wrote is not the quant's drift; new Chinese is
    assert drift.left_russian(RU_TO_CHINESE, reference=RU_TO_CHINESE) is None
    assert drift.left_russian("Ответ: 好的", reference="Ответ: да") is not None
    assert drift.left_russian("Один 好 символ") is None  # a single stray character is not a switch
    assert "letters in foreign words" in (drift.left_russian("EEEEEEEEEEEEEEEEEEEEEEEE") or "")
    assert "letters in foreign words" in (drift.left_russian("Ответ: Hallo, Wohnungsbaugesellschaft") or "")
    assert drift.left_russian("Строка 000000 0 0 0 ,,,,") is None


def test_prefix_and_summary() -> None:
    assert drift.common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert drift.common_prefix([1, 2], [1, 2, 3]) == 2
    assert drift.same_start([1, 2, 3], [1, 2, 3], 16) and not drift.same_start([1, 2, 3], [1, 2], 16)
    prompts = ["a", "b", "c", "d"]
    ref = [{"text": t, "ids": [1, 2, 3, i]} for i, t in enumerate([RU, RU_TERMS, RU, CODE])]
    out = [dict(ref[0]), dict(ref[1]), {"text": RU_TO_ENGLISH, "ids": [1, 2, 7]},
           {"text": RU_TO_CHINESE, "ids": [5]}]
    s = drift.summarize(prompts, ref, out, prefix=3)
    assert s["prompts"] == 4 and s["left_russian"] == 2 and s["kept"] == 0.5 and s["left_russian_bf16"] == 0
    assert s["same_prefix"] == 2 and s["identical"] == 2 and s["mean_common_prefix"] == (4 + 4 + 2 + 0) / 4
    assert s["cyrillic_bf16"] > s["cyrillic"] and s["scripts"]["cjk"] > 0
    assert [e["prompt"] for e in s["examples"]][:2] == ["d", "c"] or {e["prompt"] for e in s["examples"][:2]} == \
        {"c", "d"}
    assert all(e["left_russian"] for e in s["examples"][:2])
    assert drift.drift_value(s) == 0.5
    with pytest.raises(ValueError):
        drift.summarize(prompts, ref, out[:2])
    # where bf16 itself left Russian, the quant's answer is not held against it
    gone = drift.summarize(["a"], [{"text": RU_TO_ENGLISH, "ids": [1]}], [{"text": RU_TO_CHINESE, "ids": [2]}])
    assert gone["left_russian_bf16"] == 1 and gone["left_russian"] == 0 and gone["kept"] == 1.0


# -- the built-in prompts -------------------------------------------------------------------------------------

def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def test_builtin_prompts_are_ours_and_shipped() -> None:
    prompts = drift.load_prompts(None, None)
    assert 90 <= len(prompts) <= 120
    assert {p.kind for p in prompts} == set(drift.KINDS)
    assert len({p.domain for p in prompts}) >= 10
    assert len({p.text for p in prompts}) == len(prompts)
    assert all(drift.script_shares(p.text)["cyrillic"] > 0.7 and drift.left_russian(p.text) is None for p in prompts)
    first = drift.load_prompts(None)
    assert len(first) == drift.DEFAULT_PROMPTS and {p.kind for p in first} == set(drift.KINDS)
    # none taken from the calibration mix or the eval text: no sentence, no run of 6 words
    from quantkit.calibration import load

    corpus = " ".join(_norm(d.plain()) for spec in ("builtin:ru-mix", "builtin:ru-eval")
                      for d in load(spec).documents)
    grams = set()
    words = corpus.split()
    grams = {" ".join(words[i : i + 6]) for i in range(len(words) - 5)}
    for p in prompts:
        norm = _norm(p.text)
        assert norm not in corpus, p.text
        w = norm.split()
        shared = [" ".join(w[i : i + 6]) for i in range(len(w) - 5) if " ".join(w[i : i + 6]) in grams]
        assert not shared, (p.text, shared)
    # the wheel ships the file (package quantkit.calibration_data = calibration/)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = meta["tool"]["setuptools"]["package-data"]["quantkit.calibration_data"]
    assert any(fnmatch.fnmatch("ru-drift/prompts.jsonl", pat) for pat in patterns)


def test_bad_prompt_files(tmp_path: Path) -> None:
    cases = {
        "missing.jsonl": None,
        "notjson.jsonl": '{"prompt": "Привет"}\n{oops\n',
        "noprompt.jsonl": '{"text": "Привет"}\n',
        "badkind.jsonl": '{"prompt": "Привет", "kind": "poem"}\n',
        "empty.txt": "\n\n",
        "binary.txt": b"\xff\xfe\x00bad",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(QuantkitError) as err:
            drift.load_prompts(str(path))
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(QuantkitError, match="line 2: not JSON"):
        drift.load_prompts(str(tmp_path / "notjson.jsonl"))
    (tmp_path / "mine.txt").write_text("Как дела?\nРасскажи о Волге.\n", encoding="utf-8")
    assert [p.text for p in drift.load_prompts(str(tmp_path / "mine.txt"))] == ["Как дела?", "Расскажи о Волге."]


def test_cli_refuses_bad_prompts_in_one_line(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "manifest.json").write_text(json.dumps({"model": {}, "steps": {}, "artifacts": {}}), encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[1, 2]\n", encoding="utf-8")
    for arg in (str(bad), str(tmp_path / "none.jsonl")):
        proc = subprocess.run([*QK, "eval", str(ws), "--drift-prompts", arg], capture_output=True, text=True)
        assert proc.returncode != 0
        err = proc.stderr.strip()
        assert err.startswith("error: drift prompts") and err.count("\n") == 0 and "Traceback" not in err, err


# -- generation on the fixtures ---------------------------------------------------------------------------------

def _continuations(path: Path, n: int = 10) -> Path:
    """Continuation prompts from the fixtures' own training text: the tiny models answer them with Russian words."""
    from quantkit.calibration import load

    paras = [d.plain() for d in load("builtin:ru-mix").documents if len(d.plain()) > 200]
    with path.open("w", encoding="utf-8") as f:
        for p in paras[: 40 * n : 40]:
            f.write(json.dumps({"kind": "continuation", "prompt": p[:120].rsplit(" ", 1)[0]}, ensure_ascii=False)
                    + "\n")
    return path


@pytest.fixture(scope="module")
def drift_ws(llama3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    from quantkit.backends.base import JobContext
    from quantkit.backends.gguf.backend import GGUFOptions
    from quantkit.pipeline import make
    from quantkit.source import load_local
    from quantkit.workspace import Workspace, record_model

    root = tmp_path_factory.mktemp("drift")
    ws = Workspace(root / "ws")
    ck = load_local(llama3_ckpt, name="tiny-llama3", source=str(llama3_ckpt))
    ctx = JobContext.of(ck, ws, calib_samples=8, calib_seq_len=256)
    make(ctx, "gguf", GGUFOptions(types=["Q2_K", "Q8_0"], verify=False))
    record_model(ws, ck)
    return ws, _continuations(root / "cont.jsonl")


@pytest.mark.slow
def test_bf16_gguf_answers_like_bf16_and_drift_is_cached(drift_ws: tuple[object, Path]) -> None:
    from quantkit.quality.evaluate import evaluate_workspace
    from quantkit.quality.generate import DriftSettings
    from quantkit.workspace import Workspace

    ws, prompts = drift_ws
    settings = DriftSettings(prompts=str(prompts), count=None, new_tokens=32)
    report = evaluate_workspace(ws, n_ctx=256, chunks=2, drift=settings)
    rows = {r["quant"]: r for r in report["rows"]}
    bf16 = rows["BF16"]["drift"]
    # greedy decoding, float32 transformers vs llama.cpp on the BF16 file: token for token the same answers
    assert bf16["identical"] == bf16["prompts"] == 10 and bf16["kept"] == 1.0 and bf16["left_russian"] == 0
    assert bf16["mean_common_prefix"] > 0 and bf16["cyrillic"] == bf16["cyrillic_bf16"] > 0.9
    assert report["drift"]["bf16_dtype"] == "float32" and report["drift"]["count"] == 10
    assert rows["Q2_K"]["drift"]["same_prefix"] <= rows["Q8_0"]["drift"]["same_prefix"] <= 10
    assert all(r["passed"] for r in rows.values())
    ws2 = Workspace(ws.root)
    assert ws2.artifacts["gguf/tiny-llama3-BF16.gguf"]["drift"]["identical"] == 10
    assert ws2.artifacts["gguf/tiny-llama3-Q8_0.gguf"]["gate"]["max_drift"] == settings.max_drift
    (ref_file,) = (ws.root / "eval").glob("drift-reference-*.json")  # the bf16 answers, cached
    ref_mtime = ref_file.stat().st_mtime_ns
    # a second run reads the cached bf16 answers and the artifacts' results
    import quantkit.quality.generate as gen

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("answers generated again")

    from quantkit.backends.gguf import llamacpp

    saved, gen.load_hf = gen.load_hf, boom
    saved_gen, llamacpp.LlamaScorer.generate_many = llamacpp.LlamaScorer.generate_many, boom  # type: ignore
    try:
        again = evaluate_workspace(ws2, n_ctx=256, chunks=2, drift=settings)
    finally:
        gen.load_hf = saved
        llamacpp.LlamaScorer.generate_many = saved_gen  # type: ignore[method-assign]
    assert ref_file.stat().st_mtime_ns == ref_mtime
    assert [r["drift"]["kept"] for r in again["rows"]] == [r["drift"]["kept"] for r in report["rows"]]


@pytest.mark.slow
def test_generation_paths_agree(drift_ws: tuple[object, Path], llama3_ckpt: Path) -> None:
    """llama.cpp's batched and one-at-a-time KV-cache loops, the universal loop through chunk_logits (EXL2 and
    third-party formats) and transformers' KV-cache loop (bf16, GPTQ) give the same greedy tokens on the BF16 file."""
    from transformers import AutoTokenizer

    from quantkit.backends.gguf.llamacpp import LlamaScorer
    from quantkit.quality.generate import (
        generator_for,
        hf_greedy,
        hf_greedy_many,
        load_hf,
        render,
        scorer_greedy,
        stop_ids,
    )
    from quantkit.source import load_local

    ws, prompts = drift_ws
    ck = load_local(llama3_ckpt, name="tiny-llama3", source=str(llama3_ckpt))
    tok = AutoTokenizer.from_pretrained(ck.path)
    ids = render(drift.load_prompts(str(prompts), 3), tok, instruct=False)
    stop = stop_ids(ck, tok)
    scorer = LlamaScorer(ws.root / "gguf" / "tiny-llama3-BF16.gguf", n_ctx=128)
    model, dtype = load_hf(ck)
    try:
        assert generator_for(scorer) == scorer.generate
        batched = scorer.generate_many(ids, 20, stop, group=2)
        hf_batched = hf_greedy_many(model, ids, 20, stop, group=2)
        for p, many, hf_many in zip(ids, batched, hf_batched, strict=True):
            fast = scorer.generate(p, 20, stop)
            assert many == fast == scorer_greedy(scorer, p, 20, stop) == hf_greedy(model, p, 20, stop) == hf_many
            assert len(fast) == 20 or fast[-1] in stop
    finally:
        scorer.close()
    assert dtype == "float32"


def test_render_uses_chat_template_for_instruct(qwen2_ckpt: Path, llama3_ckpt: Path) -> None:
    from transformers import AutoTokenizer

    from quantkit.quality.generate import render, stop_ids
    from quantkit.source import load_local

    ps = [drift.Prompt("Почему небо голубое?"), drift.Prompt("Волга берёт начало", "continuation")]
    qtok = AutoTokenizer.from_pretrained(qwen2_ckpt)
    chat = [qtok.decode(i) for i in render(ps, qtok, instruct=True)]
    assert all("<|im_start|>user" in t and t.rstrip().endswith("<|im_start|>assistant") for t in chat)
    assert "Продолжи текст" in chat[1] and "Почему небо голубое?" in chat[0]
    assert qtok.convert_tokens_to_ids("<|im_end|>") in stop_ids(load_local(qwen2_ckpt, name="q", source="q"), qtok)
    ltok = AutoTokenizer.from_pretrained(llama3_ckpt)
    plain = [ltok.decode(i, skip_special_tokens=True) for i in render(ps, ltok, instruct=False)]
    assert plain == ["Вопрос: Почему небо голубое?\nОтвет:", "Волга берёт начало"]


@pytest.mark.slow
def test_gate_fails_an_artifact_that_left_russian(drift_ws: tuple[object, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An artifact whose answers switch to English fails `--max-drift`, and the CLI exits non-zero. The switch is
    simulated (the fixture models never leave Russian): Q2_K's llama.cpp generator answers in English."""
    from typer.testing import CliRunner

    from quantkit.backends.gguf import llamacpp
    from quantkit.cli.app import app

    ws, prompts = drift_ws
    copy = tmp_path / "ws"
    shutil.copytree(ws.root, copy)
    real = llamacpp.LlamaScorer.generate_many

    def generate_many(self: llamacpp.LlamaScorer, prompts: list[list[int]], max_new: int, stop: set[int]
                      ) -> list[list[int]]:
        if "Q2_K" not in self.name:
            return real(self, prompts, max_new, stop)
        english = self.model.tokenize(" Then bring the water to a boil and print the result")
        return [english[:max_new] for _ in prompts]

    monkeypatch.setattr(llamacpp.LlamaScorer, "generate_many", generate_many)
    result = CliRunner().invoke(app, ["eval", str(copy), "--ctx", "256", "--chunks", "2", "--drift-prompts",
                                      str(prompts), "--drift-tokens", "24", "--max-drift", "0.2", "--json"])
    from quantkit import errors

    assert result.exit_code == getattr(errors, "EXIT_GATE", 2), result.output  # the gate's own exit code
    report = json.loads(result.stdout[result.stdout.index("{"):])
    rows = {r["quant"]: r for r in report["rows"]}
    assert rows["Q2_K"]["drift"]["left_russian"] == 10 and rows["Q2_K"]["drift"]["kept"] == 0.0
    assert not rows["Q2_K"]["passed"] and "left Russian in 10/10 answers" in rows["Q2_K"]["reasons"][0]
    assert rows["BF16"]["passed"] and rows["Q8_0"]["passed"]
    ex = rows["Q2_K"]["drift"]["examples"][0]
    assert "Then bring the water" in ex["answer"] and ex["left_russian"]
    assert "failed the quality gate" in result.output and "--max-drift" in result.output
    np.testing.assert_equal(rows["BF16"]["drift"]["identical"], 10)


def test_recipe_drift_setting(tmp_path: Path) -> None:
    from quantkit.recipe import RecipeError, drift_settings, load_recipe, settings

    path = tmp_path / "r.yaml"
    path.write_text("defaults:\n  drift: true\n  gates: {max_drift: 0.05}\nmodels:\n  - source: demo\n    gguf: "
                    "{types: [Q8_0]}\n", encoding="utf-8")
    recipe = load_recipe(path)
    st = recipe.settings(recipe.spec.models[0])
    assert st["drift"] is True and st["max_drift"] == 0.05
    job_settings = settings(recipe, recipe.spec.models[0])
    assert job_settings.drift is True and job_settings.max_drift == 0.05
    assert drift_settings(True, 0.05).max_drift == 0.05 and drift_settings(False, 0.05) is None
    path.write_text("defaults:\n  drift: maybe\nmodels:\n  - source: demo\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="drift"):
        load_recipe(path)


def test_prompt_longer_than_the_context(llama3_ckpt: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from quantkit.quality.generate import DriftCheck, DriftSettings
    from quantkit.source import load_local
    from quantkit.workspace import Workspace

    ck = load_local(llama3_ckpt, name="tiny-llama3", source=str(llama3_ckpt))
    long = tmp_path / "long.txt"
    long.write_text("Расскажи подробно: " + "очень " * 5000 + "\n", encoding="utf-8")
    with pytest.raises(QuantkitError, match="exceeds tiny-llama3's context"):
        DriftCheck(Workspace(tmp_path / "ws"), ck, AutoTokenizer.from_pretrained(ck.path),
                   DriftSettings(prompts=str(long)))


@pytest.mark.slow
def test_gptq_answers_through_its_transformers_model(llama3_ckpt: Path, tmp_path: Path) -> None:
    """A GPTQ folder generates through the transformers model its scorer loads (KV cache), on the CPU here."""
    import os

    from quantkit.quality.evaluate import evaluate_workspace
    from quantkit.quality.generate import DriftSettings
    from quantkit.workspace import Workspace

    ws = tmp_path / "ws"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    res = subprocess.run([*QK, "gptq", str(llama3_ckpt), "--bits", "4", "--group-size", "64", "--calib-samples", "8",
                          "--calib-seq-len", "256", "-w", str(ws), "--json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    prompts = _continuations(tmp_path / "cont.jsonl", 4)
    report = evaluate_workspace(Workspace(ws), n_ctx=256, chunks=2,
                                drift=DriftSettings(prompts=str(prompts), count=None, new_tokens=16))
    (row,) = report["rows"]
    d = row["drift"]
    assert row["format"] == "gptq" and d["prompts"] == 4 and 4 <= d["generated_tokens"] <= 64
    assert d["left_russian"] == 0 and 0 <= d["same_prefix"] <= 4 and d["seconds"] > 0


def test_reference_that_does_not_fit_is_refused(llama3_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import quantkit.quality.generate as gen
    from quantkit.source import load_local

    monkeypatch.setattr(gen, "_available_memory", lambda: 1 << 20)
    import torch

    monkeypatch.setattr(gen, "_torch", lambda: torch)
    if torch.cuda.is_available():
        pytest.skip("checks the CPU memory bound")
    with pytest.raises(QuantkitError, match="holds tiny-llama3 whole in memory"):
        gen.load_hf(load_local(llama3_ckpt, name="tiny-llama3", source=str(llama3_ckpt)))
