"""AWQ through GPTQModel: options, refusals, the folder against AutoAWQ's GEMM layout, loading in transformers and
scoring against bf16 on Russian text, the families it is checked for, the card and publishing to the loopback Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hub_server import USER, WRITE_TOKEN, FakeHub
from pydantic import ValidationError
from test_gptq import CALIB, assert_quality, cli, compare, text_files
from test_publish import hub, push  # noqa: F401 - fixture used by name

from quantkit import calibration
from quantkit.arch import registered
from quantkit.backends.awq import AWQBackend, AWQOptions, is_awq_folder
from quantkit.backends.awq.options import estimate_size
from quantkit.backends.base import JobContext, get_backend
from quantkit.card import render_card
from quantkit.pipeline import make
from quantkit.safetensors_io import read_header
from quantkit.source import resolve
from quantkit.workspace import Workspace


def test_options_and_names() -> None:
    assert AWQOptions().quant == "4bit-g128"
    assert AWQOptions(group_size=64, zero_point=False).quant == "4bit-g64-sym"
    with pytest.raises(ValidationError, match="use gptq for 2, 3 or 8"):
        AWQOptions(bits=3)
    with pytest.raises(ValidationError, match="32, 64, 128, 256"):
        AWQOptions(group_size=96)


def test_registered_and_what_it_supports() -> None:
    backend = get_backend("awq")
    assert isinstance(backend, AWQBackend) and backend.check() is None
    supported = {name for cls in registered().values() if backend.supports(cls) is None for name in cls.hf_names}
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"} <= supported
    assert "DeepseekV3ForCausalLM" not in supported


def test_cli_dry_run_plans_without_work(llama3_ckpt: Path, tmp_path: Path) -> None:
    res = cli("awq", str(llama3_ckpt), "-w", str(tmp_path / "ws"), "--dry-run", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    plan = {s["key"]: s for s in json.loads(res.stdout)["plan"]}
    assert list(plan) == ["model/resolve", "model/calibrate", "awq/quantize/4bit-g128", "awq/verify/4bit-g128"]
    assert plan["awq/quantize/4bit-g128"]["estimated_size"] == estimate_size(resolve(str(llama3_ckpt)), AWQOptions())
    assert not (tmp_path / "ws" / "awq").exists()


def test_refused_in_one_line_for_an_unchecked_family(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    res = cli("awq", str(gigachat3_ckpt), "-w", str(tmp_path / "ws"), cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "AWQ of DeepseekV3ForCausalLM has not been checked" in res.stderr, res.stderr
    assert not (tmp_path / "ws" / "awq").exists()


# -- quantizing (slow) ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_awq(llama3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Llama-3 fixture quantized to AWQ 4-bit g64 through the real CLI, with --json."""
    cwd = tmp_path_factory.mktemp("awq-cli")
    ws = cwd / "ws"
    res = cli("awq", str(llama3_ckpt), "--group-size", "64", *CALIB, "-w", str(ws), "--json", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"cwd": cwd, "ws": ws, "summary": json.loads(res.stdout), "folder": ws / "awq" / "4bit-g64"}


