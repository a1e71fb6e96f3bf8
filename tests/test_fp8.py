"""FP8_DYNAMIC (compressed-tensors): the recipe against compressed-tensors' own functions, the folder against what
llm-compressor writes, loading in transformers, KL-divergence against bf16 (and a broken file failing it), every
family transformers loads, sharding, the command line, the card and publishing to the loopback Hub."""

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
import torch
from hub_server import USER, WRITE_TOKEN, FakeHub
from pydantic import ValidationError
from test_publish import hub, push  # noqa: F401 - fixture used by name

from quantkit.arch import Architecture, registered
from quantkit.backends.base import JobContext, get_backend
from quantkit.backends.fp8 import (
    FP8Backend,
    FP8Options,
    estimate_size,
    is_fp8_folder,
    plan_items,
    quantization_config,
    quantized_names,
)
from quantkit.backends.fp8 import quantize as fp8_quantize
from quantkit.backends.fp8.options import approx_size, shard_items
from quantkit.card import render_card
from quantkit.errors import QuantkitError
from quantkit.pipeline import make, plan_for
from quantkit.pipeline.plan import refusal
from quantkit.quality.evaluate import evaluate_workspace
from quantkit.safetensors_io import TensorInfo, read_header
from quantkit.source import resolve
from quantkit.workspace import Workspace

# what llm-compressor 0.14 (oneshot, QuantizationModifier(scheme="FP8_DYNAMIC", ignore=["lm_head"])) writes
LLMC_CONFIG: dict[str, Any] = {
    "config_groups": {"group_0": {
        "format": "float-quantized",
        "input_activations": {"actorder": None, "block_structure": None, "dynamic": True, "group_size": None,
                              "num_bits": 8, "observer": None, "observer_kwargs": {}, "scale_dtype": None,
                              "strategy": "token", "symmetric": True, "type": "float", "zp_dtype": None},
        "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
                    "observer": "memoryless_minmax", "observer_kwargs": {}, "scale_dtype": None,
                    "strategy": "channel", "symmetric": True, "type": "float", "zp_dtype": None}}},
    "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"], "kv_cache_scheme": None,
    "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
    "transform_config": {}, "version": "0.19.0"}
# Mean KL(bf16 ‖ FP8) on ru-eval (4 × 128 tokens), measured: 2-5e-5 on the trained fixtures (llama3 4.3e-5), 1e-3 on
# the untrained Gemma 3 multimodal one. Zeroing one weight (llama3 layer 0 down_proj) gives 0.12, a zeroed k_proj 1e-3.
MAX_KLD, MAX_KLD_UNTRAINED = 5e-4, 3e-3
QUANT = "FP8_DYNAMIC"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "quantkit.cli.app", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def headers(folder: Path) -> dict[str, TensorInfo]:
    out: dict[str, TensorInfo] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(read_header(f)[0])
    return out


def reference_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8_DYNAMIC weights written out independently: |w| row maxima / 448 in w's dtype, zero → eps, then
    w / scale in w's dtype, clamped to ±448, rounded to E4M3."""
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    scale[scale == 0] = torch.finfo(w.dtype).eps
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float8_e4m3fn and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def kld_of(ws: Workspace) -> dict[str, Any]:
    (row,) = evaluate_workspace(ws, n_ctx=128, chunks=4)["rows"]
    assert row["format"] == "fp8"
    return row


# -- fast -----------------------------------------------------------------------------------------------

def test_options_registration_and_config() -> None:
    assert FP8Options().quant == QUANT and FP8Options().shard_size == 5.0
    for bad in ({"scheme": "FP8_BLOCK"}, {"shard_size": 0}, {"nope": 1}):
        with pytest.raises(ValidationError):
            FP8Options(**bad)
    backend = get_backend("fp8")
    assert isinstance(backend, FP8Backend) and backend.options_model is FP8Options
    assert backend.check() is None or "pip install 'quantkit-ru[fp8]'" in str(backend.check())
    assert quantization_config(["lm_head"], "0.19.0") == LLMC_CONFIG
    assert quantization_config(["lm_head"], None)["version"] == "0.20.0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_recipe_matches_compressed_tensors(dtype: torch.dtype) -> None:
    """Rows of every kind (zero, all negative, all positive, an outlier, tiny) against the reference and against
    compressed-tensors' own observer maths and quantize(), in each source dtype (the scale keeps it)."""
    w = torch.randn(7, 300, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    w[0], w[1], w[2] = 0, -w[1].abs(), w[2].abs()
    w[3, 5], w[4] = 1e4, w[4] * 1e-6
    q, scale = fp8_quantize.quantize_weight(w)
    ref_q, ref_scale = reference_fp8(w)
    assert scale.dtype == dtype and scale.shape == (7, 1) and scale[0, 0] == torch.finfo(dtype).eps
    assert same_fp8(q, ref_q) and torch.equal(scale, ref_scale)
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = ct.QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)
    ct_scale, zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    assert torch.equal(scale, ct_scale)
    assert same_fp8(q, quantize(w, ct_scale, zp, args, dtype=torch.float8_e4m3fn))


