"""Mixture of experts: GigaChat 3 style DeepseekV3ForCausalLM (MLA attention, routed + shared experts) end to end."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import llama_tool, run_tool
from test_arch import _fields
from test_cli import one_line_error, qk

from quantkit.backends.base import JobContext
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.backends.gguf.convert.converter import Converter
from quantkit.backends.gguf.quantize.imatrix import compute_imatrix, expert_coverage, write_imatrix
from quantkit.calibration import token_rows
from quantkit.errors import QuantkitError
from quantkit.pipeline import make
from quantkit.source import load_local
from quantkit.workspace import Workspace

G = gguf.GGMLQuantizationType


def _ckpt(path: Path):
    return load_local(path, name=path.name, source=str(path))


def test_mla_and_expert_tensors(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    """llama.cpp's deepseek2 layout: kv_b split into k_b (transposed) and v_b, experts stacked per projection,
    router and score correction in F32, the dense leading layers kept dense, every MoE/MLA key."""
    ck = _ckpt(gigachat3_ckpt)
    f = _fields(Converter(ck).write(tmp_path / "g.gguf")[0])
    t = f["_tensors"]
    assert f["general.architecture"] == "deepseek2"
    assert (f["deepseek2.expert_count"], f["deepseek2.expert_used_count"], f["deepseek2.leading_dense_block_count"],
            f["deepseek2.expert_shared_count"]) == (8, 2, 2, 1)
    assert (f["deepseek2.attention.head_count_kv"], f["deepseek2.attention.kv_lora_rank"],
            f["deepseek2.attention.q_lora_rank"]) == (1, 128, 128)
    assert (f["deepseek2.attention.key_length"], f["deepseek2.attention.value_length"],
            f["deepseek2.attention.key_length_mla"], f["deepseek2.attention.value_length_mla"]) == (160, 128, 96, 64)
    assert f["deepseek2.expert_gating_func"] == 2 and f["deepseek2.expert_weights_norm"] is True  # sigmoid
    assert "blk.0.ffn_down.weight" in t and "blk.0.ffn_gate_exps.weight" not in t  # dense leading layers
    assert tuple(reversed(t["blk.2.ffn_gate_exps.weight"].shape.tolist())) == (8, 256, 256)
    assert tuple(reversed(t["blk.2.attn_k_b.weight"].shape.tolist())) == (4, 128, 64)
    assert tuple(reversed(t["blk.2.attn_v_b.weight"].shape.tolist())) == (4, 64, 128)
    assert t["blk.2.ffn_gate_inp.weight"].tensor_type == G.F32 and t["blk.2.exp_probs_b.bias"].tensor_type == G.F32
    assert "blk.2.attn_kv_b.weight" not in t
    # expert 5's gate matrix sits, bit for bit, in slice 5 of the stacked tensor
    src = ck.tensors.read("model.layers.2.mlp.experts.5.gate_proj.weight")
    stacked = np.asarray(t["blk.2.ffn_gate_exps.weight"].data).view(np.uint16).reshape(8, *src.shape)
    assert np.array_equal(stacked[5], src)


def test_experts_are_streamed_one_at_a_time(gigachat3_ckpt: Path) -> None:
    """A stacked expert tensor is written slice by slice: the writer never holds more than one expert."""
    conv = Converter(_ckpt(gigachat3_ckpt))
    stacks = [p for p in conv.plan() if p.chunks is not None]
    assert {p.name for p in stacks} == {f"blk.{i}.ffn_{k}_exps.weight" for i in (2, 3) for k in ("gate", "up", "down")}
    slices = list(stacks[0].chunks())
    assert len(slices) == 8 and all(s.nbytes * 8 == int(np.prod(stacks[0].shape)) * 2 for s in slices)


def test_no_query_compression_needs_the_layer_counts_llama_cpp_knows(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "noq4"
    shutil.copytree(gigachat3_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["q_lora_rank"] = None
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="no query compression"):
        Converter(_ckpt(folder))


def test_expert_imatrix_layout_and_coverage(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    """One row and one count per expert, from the model's own routing; llama-quantize reads the file and writes
    the same bytes as quantkit's quantizer given the same imatrix."""
    from transformers import AutoTokenizer

    ck = _ckpt(gigachat3_ckpt)
    tok = AutoTokenizer.from_pretrained(ck.path)
    rows = token_rows("builtin:ru-mix", tok, n_samples=8, seq_len=256, seed=0, chat=True)
    sums, counts = compute_imatrix(ck, rows)
    assert sums["blk.2.ffn_gate_exps.weight"].shape == (8, 256) and sums["blk.2.ffn_down_exps.weight"].shape == (8, 256)
    assert counts["blk.2.ffn_gate_exps.weight"].sum() == rows.size * 2  # two experts per token
    assert np.array_equal(sums["blk.2.ffn_up_exps.weight"], sums["blk.2.ffn_gate_exps.weight"])
    assert "blk.2.ffn_gate_shexp.weight" in sums and "blk.2.attn_kv_b.weight" not in sums
    cov = expert_coverage(counts, 64)
    assert cov["experts"] == 16 and cov["fewest"] == min(int(c.min()) for k, c in counts.items() if "gate_exps" in k)
    path = write_imatrix(tmp_path / "imatrix.gguf", sums, counts, datasets=["builtin:ru-mix"], chunk_size=256)
    t = {x.name: x for x in gguf.GGUFReader(path).tensors}
    assert t["blk.2.ffn_gate_exps.weight.in_sum2"].shape.tolist() == [256, 8]
    assert t["blk.2.ffn_gate_exps.weight.counts"].shape.tolist() == [1, 8]


