"""GPTQ through GPTQModel: options, refusal of impossible group sizes, and real quantization of the fixture models,
loaded back through transformers and scored on Russian text against bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from quantkit import calibration
from quantkit.backends.base import JobContext, Scorer, get_backend
from quantkit.backends.gptq import GPTQBackend, GPTQOptions, TransformersScorer, check_group_size, estimate_size
from quantkit.card import render_card
from quantkit.errors import QuantkitError
from quantkit.pipeline import make, plan_for
from quantkit.safetensors_io import read_header
from quantkit.source import resolve
from quantkit.workspace import Workspace, record_model

QUANTKIT = str(Path(sys.executable).with_name("quantkit"))
CALIB = ["--calib-samples", "16", "--calib-seq-len", "256"]
N_CTX = 512


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(cwd / "hf-home")}
    env.pop("HF_TOKEN", None)
    return subprocess.run([QUANTKIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def eval_tokens(model_dir: Path) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return np.asarray(calibration.token_stream(calibration.load("builtin:ru-eval"), tok, chat=False, seed=0))


def log_probs(scorer: Scorer, tokens: np.ndarray, chunks: int) -> list[np.ndarray]:
    """log-softmax over the second half of each `N_CTX` chunk (like llama-perplexity), float64."""
    out = []
    for c in range(min(chunks, len(tokens) // N_CTX)):
        logits = scorer.chunk_logits(tokens[c * N_CTX:(c + 1) * N_CTX], N_CTX // 2 - 1)[:-1].astype(np.float64)
        top = logits.max(1, keepdims=True)
        out.append(logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True)))
    return out


def compare(ref_dir: Path, quant_dir: Path, chunks: int = 8, backend: str = "gptq") -> dict[str, float]:
    """PPL of bf16 and of the quantized model (GPTQ, AWQ) on the same Russian tokens, mean KL(bf16 ‖ it) and top-1
    agreement."""
    tokens = eval_tokens(ref_dir)
    ref_scorer = TransformersScorer(ref_dir, n_ctx=N_CTX)
    ref = log_probs(ref_scorer, tokens, chunks)
    ref_scorer.close()
    scorer = get_backend(backend).scorer(quant_dir, n_ctx=N_CTX)
    assert isinstance(scorer, Scorer)
    got = log_probs(scorer, tokens, chunks)
    scorer.close()
    targets = [tokens[c * N_CTX + N_CTX // 2:(c + 1) * N_CTX] for c in range(len(ref))]

    def ppl(lps: list[np.ndarray]) -> float:
        nll = [-lp[np.arange(len(t)), t] for lp, t in zip(lps, targets, strict=True)]
        return float(np.exp(np.mean(np.concatenate(nll))))

    kl = np.concatenate([(np.exp(a) * (a - b)).sum(1) for a, b in zip(ref, got, strict=True)])
    top1 = np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(ref, got, strict=True)])
    return {"ppl_ref": ppl(ref), "ppl": ppl(got), "kl": float(kl.mean()), "top1": float(top1.mean())}


# Quality bounds for 4-bit g64 on the fixtures. Measured here: PPL moves by -0.02..+0.03% (llama3, PPL ~370 on
# ru-eval: 2 layers, 120 training steps, near-Gaussian weights whose rounding noise barely matters) and +0.01% (qwen2,
# untrained, PPL ~ the vocabulary size); mean KL 4-5e-5 (llama3) and 5e-6 (qwen2), top-1 0.97 / 0.99; 2-bit g64
# reaches KL 7e-4. So a "strictly above bf16" PPL cannot be asked of these models: PPL may be below bf16 by noise only
# (0.5%), and at most +2% above (20x what even 2-bit does here; a wrong scale/zero/g_idx layout sends PPL towards the
# vocabulary size, +450%). Mean KL, the sensitive measure, must be > 0 (the weights really are quantized) and below
# 5e-4 (10x the 4-bit measurement, under the 2-bit one); top-1 agreement at least 0.9.
PPL_BELOW, PPL_ABOVE, MAX_KL, MIN_TOP1 = 0.005, 0.02, 5e-4, 0.9


def assert_quality(q: dict[str, float]) -> None:
    assert np.isfinite(q["ppl"]) and np.isfinite(q["ppl_ref"]), q
    assert q["ppl_ref"] * (1 - PPL_BELOW) <= q["ppl"] <= q["ppl_ref"] * (1 + PPL_ABOVE), q
    assert 0 < q["kl"] < MAX_KL, q
    assert q["top1"] >= MIN_TOP1, q


def text_files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir() if p.suffix in (".json", ".jinja")}


# -- fast -----------------------------------------------------------------------------------------------

def test_options_and_names() -> None:
    assert GPTQOptions().quant == "4bit-g128"
    assert GPTQOptions(bits=3, group_size=64, desc_act=True, sym=False).quant == "3bit-g64-desc-asym"
    assert GPTQOptions(group_size=-1).quant == "4bit-g-1"
    for bad in ({"bits": 5}, {"group_size": 0}, {"group_size": -2}, {"damp": 0.0}, {"damp": 1.0}, {"nope": 1}):
        with pytest.raises(ValidationError):
            GPTQOptions(**bad)


def test_registered_and_check() -> None:
    backend = get_backend("gptq")
    assert isinstance(backend, GPTQBackend) and backend.options_model is GPTQOptions
    reason = backend.check()
    assert reason is None or "pip install 'quantkit-ru[gptq]'" in reason


def test_group_size_must_divide_every_input_width(llama3_ckpt: Path) -> None:
    ckpt = resolve(str(llama3_ckpt))
    for ok in (16, 64, 128, 256, -1):
        check_group_size(ckpt, ok)
    with pytest.raises(QuantkitError) as err:
        check_group_size(ckpt, 96)  # divides down_proj's 768 but not the 256 of q/k/v/o/gate/up
    assert "96" in err.value.message and "256" in err.value.message and "_proj" in err.value.message
    assert "16, 32, 64, 128, 256" in (err.value.hint or "")
    with pytest.raises(QuantkitError):
        check_group_size(ckpt, 512)


def test_cli_refuses_impossible_group_size_before_work(llama3_ckpt: Path, tmp_path: Path) -> None:
    res = cli("gptq", str(llama3_ckpt), "--group-size", "96", "-w", str(tmp_path / "ws"), cwd=tmp_path)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "--group-size 96" in lines[0] and "model.layers.*." in lines[0] and "64, 128, 256" in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "ws" / "gptq").exists()


def test_cli_dry_run_plans_without_work(llama3_ckpt: Path, tmp_path: Path) -> None:
    res = cli("gptq", str(llama3_ckpt), "--group-size", "64", "--dry-run", "--json", "-w", str(tmp_path / "ws"),
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["dry_run"] and plan["format"] == "gptq"
    (step,) = [s for s in plan["plan"] if s["kind"] == "quantize"]  # the backend's step
    assert step["key"] == "gptq/quantize/4bit-g64" and step["output"] == "gptq/4bit-g64/" and step["done"] is False
    assert [s["kind"] for s in plan["plan"]] == ["resolve", "calibrate", "quantize", "verify"]
    ckpt = resolve(str(llama3_ckpt))
    assert 0.25 * ckpt.n_params * 2 < step["estimated_size"] < ckpt.n_params * 2  # bf16 source = params x 2 bytes
    assert not (tmp_path / "ws" / "gptq").exists()


def test_owns(llama3_ckpt: Path, tmp_path: Path) -> None:
    backend = GPTQBackend()
    assert not backend.owns(llama3_ckpt)
    assert not backend.owns(tmp_path / "missing")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert not backend.owns(tmp_path / "model.gguf")
    other = tmp_path / "exl2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl2"}}))
    assert not backend.owns(other)
    with pytest.raises(QuantkitError):
        backend.scorer(other, n_ctx=N_CTX)


# -- quantizing (slow) ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_gptq(llama3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Llama-3 fixture quantized to 4-bit g64 through the real CLI, with --json."""
    cwd = tmp_path_factory.mktemp("gptq-cli")
    ws = cwd / "ws"
    res = cli("gptq", str(llama3_ckpt), "--bits", "4", "--group-size", "64", *CALIB, "-w", str(ws), "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # GPTQModel's console output must not reach stdout
    return {"cwd": cwd, "ws": ws, "summary": summary, "folder": ws / "gptq" / "4bit-g64"}


@pytest.mark.slow
def test_llama3_folder_is_a_clean_gptq_checkpoint(llama3_gptq: dict[str, Any], llama3_ckpt: Path) -> None:
    folder: Path = llama3_gptq["folder"]
    config = json.loads((folder / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["format"] == "gptq"
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"], qcfg["sym"]) == (4, 64, False, True)
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["quant_method"]) == (4, 64, False, "gptq")
    assert GPTQBackend().owns(folder)
    # the source's config, tokenizer and generation config, unchanged apart from quantization_config
    source_config = json.loads((llama3_ckpt / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source_config
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (llama3_ckpt / name).read_bytes(), name
    # no machine paths, no calibration text, no GPTQModel temp names in anything published
    calib_text = calibration.load("builtin:ru-mix").documents[0].plain()[:40]
    for name, text in text_files(folder).items():
        for needle in (str(llama3_gptq["ws"]), str(llama3_ckpt), "/tmp", str(Path.home()), "gptqmodel_",
                       "offload_to_disk_path", calib_text):
            assert needle not in text, (name, needle)
    # GPTQ tensors; g_idx is the trivial one loaders without act-order assume
    import torch
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert not any(n.endswith("_proj.weight") for n in names if ".layers." in n)
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            assert f"model.layers.0.self_attn.q_proj.{suffix}" in names
        g_idx = f.get_tensor("model.layers.1.mlp.down_proj.g_idx")
        assert torch.equal(g_idx, torch.arange(768, dtype=g_idx.dtype) // 64)
    # nothing left behind: no work folder, no partial folder, no GPTQModel `logs/` in the current directory
    assert sorted(p.name for p in (llama3_gptq["ws"] / "gptq").iterdir()) == ["4bit-g64", "logs"]
    assert not (llama3_gptq["cwd"] / "logs").exists()


@pytest.mark.slow
def test_llama3_manifest_records_the_artifact(llama3_gptq: dict[str, Any], llama3_ckpt: Path) -> None:
    ws = Workspace(llama3_gptq["ws"])
    entry = ws.artifacts["gptq/4bit-g64"]
    (art,) = llama3_gptq["summary"]["artifacts"]
    assert art["path"] == "gptq/4bit-g64" and art["quant"] == "4bit-g64"
    assert entry["format"] == "gptq" and entry["command"].startswith("quantkit gptq ")
    assert entry["calibration"] | {"fingerprint": ""} == {"spec": "builtin:ru-mix", "samples": 16, "seq_len": 256,
                                                          "tokens": 4096, "fingerprint": "", "chat_template": False}
    assert set(entry["tools"]) >= {"gptqmodel", "transformers", "torch"} and all(entry["tools"].values())
    files = [ws.abs(f) for f in entry["files"]]
    assert entry["size"] == sum(f.stat().st_size for f in files)
    # bits per weight over the quantized layers, computed independently from the source's shapes:
    # 4-bit weights + per group of 64 one fp16 scale and one 4-bit zero + a 32-bit g_idx per input column
    shapes = [i.shape for n, i in read_header(llama3_ckpt / "model.safetensors")[0].items()
              if ".layers." in n and n.endswith("_proj.weight")]
    bits = sum(o * i * 4 + (i // 64) * o * (16 + 4) + i * 32 for o, i in shapes)
    assert entry["bpw"] == pytest.approx(bits / sum(o * i for o, i in shapes), abs=1e-3)
    assert estimate_size(resolve(str(llama3_ckpt)), GPTQOptions(group_size=64)) == pytest.approx(
        (ws.abs("gptq/4bit-g64") / "model.safetensors").stat().st_size, rel=0.02)
    step = ws.steps["gptq/quantize/4bit-g64"]
    assert step["outputs"] == ["gptq/4bit-g64"] and step["info"]["calibration"]["fingerprint"]


@pytest.mark.slow
def test_llama3_loads_in_transformers_and_scores_close_to_bf16(llama3_gptq: dict[str, Any],
                                                              llama3_ckpt: Path) -> None:
    hub_env = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    scorer = GPTQBackend().scorer(llama3_gptq["folder"], n_ctx=N_CTX)
    # loading GPTQModel (its tokenicer sets HF_HOME / HF_HUB_CACHE) leaves the Hub cache settings as they were
    assert {k: os.environ.get(k) for k in hub_env} == hub_env
    assert "gptq" in type(scorer.model.model.layers[0].self_attn.q_proj).__module__.lower()  # quantized kernel
    logits = scorer.chunk_logits(np.arange(100) % 2000, 60)
    assert logits.shape == (40, scorer.n_vocab) and logits.dtype == np.float32 and scorer.n_vocab == 2048
    scorer.close()
    assert_quality(compare(llama3_ckpt, llama3_gptq["folder"]))


@pytest.mark.slow
def test_rerun_skips_the_step(llama3_gptq: dict[str, Any], llama3_ckpt: Path) -> None:
    ws = Workspace(llama3_gptq["ws"])
    weights = llama3_gptq["folder"] / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns, ws.steps["gptq/quantize/4bit-g64"]["finished"])
    ctx = JobContext.of(resolve(str(llama3_ckpt)), ws, calib_samples=16, calib_seq_len=256)
    opts = GPTQOptions(group_size=64)
    assert {s.key: s.status for s in plan_for(ctx, "gptq", opts)}["gptq/quantize/4bit-g64"] == "done"
    (art,) = make(ctx, "gptq", opts)
    assert art.path == llama3_gptq["folder"] and art.bpw and art.size
    after = (weights.stat().st_ino, weights.stat().st_mtime_ns,
             Workspace(ws.root).steps["gptq/quantize/4bit-g64"]["finished"])
    assert after == before


@pytest.mark.slow
def test_qwen2_instruct(qwen2_ckpt: Path, tmp_path: Path) -> None:
    """Qwen2: attention biases, tied embeddings, chat-formatted calibration; 4-bit g64 through the library."""
    ws = Workspace(tmp_path / "ws")
    ctx = JobContext.of(resolve(str(qwen2_ckpt)), ws, calib_samples=16, calib_seq_len=256)
    (art,) = make(ctx, "gptq", GPTQOptions(group_size=64))
    assert art.quant == "4bit-g64" and art.path == ws.root / "gptq" / "4bit-g64"
    assert ws.steps["gptq/quantize/4bit-g64"]["info"]["calibration"]["chat_template"] is True
    assert ws.artifacts["gptq/4bit-g64"]["calibration"]["chat_template"] is True
    record_model(ws, ctx.checkpoint)
    assert "rendered with the model's chat template" in render_card(ws, "gptq")  # as the GGUF card says
    assert (art.path / "chat_template.jinja").read_bytes() == (qwen2_ckpt / "chat_template.jinja").read_bytes()
    tensors = read_header(art.path / "model.safetensors")[0]
    assert "model.layers.0.self_attn.q_proj.bias" in tensors and "model.layers.0.self_attn.q_proj.qweight" in tensors
    assert_quality(compare(qwen2_ckpt, art.path))


@pytest.mark.slow
def test_per_column_groups_load_on_cpu(llama3_ckpt: Path, tmp_path: Path) -> None:
    """g-1 quantizes (GPTQModel's group-aware reordering is off without groups) and loads on the CPU, where the
    int4pack kernel GPTQModel would pick cannot take it."""
    ws = Workspace(tmp_path / "ws")
    ctx = JobContext.of(resolve(str(llama3_ckpt)), ws, calib_samples=8, calib_seq_len=128)
    (art,) = make(ctx, "gptq", GPTQOptions(group_size=-1))
    assert art.quant == "4bit-g-1" and 4.0 < (art.bpw or 0) < 4.3
    assert json.loads((art.path / "config.json").read_text())["quantization_config"]["group_size"] == -1
    scorer = GPTQBackend().scorer(art.path, n_ctx=N_CTX)
    tokens = eval_tokens(llama3_ckpt)[:N_CTX]
    got = scorer.chunk_logits(tokens, N_CTX // 2)
    scorer.close()
    ref_scorer = TransformersScorer(llama3_ckpt, n_ctx=N_CTX)
    ref = ref_scorer.chunk_logits(tokens, N_CTX // 2)
    ref_scorer.close()
    assert np.isfinite(got).all() and (got.argmax(1) == ref.argmax(1)).mean() > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["qwen3_ckpt", "gemma3_ckpt", "gigachat3_ckpt"])
def test_new_families(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Qwen3 (q/k norms, head_dim ≠ hidden/heads), Gemma3ForCausalLM and a GigaChat-3-style MoE (MLA, routed
    experts) through GPTQModel, scored against bf16."""
    ckpt_dir = request.getfixturevalue(fixture)
    ws = Workspace(tmp_path / "ws")
    ctx = JobContext.of(resolve(str(ckpt_dir)), ws, calib_samples=16, calib_seq_len=256)
    (art,) = make(ctx, "gptq", GPTQOptions(group_size=64))
    tensors = read_header(art.path / "model.safetensors")[0]
    assert "model.layers.0.mlp.down_proj.qweight" in tensors
    if fixture == "gigachat3_ckpt":
        assert "model.layers.2.mlp.experts.7.up_proj.qweight" in tensors
        # GPTQModel drops the routers' score-correction buffer; quantkit puts it back, or routing would change
        assert "model.layers.2.mlp.gate.e_score_correction_bias" in tensors
        assert "model.layers.0.self_attn.kv_b_proj.qweight" in tensors
    else:
        assert "model.layers.0.self_attn.q_proj.qweight" in tensors
        assert "model.layers.0.self_attn.q_norm.weight" in tensors  # the per-head norms stay 16-bit
    assert_quality(compare(ckpt_dir, art.path))


def test_refused_for_an_architecture_gptqmodel_lacks(tmp_path: Path) -> None:
    """saiga_gemma3_12b is Gemma3ForConditionalGeneration: refused in one line from the known-model table, offline,
    before anything is downloaded (no 'cannot download' error)."""
    proc = cli("gptq", "saiga_gemma3_12b", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "GPTQ of Gemma 3's multimodal checkpoint is not supported" in proc.stderr, proc.stderr
    assert "download" not in proc.stderr
