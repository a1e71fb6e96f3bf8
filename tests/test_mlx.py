"""MLX through mlx-lm: options, the config fix and the refusals (one line, before any work), the CLI end to end on
Llama-3 (files byte for byte what ``mlx_lm.convert`` writes, loaded and run by mlx-lm, KL-divergence against bf16
with a broken file failing it, card, loopback Hub), and every other fixture architecture (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hub_server import USER, FakeHub
from pydantic import ValidationError
from test_publish import hub, push  # noqa: F401 - the fixture is used by name

from quantkit.backends.base import JobContext, get_backend
from quantkit.backends.mlx import (
    MLXBackend,
    MLXOptions,
    check_widths,
    fix_config,
    prepare_source,
    quantized_widths,
)
from quantkit.card import render_card
from quantkit.errors import QuantkitError
from quantkit.files import file_sha256
from quantkit.pipeline import make
from quantkit.quality.evaluate import evaluate_workspace
from quantkit.safetensors_io import read_header
from quantkit.source import resolve
from quantkit.workspace import Workspace

# Mean KL(bf16 ‖ MLX) on builtin:ru-eval, 4 chunks of 128 tokens. Measured: 4-bit g64 0.0013 (llama3, trained),
# 0.0006-0.0035 on the other fixtures, 0.0084 on the untrained multimodal Gemma; 8-bit 5e-6..5e-5. Zeroing one
# quantized matrix of Llama-3 gives 0.013 (layer 1 o_proj) to 0.16 (layer 0 down_proj), a lost head 1.37.
MAX_KLD_4BIT_LLAMA3, MAX_KLD_4BIT, MAX_KLD_8BIT = 0.005, 0.02, 2e-4
N_CTX, CHUNKS = 128, 4


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(cwd / "hf-home"),
           "NO_COLOR": "1", "COLUMNS": "200"}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "quantkit.cli.app", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and "Traceback" not in res.stderr and res.stdout == "", res.stderr
    assert len(lines) == 1, res.stderr
    return lines[0]


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def run_mlx(code: str, *args: str) -> str:
    """`code` in a fresh interpreter (mlx-lm as a user runs it); its stdout."""
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


GENERATE = """
import json, sys
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
model, tok = load(sys.argv[1])
ids = tok.encode("Привет! Расскажи о Байкале.")
print(json.dumps([int(t) for (t, _), _ in zip(generate_step(mx.array(ids), model), range(8))]))
"""


# -- fast: options, config, refusals --------------------------------------------------------------------------

def test_options() -> None:
    assert MLXOptions().bits == [4] and MLXOptions().group_size == 64
    assert MLXOptions(bits="8,4,4").bits == [4, 8] and MLXOptions(bits=["3", "6"]).bits == [3, 6]
    for bad in ({"bits": "7"}, {"bits": "4.5"}, {"bits": []}, {"bits": "x"}, {"group_size": 96},
                {"group_size": 256}, {"nope": 1}):
        with pytest.raises(ValidationError):
            MLXOptions(**bad)


def test_registered_light_and_check(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_backend("mlx")
    assert isinstance(backend, MLXBackend) and backend.options_model is MLXOptions
    assert backend.check() is None  # mlx[cpu] and mlx-lm are installed here
    from quantkit.arch import lookup

    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "DeepseekV3ForCausalLM"):
        assert backend.supports(lookup(name)) is None, name
    unsupported = type("NoMLX", (lookup("LlamaForCausalLM"),), {"mlx": False, "hf_names": ("NoMLXForCausalLM",)})
    assert backend.supports(unsupported) == "mlx-lm does not support NoMLXForCausalLM"
    code = "import sys, quantkit.backends.mlx; print(sorted(m for m in ('mlx', 'mlx_lm', 'torch') if m in sys.modules))"
    assert run_mlx(code).strip() == "[]"  # importing the backend loads neither mlx nor mlx-lm nor torch
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlx_lm" else real(n, *a))
    assert backend.check() == "MLX needs mlx and mlx-lm: pip install 'quantkit-ru[mlx]'"


def test_fix_config(llama31_ckpt: Path, gemma3_ckpt: Path, gemma3mm_ckpt: Path) -> None:
    """transformers-5 keys → the names mlx-lm reads (without them mlx-lm builds Llama with RoPE base 10000)."""
    cfg, fixes = fix_config(resolve(str(llama31_ckpt)).config)
    assert cfg["rope_theta"] == 500000.0 and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_scaling"]["factor"] == 8.0
    assert fixes == ["rope_theta", "rope_scaling", "torch_dtype"]
    cfg, _ = fix_config(resolve(str(gemma3_ckpt)).config)
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"], cfg["sliding_window_pattern"]) == (1e6, 1e4, 6)
    mm = resolve(str(gemma3mm_ckpt)).config
    cfg, fixes = fix_config(mm)
    assert cfg["vocab_size"] == mm["text_config"]["vocab_size"] and cfg["text_config"]["sliding_window_pattern"] == 6
    assert "vocab_size" in fixes and "vocab_size" not in mm  # the original is not touched
    text = {**resolve(str(gemma3_ckpt)).config}
    with pytest.raises(QuantkitError, match="global-attention layer"):
        fix_config({**text, "layer_types": ["sliding_attention"] * 6})
    with pytest.raises(QuantkitError, match="irregular"):
        fix_config({**text, "layer_types": ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"] * 2})
    with pytest.raises(QuantkitError, match="at least 6 layers"):
        fix_config({k: v for k, v in text.items() if k != "layer_types"} | {"num_hidden_layers": 2})


def test_group_size_must_divide_every_width(llama3_ckpt: Path, gigachat3_ckpt: Path) -> None:
    for g in (32, 64, 128):
        check_widths(resolve(str(llama3_ckpt)), g)
    giga = resolve(str(gigachat3_ckpt))
    check_widths(giga, 64)
    with pytest.raises(QuantkitError) as err:  # MLA's per-head matrices are 64 wide in this fixture
        check_widths(giga, 128)
    assert "embed_q" in err.value.message and "64" in err.value.message and "32 or 64" in (err.value.hint or "")


def test_width_check_agrees_with_mlx_lm(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    """The header check (before any work) and the child's check on mlx-lm's own model refuse the same sizes."""
    from quantkit.backends.mlx.worker import unquantizable

    giga = resolve(str(gigachat3_ckpt))
    prepare_source(giga, tmp_path / "src")
    for g in (32, 64, 128):
        bad = unquantizable(tmp_path / "src", g)
        assert bool(bad) == any(w % g for w in quantized_widths(giga).values()), g
    assert {n.rsplit(".", 1)[-1] for n, _ in unquantizable(tmp_path / "src", 128)} == {"embed_q"}


def test_cli_dry_run(llama3_ckpt: Path, tmp_path: Path) -> None:
    res = cli("mlx", str(llama3_ckpt), "--bits", "4,8", "--dry-run", "--json", "-w", str(tmp_path / "ws"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)["plan"]
    assert [s["kind"] for s in plan] == ["resolve", "quantize", "quantize", "verify", "verify"]
    q4, q8 = plan[1], plan[2]
    assert (q4["key"], q4["output"], q8["output"]) == ("mlx/quantize/4bit", "mlx/4bit/", "mlx/8bit/")
    n = resolve(str(llama3_ckpt)).n_params
    assert 0.5 * n < q4["estimated_size"] < 0.6 * n < 1.05 * n < q8["estimated_size"] < 1.1 * n  # 4.5 / 8.5 bpw
    assert q4["fingerprint"] and not (tmp_path / "ws").exists()


def test_cli_refusals_are_one_line(gemma3_ckpt: Path, gigachat3_ckpt: Path, tmp_path: Path) -> None:
    odd = tmp_path / "gemma-all-sliding"  # a Gemma 3 without a global layer: mlx-lm cannot run it
    odd.mkdir()
    for f in gemma3_ckpt.iterdir():
        if f.name != "config.json":
            (odd / f.name).symlink_to(f)
    config = json.loads((gemma3_ckpt / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "layer_types": ["sliding_attention"] * 6}))
    line = one_error_line(cli("mlx", str(odd), "-w", str(tmp_path / "ws1"), cwd=tmp_path))
    assert "global-attention layer" in line and "GGUF" in line
    line = one_error_line(cli("mlx", str(gigachat3_ckpt), "--group-size", "128", "-w", str(tmp_path / "ws2"),
                              cwd=tmp_path))
    assert "--group-size 128" in line and "embed_q" in line
    line = one_error_line(cli("mlx", str(gigachat3_ckpt), "--bits", "7", cwd=tmp_path))
    assert "2, 3, 4, 5, 6 or 8" in line
    assert not (tmp_path / "ws1" / "mlx").exists() and not (tmp_path / "ws2" / "mlx").exists()


def test_owns(llama3_ckpt: Path, tmp_path: Path) -> None:
    backend = MLXBackend()
    assert not backend.owns(llama3_ckpt) and not backend.owns(tmp_path / "missing")
    other = tmp_path / "gptq"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert not backend.owns(other)
    with pytest.raises(QuantkitError):
        backend.scorer(other, n_ctx=N_CTX)


# -- Llama-3 through the command line --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made(llama3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`quantkit mlx tiny-llama3 --bits 4,8 --json`."""
    cwd = tmp_path_factory.mktemp("mlx-cli")
    ws = cwd / "ws"
    res = cli("mlx", str(llama3_ckpt), "--bits", "4,8", "-w", str(ws), "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"cwd": cwd, "ws": ws, "summary": json.loads(res.stdout)}


def test_cli_makes_and_records_both_bit_widths(made: dict[str, Any], llama3_ckpt: Path) -> None:
    arts = {a["path"]: a for a in made["summary"]["artifacts"]}
    assert set(arts) == {"mlx/4bit", "mlx/8bit"}
    ws = Workspace(made["ws"])
    for bits, bpw in ((4, 4.5), (8, 8.5)):
        key = f"mlx/{bits}bit"
        entry, folder = ws.artifacts[key], ws.abs(key)
        assert entry["verify"]["passed"] and entry["bits"] == bits and entry["group_size"] == 64
        assert bpw < entry["bpw"] < bpw + 0.05  # packed weights + one bf16 scale and bias per 64 (norms in bf16)
        assert entry["tools"]["mlx-lm"] == "0.32.2" and entry["command"].startswith("quantkit mlx ")
        assert sorted(p.name for p in folder.iterdir()) == [  # no README: quantkit writes the card
            "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json"]
        config = json.loads((folder / "config.json").read_text())
        assert config["quantization"] == config["quantization_config"] == {"group_size": 64, "bits": bits,
                                                                           "mode": "affine"}
        assert config["rope_theta"] == 500000.0  # what mlx-lm's Llama reads
        assert read_header(folder / "model.safetensors")[1] == {"format": "mlx"}
        assert MLXBackend().owns(folder) and entry["sha256"] == entry["verify"]["sha256"]
    assert sorted(p.name for p in (made["ws"] / "mlx").iterdir()) == ["4bit", "8bit", "logs"]  # no work folders
    again = cli("mlx", str(llama3_ckpt), "--bits", "4,8", "-w", str(made["ws"]), "--dry-run", "--json",
                cwd=made["cwd"])
    assert {s["status"] for s in json.loads(again.stdout)["plan"]} == {"done"}


def test_files_are_what_mlx_lm_convert_writes(made: dict[str, Any], llama3_ckpt: Path, tmp_path: Path) -> None:
    """Byte for byte what ``mlx_lm.convert`` writes from the same fixed source (less its README)."""
    prepare_source(resolve(str(llama3_ckpt)), tmp_path / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "0"}  # as quantkit runs it: transformers records the offline setting
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(tmp_path / "src"),
                          "--mlx-path", str(tmp_path / "ref"), "-q", "--q-bits", "4", "--q-group-size", "64"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = hashes(tmp_path / "ref")
    assert ref.pop("README.md")
    assert hashes(made["ws"] / "mlx" / "4bit") == ref


def test_mlx_lm_generate_runs_it(made: dict[str, Any]) -> None:
    res = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(made["ws"] / "mlx" / "4bit"),
                          "--prompt", "Байкал — самое глубокое", "--max-tokens", "8"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Generation: 8 tokens" in res.stdout, res.stdout


def test_greedy_with_cache_matches_full_prefix(made: dict[str, Any], llama3_ckpt: Path) -> None:
    """The drift check's greedy decoding (mlx-lm's KV cache) gives what recomputing the prefix gives."""
    from quantkit.quality.generate import scorer_greedy

    scorer = MLXBackend().scorer(made["ws"] / "mlx" / "4bit", n_ctx=N_CTX)
    try:
        prompt = scorer.tokenize("Байкал — самое глубокое озеро")
        assert scorer.generate(prompt, 12, set()) == scorer_greedy(scorer, prompt, 12, set())
        logits = scorer.chunk_logits(np.arange(40) % 2000, 30)
        assert logits.shape == (10, 2048) and logits.dtype == np.float32 and np.isfinite(logits).all()
    finally:
        scorer.close()


def test_kld_against_bf16_and_a_broken_file_fails(made: dict[str, Any], tmp_path: Path) -> None:
    ws = Workspace(made["ws"])
    rows = {r["quant"]: r for r in evaluate_workspace(ws, n_ctx=N_CTX, chunks=CHUNKS)["rows"]}
    assert 0 < rows["4bit"]["kld_mean"] < MAX_KLD_4BIT_LLAMA3 and rows["4bit"]["passed"], rows["4bit"]
    assert 0 <= rows["8bit"]["kld_mean"] < MAX_KLD_8BIT and rows["8bit"]["kld_mean"] < rows["4bit"]["kld_mean"]
    assert np.isfinite(rows["4bit"]["ppl"])
    # the test of the test: one quantized matrix zeroed (its packed weights: every value becomes its group's bias)
    broken = Workspace(shutil.copytree(made["ws"], tmp_path / "ws"))
    weights = broken.abs("mlx/4bit") / "model.safetensors"
    info = read_header(weights)[0]["model.layers.0.mlp.down_proj.weight"]
    with open(weights, "r+b") as fh:
        fh.seek(info.start)
        fh.write(bytes(info.nbytes))
    broken.update_artifact("mlx/4bit", eval=None)
    (row,) = evaluate_workspace(broken, only=[broken.abs("mlx/4bit")], n_ctx=N_CTX, chunks=CHUNKS)["rows"]
    assert row["kld_mean"] > 20 * MAX_KLD_4BIT_LLAMA3 and not row["passed"], row


def test_card_and_loopback_publish(made: dict[str, Any], hub: FakeHub) -> None:  # noqa: F811
    ws = Workspace(made["ws"])
    card = render_card(ws, "mlx", repo=f"{USER}/tiny-llama3-MLX")
    assert "library_name: mlx" in card and "LM Studio" in card
    assert f"mlx_lm.generate --model {USER}/tiny-llama3-MLX --prompt" in card
    assert f'load("{USER}/tiny-llama3-MLX", revision="8bit")' in card and "--revision 8bit" in card
    run = push(hub, made["ws"] / "mlx", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    repo = f"{USER}/tiny-llama3-MLX"
    assert json.loads(run.stdout)["branches"] == ["main", "8bit"]
    for branch, folder in (("main", "4bit"), ("8bit", "8bit")):
        files = hub.files(repo, branch)
        for name, path in ((p.name, p) for p in (made["ws"] / "mlx" / folder).iterdir()):
            assert files[name] == path.read_bytes(), (branch, name)
    readme = hub.files(repo)["README.md"].decode()
    assert "mlx_lm.generate" in readme and "library_name: mlx" in readme


# -- every other architecture (slow) -----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["llama31_ckpt", "qwen2_ckpt", "qwen3_ckpt", "mistral_ckpt", "nemo_ckpt",
                                     "yandexgpt_ckpt", "gemma3_ckpt", "gemma3mm_ckpt", "gigachat3_ckpt",
                                     "gigachat3_noq_ckpt"])
def test_architecture(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Converted, verified (loads in mlx-lm, tokenizes like the original), generates in mlx-lm, close to bf16."""
    ckpt_dir = request.getfixturevalue(fixture)
    ws = Workspace(tmp_path / "ws")
    (art,) = make(JobContext.of(resolve(str(ckpt_dir)), ws), "mlx", MLXOptions())
    assert art.path == ws.root / "mlx" / "4bit" and ws.artifacts["mlx/4bit"]["verify"]["passed"]
    names = read_header(art.path / "model.safetensors")[0]
    assert any(n.endswith("down_proj.scales") for n in names)
    assert not any("vision_tower" in n for n in names)  # the multimodal Gemma: text model only
    tokens = json.loads(run_mlx(GENERATE, str(art.path)))
    assert len(tokens) == 8
    (row,) = evaluate_workspace(ws, n_ctx=N_CTX, chunks=CHUNKS)["rows"]
    assert 0 < row["kld_mean"] < MAX_KLD_4BIT and row["passed"], row