def test_which_tensors_and_sizes_from_headers(llama3_ckpt: Path, gigachat3_ckpt: Path) -> None:
    ckpt = resolve(str(llama3_ckpt))
    chosen = quantized_names(ckpt)
    assert len(chosen) == 14 and all(n.startswith("model.layers.") and n.endswith("_proj.weight") for n in chosen)
    moe = resolve(str(gigachat3_ckpt))
    names = quantized_names(moe)
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in names and "model.layers.2.mlp.gate.weight" not in names
    assert {"model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.3.mlp.shared_experts.down_proj.weight",
            "model.layers.0.self_attn.q_b_proj.weight"} <= names
    items = plan_items(ckpt)
    assert sum(i.nbytes for i in items) == estimate_size(ckpt) < sum(i.nbytes for i in ckpt.tensors.tensors.values())
    assert len(shard_items(items, 1.0)) == 1 and len(shard_items(items, 0.001)) == 4
    assert 0.5 * 2 * ckpt.n_params < approx_size(ckpt.n_params) < 0.7 * 2 * ckpt.n_params


def test_supported_families_and_one_line_refusals(tmp_path: Path, llama3_ckpt: Path) -> None:
    backend = FP8Backend()
    assert all(backend.supports(cls) is None for cls in registered().values())

    class Falcon(Architecture):
        hf_names = ("FalconForCausalLM",)

    why = backend.supports(Falcon)
    assert why and "FalconForCausalLM" in why and "\n" not in why
    assert refusal("fp8", Falcon)[1] == why
    # a checkpoint of an architecture quantkit does not know: one line, no traceback, nothing written
    odd = tmp_path / "odd"
    shutil.copytree(llama3_ckpt, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["FalconForCausalLM"]}))
    res = cli("fp8", str(odd), "-w", str(tmp_path / "ws"), cwd=tmp_path)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode != 0 and len(lines) == 1 and "FalconForCausalLM" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == "" and not (tmp_path / "ws").exists()