@pytest.mark.slow
def test_llama3_folder_is_autoawq_gemm(llama3_awq: dict[str, Any], llama3_ckpt: Path) -> None:
    folder: Path = llama3_awq["folder"]
    config = json.loads((folder / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert (qcfg["quant_method"], qcfg["version"], qcfg["bits"], qcfg["group_size"], qcfg["zero_point"]) == \
        ("awq", "gemm", 4, 64, True)
    assert is_awq_folder(folder) and AWQBackend().owns(folder) and not get_backend("gptq").owns(folder)
    assert {k: v for k, v in config.items() if k != "quantization_config"} == \
        json.loads((llama3_ckpt / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).read_bytes() == (llama3_ckpt / name).read_bytes(), name
    calib_text = calibration.load("builtin:ru-mix").documents[0].plain()[:40]
    for name, text in text_files(folder).items():
        for needle in (str(llama3_awq["ws"]), str(llama3_ckpt), "/tmp", "gptqmodel_", "offload_to_disk_path",
                       calib_text):
            assert needle not in text, (name, needle)
    # AutoAWQ's GEMM packing: eight 4-bit values per int32 along the output dimension, one scale and zero per group
    tensors = read_header(folder / "model.safetensors")[0]
    source = read_header(llama3_ckpt / "model.safetensors")[0]
    for layer in ("self_attn.q_proj", "mlp.down_proj"):
        out_f, in_f = source[f"model.layers.0.{layer}.weight"].shape
        got = {s: (tensors[f"model.layers.0.{layer}.{s}"].shape, tensors[f"model.layers.0.{layer}.{s}"].dtype)
               for s in ("qweight", "qzeros", "scales")}
        assert got == {"qweight": ((in_f, out_f // 8), "I32"), "qzeros": ((in_f // 64, out_f // 8), "I32"),
                       "scales": ((in_f // 64, out_f), "BF16")}
    assert not any(n.endswith("_proj.weight") for n in tensors if ".layers." in n)
    assert sorted(p.name for p in (llama3_awq["ws"] / "awq").iterdir()) == ["4bit-g64", "logs"]
    assert not (llama3_awq["cwd"] / "logs").exists()


@pytest.mark.slow
def test_llama3_manifest_and_verification(llama3_awq: dict[str, Any], llama3_ckpt: Path) -> None:
    ws = Workspace(llama3_awq["ws"])
    entry = ws.artifacts["awq/4bit-g64"]
    assert entry["format"] == "awq" and (entry["bits"], entry["group_size"], entry["zero_point"]) == (4, 64, True)
    assert entry["verify"]["passed"] and entry["calibration"]["spec"] == "builtin:ru-mix"
    shapes = [i.shape for n, i in read_header(llama3_ckpt / "model.safetensors")[0].items()
              if ".layers." in n and n.endswith("_proj.weight")]
    bits = sum(o * i * 4 + (i // 64) * o * (4 + 16) for o, i in shapes)  # weights + per group a zero and a scale
    assert entry["bpw"] == pytest.approx(bits / sum(o * i for o, i in shapes), abs=1e-3)
    assert estimate_size(resolve(str(llama3_ckpt)), AWQOptions(group_size=64)) == pytest.approx(
        (llama3_awq["folder"] / "model.safetensors").stat().st_size, rel=0.02)


@pytest.mark.slow
def test_llama3_loads_in_transformers_and_scores_close_to_bf16(llama3_awq: dict[str, Any],
                                                              llama3_ckpt: Path) -> None:
    scorer = AWQBackend().scorer(llama3_awq["folder"], n_ctx=512)
    assert "awq" in type(scorer.model.model.layers[0].self_attn.q_proj).__name__.lower()  # the AWQ kernel
    scorer.close()
    assert_quality(compare(llama3_ckpt, llama3_awq["folder"], backend="awq"))


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["qwen3_ckpt", "mistral_ckpt"])
def test_families(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    ckpt_dir = request.getfixturevalue(fixture)
    ctx = JobContext.of(resolve(str(ckpt_dir)), Workspace(tmp_path / "ws"), calib_samples=16, calib_seq_len=256)
    (art,) = make(ctx, "awq", AWQOptions(group_size=64))
    assert "model.layers.0.self_attn.q_proj.qweight" in read_header(art.path / "model.safetensors")[0]
    assert_quality(compare(ckpt_dir, art.path, backend="awq"))


@pytest.mark.slow
def test_cli_card_and_publish(qwen2_ckpt: Path, tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    """Qwen2 instruct (tied embeddings, biases) through the command, its card, and the loopback Hub."""
    ws_dir = tmp_path / "ws"
    res = cli("awq", str(qwen2_ckpt), "-g", "64", *CALIB, "-w", str(ws_dir), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (art,) = json.loads(res.stdout)["artifacts"]
    assert art["format"] == "awq" and art["path"] == "awq/4bit-g64" and art["verify"]["passed"]
    ws = Workspace(ws_dir)
    repo = f"{USER}/tiny-qwen2-AWQ"
    card = render_card(ws, "awq", repo=repo)
    assert f"vllm serve {repo}" in card and "base_model_relation: quantized" in card and "- awq" in card
    assert "AWQ's activation-aware scales were searched on Russian text" in card
    run = push(hub, ws_dir / "awq", "--json", token=WRITE_TOKEN)
    assert run.returncode == 0, run.stderr[-3000:]
    files = hub.files(repo)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert files[name] == (ws_dir / "awq" / "4bit-g64" / name).read_bytes(), name
