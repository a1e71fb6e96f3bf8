"""The GGUF path end to end on tiny real checkpoints: conversion, tokenizer, imatrix, quantization, resume."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import llama_tool, run_tool

from quantkit.backends.base import JobContext
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.backends.gguf.convert.converter import Converter
from quantkit.backends.gguf.llamacpp import LlamaModel
from quantkit.backends.gguf.quantize.imatrix import read_imatrix
from quantkit.backends.gguf.verify.checks import verify_gguf
from quantkit.pipeline import make, plan_for
from quantkit.source import load_local
from quantkit.workspace import Workspace

FAMILIES = ["llama3_ckpt", "llama31_ckpt", "qwen2_ckpt", "mistral_ckpt", "nemo_ckpt", "qwen3_ckpt", "gemma3_ckpt",
            "gemma3mm_ckpt", "yandexgpt_ckpt", "gigachat3_ckpt", "gigachat3_noq_ckpt"]  # every registered family


def _ckpt(path: Path):
    return load_local(path, name=path.name, source=str(path))


@pytest.mark.parametrize("fixture", FAMILIES)
def test_bf16_gguf_matches_transformers(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Tokenizer parity on Russian text and the same next-token distribution as transformers' bf16 forward."""
    ckpt = _ckpt(request.getfixturevalue(fixture))
    out = Converter(ckpt).write(tmp_path / "m-BF16.gguf")[0]
    report = verify_gguf(ckpt, out, forward=True, n_tokens=256)
    assert report["tokenizer_parity"] and report["tokens_compared"] > 500
    assert report["kld_vs_transformers"] <= 0.001
    assert report["top1_vs_transformers"] >= 0.99


def test_converter_metadata_and_tensors(llama31_ckpt: Path, qwen2_ckpt: Path, tmp_path: Path) -> None:
    ck = _ckpt(llama31_ckpt)
    r = gguf.GGUFReader(Converter(ck).write(tmp_path / "l-BF16.gguf")[0])
    names = {t.name: t for t in r.tensors}
    assert "rope_freqs.weight" in names and names["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    fields = r.fields
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "llama-bpe"
    assert "tokenizer.chat_template" in fields and "tokenizer.ggml.merges" in fields
    qk = _ckpt(qwen2_ckpt)
    rq = gguf.GGUFReader(Converter(qk).write(tmp_path / "q-BF16.gguf")[0])
    qnames = {t.name for t in rq.tensors}
    assert "blk.0.attn_q.bias" in qnames and "output.weight" not in qnames  # biases kept, embeddings tied
    assert bytes(rq.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "qwen2"
    # bf16 weights are copied bit-exactly (only Q/K rows are permuted, and not for Qwen2)
    src = qk.tensors.read("model.layers.0.mlp.down_proj.weight")
    got = next(t for t in rq.tensors if t.name == "blk.0.ffn_down.weight")
    assert np.array_equal(np.asarray(got.data).view(np.uint16).reshape(src.shape), src)


def _run(ckpt_path: Path, ws_root: Path, **opts: object) -> tuple[Workspace, list]:
    ck = _ckpt(ckpt_path)
    ws = Workspace(ws_root)
    ctx = JobContext.of(ck, ws, calib_samples=8, calib_seq_len=256)
    return ws, make(ctx, "gguf", GGUFOptions(**opts))


@pytest.mark.slow
def test_pipeline_imatrix_resume_and_llama_quantize_parity(llama3_ckpt: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    ws, arts = _run(llama3_ckpt, tmp_path / "ws", types=["Q4_K_M", "IQ4_XS"])
    names = sorted(a.path.name for a in arts)
    assert names == ["tiny-llama3-BF16.gguf", "tiny-llama3-IQ4_XS.gguf", "tiny-llama3-Q4_K_M.gguf"]
    for a in arts:
        LlamaModel(a.path).close()  # loads in llama.cpp
        assert ws.artifacts[ws.rel(a.path)]["verify"]["tokenizer_parity"] is True
    imatrix = tmp_path / "ws" / "gguf" / "imatrix.gguf"
    assert set(read_imatrix(imatrix)) >= {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"}
    q4 = tmp_path / "ws" / "gguf" / "tiny-llama3-Q4_K_M.gguf"
    mtime = q4.stat().st_mtime_ns

    # llama.cpp's own llama-quantize accepts our imatrix file and writes the very same bytes
    if llama_tool("llama-quantize") is not None:
        ref = tmp_path / "ref-Q4_K_M.gguf"
        proc = run_tool("llama-quantize", "--imatrix", str(imatrix), str(tmp_path / "ws/gguf/tiny-llama3-BF16.gguf"),
                        str(ref), "Q4_K_M")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "loaded" in (proc.stdout + proc.stderr).lower()
        assert _tensor_bytes(ref) == _tensor_bytes(q4)

    # without the imatrix the Q4_K_M tensors differ
    _, plain = _run(llama3_ckpt, tmp_path / "plain", types=["Q4_K_M"], imatrix=False)
    assert _tensor_bytes(plain[1].path) != _tensor_bytes(q4)

    # the plan knows what is done, and what a different calibration would redo
    ck = _ckpt(llama3_ckpt)
    opts = GGUFOptions(types=["Q4_K_M", "IQ4_XS"])
    same = plan_for(JobContext.of(ck, ws, calib_samples=8, calib_seq_len=256), "gguf", opts)
    assert all(step.done for step in same)
    other = {s.key: s.done for s in plan_for(JobContext.of(ck, ws, calib_samples=8, calib_seq_len=256, seed=7),
                                              "gguf", opts)}
    # another calibration: the conversion stands, the rows, the matrix and what was quantized with it do not
    assert other["model/resolve"] and other["gguf/convert/BF16"] and other["gguf/verify/BF16"]
    assert not any(done for key, done in other.items() if key not in ("model/resolve", "gguf/convert/BF16",
                                                                        "gguf/verify/BF16"))

    # a rerun resumes: nothing is recomputed
    capsys.readouterr()
    _run(llama3_ckpt, tmp_path / "ws", types=["Q4_K_M", "IQ4_XS"])
    assert q4.stat().st_mtime_ns == mtime
    assert not list((tmp_path / "ws" / "gguf").glob(".*partial*"))


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_split_files_convert_and_quantize(qwen2_ckpt: Path, tmp_path: Path) -> None:
    ws, arts = _run(qwen2_ckpt, tmp_path / "ws", types=["Q8_0"], split_max_size="1M", imatrix=False)
    bf16, q8 = arts
    assert bf16.path.name.endswith(f"-00001-of-{len(bf16.files):05d}.gguf") and len(bf16.files) > 1
    assert len(q8.files) == len(bf16.files)
    model = LlamaModel(q8.path)  # llama.cpp finds the other parts
    assert model.n_vocab > 0
    model.close()