def test_cli_dry_run_lists_the_steps(llama3_ckpt: Path, tmp_path: Path) -> None:
    res = cli("fp8", str(llama3_ckpt), "--dry-run", "--json", "-w", str(tmp_path / "ws"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["dry_run"] and plan["format"] == "fp8"
    assert [s["kind"] for s in plan["plan"]] == ["resolve", "quantize", "verify"]
    step = plan["plan"][1]
    assert step["key"] == f"fp8/quantize/{QUANT}" and step["output"] == f"fp8/{QUANT}/" and not step["done"]
    assert step["estimated_size"] == estimate_size(resolve(str(llama3_ckpt)))
    assert not (tmp_path / "ws" / "fp8").exists()


def test_owns(llama3_ckpt: Path, tmp_path: Path) -> None:
    backend = FP8Backend()
    assert not backend.owns(llama3_ckpt) and not backend.owns(tmp_path / "missing")
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert not is_fp8_folder(gptq)
    with pytest.raises(QuantkitError):
        backend.scorer(gptq, n_ctx=64)


# -- quantizing (slow) ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_fp8(llama3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ws = Workspace(tmp_path_factory.mktemp("fp8") / "ws")
    ctx = JobContext.of(resolve(str(llama3_ckpt)), ws, calib_samples=4, calib_seq_len=64)
    (art,) = make(ctx, "fp8", FP8Options())
    return {"ws": ws, "ctx": ctx, "art": art}


@pytest.mark.slow
def test_llama3_folder_is_what_llm_compressor_writes(llama3_fp8: dict[str, Any], llama3_ckpt: Path) -> None:
    art, ws = llama3_fp8["art"], llama3_fp8["ws"]
    folder: Path = art.path
    assert art.key == f"fp8/{QUANT}" and art.quant == QUANT and sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    assert qcfg | {"version": "0.19.0"} == LLMC_CONFIG and qcfg["version"] == "0.20.0"  # the installed one
    assert config == json.loads((llama3_ckpt / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (llama3_ckpt / name).read_bytes(), name
    from safetensors import safe_open

    src = read_header(llama3_ckpt / "model.safetensors")[0]
    out = read_header(folder / "model.safetensors")[0]
    quantized = {n for n in src if ".layers." in n and n.endswith("_proj.weight")}
    assert set(out) == set(src) | {n.removesuffix("weight") + "weight_scale" for n in quantized}
    with safe_open(str(folder / "model.safetensors"), "pt") as f, \
            safe_open(str(llama3_ckpt / "model.safetensors"), "pt") as s:
        for name in quantized:
            assert (out[name].dtype, out[name].shape) == ("F8_E4M3", src[name].shape)
            assert (out[name[:-6] + "weight_scale"].dtype, out[name[:-6] + "weight_scale"].shape) == \
                ("BF16", (src[name].shape[0], 1))
        for name in set(src) - quantized:  # embeddings, norms, lm_head: as they were
            assert out[name].dtype == "BF16" and torch.equal(f.get_tensor(name), s.get_tensor(name)), name
        name = "model.layers.1.mlp.down_proj.weight"
        ref_q, ref_scale = reference_fp8(s.get_tensor(name))
        assert same_fp8(f.get_tensor(name), ref_q)
        assert torch.equal(f.get_tensor("model.layers.1.mlp.down_proj.weight_scale"), ref_scale)
    assert not any(n.endswith("input_scale") for n in out)
    # bits per weight over the quantized layers: 8 per weight + one bf16 scale per row
    shapes = [src[n].shape for n in quantized]
    assert art.bpw == pytest.approx(sum(o * i * 8 + o * 16 for o, i in shapes) / sum(o * i for o, i in shapes),
                                    abs=1e-3)
    entry = ws.artifacts[art.key]
    assert entry["format"] == "fp8" and entry["ignore"] == ["lm_head"] and set(entry["tools"]) >= {"torch"}
    assert entry["verify"]["passed"] and entry["verify"]["finite_logits"]
    assert entry["size"] == sum(f.stat().st_size for f in folder.iterdir())
    # a rerun plans nothing
    statuses = {s.key: s.status for s in plan_for(llama3_fp8["ctx"], "fp8", FP8Options())}
    assert statuses[f"fp8/quantize/{QUANT}"] == "done" and statuses[f"fp8/verify/{QUANT}"] == "done"


@pytest.mark.slow
def test_llama3_loads_in_transformers_with_fp8_weights(llama3_fp8: dict[str, Any]) -> None:
    scorer = FP8Backend().scorer(llama3_fp8["art"].path, n_ctx=128)
    try:
        q_proj = scorer.model.model.layers[0].self_attn.q_proj
        assert q_proj.weight.dtype == torch.float8_e4m3fn and q_proj.weight_scale.dtype == torch.bfloat16
        assert scorer.model.lm_head.weight.dtype == torch.bfloat16
        logits = scorer.chunk_logits(np.arange(100) % 2000, 60)
        assert logits.shape == (40, scorer.n_vocab) and np.isfinite(logits).all()
    finally:
        scorer.close()


@pytest.mark.slow
def test_kld_is_small_and_a_broken_file_fails(llama3_fp8: dict[str, Any], tmp_path: Path) -> None:
    row = kld_of(llama3_fp8["ws"])
    assert np.isfinite(row["kld_mean"]) and 0 < row["kld_mean"] < MAX_KLD and row["passed"], row
    # the test of the test: one quantized weight zeroed in a copy of the workspace
    from safetensors.torch import load_file, save_file

    broken = Workspace(shutil.copytree(llama3_fp8["ws"].root, tmp_path / "ws"))
    shard = broken.abs(f"fp8/{QUANT}") / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros_like(tensors["model.layers.0.mlp.down_proj.weight"])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    broken.artifacts[f"fp8/{QUANT}"].pop("eval")  # scored again
    broken.save()
    bad = kld_of(Workspace(broken.root))
    assert bad["kld_mean"] > MAX_KLD and not bad["passed"], bad


@pytest.mark.slow
def test_a_missing_scale_is_refused_on_load(llama3_fp8: dict[str, Any], tmp_path: Path) -> None:
    """transformers would leave a missing weight_scale uninitialised; the scorer (and so verification) refuses."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(llama3_fp8["art"].path, tmp_path / QUANT)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.0.mlp.down_proj.weight_scale"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantkitError, match="found no weights for model.layers.0.mlp.down_proj.weight_scale"):
        FP8Backend().scorer(folder, n_ctx=64)


@pytest.mark.slow
def test_streamed_in_small_blocks_gives_the_same_bytes(llama3_fp8: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One row at a time and 1 KB copies (the path a large model takes) write the very same file."""
    monkeypatch.setattr(fp8_quantize, "BLOCK", 300)
    monkeypatch.setattr(fp8_quantize, "COPY_CHUNK", 1000)
    fp8_quantize.write_model(llama3_fp8["ctx"].checkpoint, tmp_path / "out", FP8Options(), version="0.20.0")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (llama3_fp8["art"].path / name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["qwen3_ckpt", "mistral_ckpt", "gemma3_ckpt", "gemma3mm_ckpt", "gigachat3_ckpt"])
def test_families(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Each family through the pipeline (verification loads it in transformers), scored against bf16; the MoE one
    in 2 MB shards with their index."""
    ckpt_dir: Path = request.getfixturevalue(fixture)
    ws = Workspace(tmp_path / "ws")
    sharded = fixture == "gigachat3_ckpt"
    ctx = JobContext.of(resolve(str(ckpt_dir)), ws, calib_samples=4, calib_seq_len=64)
    (art,) = make(ctx, "fp8", FP8Options(shard_size=0.002) if sharded else FP8Options())
    assert ws.artifacts[art.key]["verify"]["passed"]
    out, src = headers(art.path), headers(ckpt_dir)
    ignore = json.loads((art.path / "config.json").read_text())["quantization_config"]["ignore"]
    kept = [n for n in src if n not in out or out[n].dtype != "F8_E4M3"]
    assert all(out[n].dtype == src[n].dtype for n in kept)
    if fixture == "gigachat3_ckpt":
        index = json.loads((art.path / "model.safetensors.index.json").read_text())
        shards = sorted(p.name for p in art.path.glob("*.safetensors"))
        assert len(shards) == 5 and shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]  # 8 MB
        assert index["weight_map"] == {n: i.file.name for n, i in out.items()}
        assert index["metadata"]["total_size"] == sum(i.nbytes for i in out.values())
        assert out["model.layers.2.mlp.experts.7.up_proj.weight"].dtype == "F8_E4M3"
        assert out["model.layers.2.mlp.gate.weight"].dtype == "BF16" and ignore == ["lm_head", "re:.*mlp.gate$"]
    elif fixture == "gemma3mm_ckpt":
        assert ignore == ["lm_head", "re:.*multi_modal_projector.*", "re:.*vision_tower.*"]
        assert out["language_model.model.layers.0.self_attn.q_proj.weight"].dtype == "F8_E4M3"
        assert all(n in kept for n in src if n.startswith(("vision_tower.", "multi_modal_projector.")))
    else:
        assert ignore == ["lm_head"] and out["model.layers.0.self_attn.q_proj.weight"].dtype == "F8_E4M3"
    row = kld_of(ws)
    assert np.isfinite(row["kld_mean"]) and row["kld_mean"] < (MAX_KLD_UNTRAINED if fixture == "gemma3mm_ckpt"
                                                               else MAX_KLD), row


@pytest.mark.slow
def test_cli_card_and_publish(qwen2_ckpt: Path, tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    """Qwen2 instruct (tied embeddings, biases) through the command, its card, and the loopback Hub."""
    ws_dir = tmp_path / "ws"
    res = cli("fp8", str(qwen2_ckpt), "-w", str(ws_dir), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (art,) = json.loads(res.stdout)["artifacts"]
    assert art["format"] == "fp8" and art["path"] == f"fp8/{QUANT}" and 8.0 < art["bpw"] < 8.1
    again = cli("fp8", str(qwen2_ckpt), "-w", str(ws_dir), "--dry-run", "--json", cwd=tmp_path)
    assert {s["status"] for s in json.loads(again.stdout)["plan"]} == {"done"}
    ws = Workspace(ws_dir)
    repo = f"{USER}/tiny-qwen2-FP8"
    card = render_card(ws, "fp8", repo=repo)
    assert f"vllm serve {repo}" in card and "base_model_relation: quantized" in card
    assert "library_name: transformers" in card and "- compressed-tensors" in card and "llm.chat(" in card
    # no calibration: the card claims none, in either language
    assert "Калибровочные тексты этому формату не нужны" in card and "Калибровка выполнена" not in card
    assert "calibration set would" not in card
    run = push(hub, ws_dir / "fp8", "--json", token=WRITE_TOKEN)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["repo"] == repo
    files = hub.files(repo)
    folder = ws_dir / "fp8" / QUANT
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert files[name] == (folder / name).read_bytes(), name
    assert f"vllm serve {repo}".encode() in files["README.md"]