@pytest.mark.slow
def test_quantize_evaluate_and_llama_quantize_parity(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    from quantkit.quality.evaluate import evaluate_workspace

    ck = _ckpt(gigachat3_ckpt)
    ws = Workspace(tmp_path / "ws")
    arts = make(JobContext.of(ck, ws, calib_samples=8, calib_seq_len=256), "gguf",
                             GGUFOptions(types=["Q4_K_M"]))
    bf16, q4 = sorted(arts, key=lambda a: a.quant)
    assert ws.artifacts[ws.rel(bf16.path)]["verify"]["kld_vs_transformers"] <= 0.001
    assert "expert_coverage" in ws.steps["gguf/imatrix"]["info"]
    report = evaluate_workspace(ws, chunks=4, model=str(gigachat3_ckpt))
    rows = {r["quant"]: r for r in report["rows"]}
    assert 0 < rows["Q4_K_M"]["kld_mean"] < 0.5 and rows["BF16"]["kld_mean"] < 1e-3
    if llama_tool("llama-quantize") is not None:
        ref = tmp_path / "ref-Q4_K_M.gguf"
        proc = run_tool("llama-quantize", "--imatrix", str(ws.root / "gguf" / "imatrix.gguf"), str(bf16.path),
                        str(ref), "Q4_K_M")
        assert proc.returncode == 0, proc.stderr[-2000:]
        ours = {x.name: np.asarray(x.data).tobytes() for x in gguf.GGUFReader(q4.path).tensors}
        theirs = {x.name: np.asarray(x.data).tobytes() for x in gguf.GGUFReader(ref).tensors}
        assert ours == theirs


def test_exl2_refused_in_one_line(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    one_line_error(qk("exl2", str(gigachat3_ckpt), "-w", str(tmp_path / "w")), "exllamav2 0.3.2 has no DeepSeek")


def test_llama_cpp_log_is_quiet_unless_asked(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    """llama.cpp logs a line per fallback tensor while quantizing; quantkit keeps it off the terminal and shows it
    with QUANTKIT_DEBUG=1."""
    import os
    import subprocess
    import sys

    bf16 = Converter(_ckpt(gigachat3_ckpt)).write(tmp_path / "g.gguf")[0]
    code = ("import sys; from pathlib import Path; from quantkit.backends.gguf.quantize.core import QuantizeOptions, "
            "quantize; quantize(Path(sys.argv[1]), Path(sys.argv[2]), QuantizeOptions(file_type='Q4_K_M'))")
    for debug, expect in (("0", False), ("1", True)):
        env = {**os.environ, "QUANTKIT_DEBUG": debug}
        proc = subprocess.run([sys.executable, "-c", code, str(bf16), str(tmp_path / f"q{debug}.gguf")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-1000:]
        assert ("falling back" in proc.stderr) is expect
