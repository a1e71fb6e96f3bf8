"""Size-targeted GGUF: the best per-tensor mix under a byte budget, by measured importance-weighted damage."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import llama_tool, run_tool

from quantkit.backends.base import JobContext
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.backends.gguf.quantize.imatrix import read_imatrix
from quantkit.backends.gguf.target import allocate as tg
from quantkit.errors import QuantkitError
from quantkit.pipeline import make
from quantkit.source import load_local
from quantkit.workspace import Workspace

Q = tg.Q


def test_sizes_parse() -> None:
    assert tg.parse_size("4.5G") == 4_500_000_000 and tg.parse_size("900M") == 900_000_000
    assert tg.parse_size("1GiB") == 1 << 30 and tg.parse_size("1234") == 1234
    with pytest.raises(QuantkitError, match="bad size"):
        tg.parse_size("four gigs")
    with pytest.raises(ValueError, match="between 1.5 and 16"):
        GGUFOptions(target_bpw=[0.5])


def _table() -> dict[str, dict[Q, tg.Piece]]:
    """Three tensors; the second is ten times as sensitive as the others."""
    out = {}
    for name, weight in (("blk.0.attn_q.weight", 1.0), ("blk.0.ffn_down.weight", 10.0), ("output.weight", 1.0)):
        out[name] = {q: tg.Piece(q, nbytes, weight * dmg) for q, nbytes, dmg in
                     ((Q.Q2_K, 100, 16.0), (Q.Q4_K, 150, 4.0), (Q.Q6_K, 210, 1.0), (Q.Q8_0, 270, 0.25))}
    return out


def test_allocation_respects_the_budget_and_favours_sensitive_tensors() -> None:
    table = _table()
    smallest = tg.allocate(table, 10_000, 0, 1000)
    assert smallest.nbytes <= 10_000 and all(p.qtype == Q.Q8_0 for p in smallest.choice.values())
    plan = tg.allocate(table, 3 * (150 + 32) + 60, 0, 1000)
    assert plan.nbytes <= plan.budget
    assert plan.choice["blk.0.ffn_down.weight"].nbytes > plan.choice["output.weight"].nbytes  # it went there first
    damages = [tg.allocate(table, b, 0, 1000).damage for b in range(420, 900, 40)]
    assert all(a >= b for a, b in zip(damages, damages[1:], strict=False))  # more bytes never hurt
    with pytest.raises(QuantkitError, match="below the smallest mix"):
        tg.allocate(table, 200, 0, 1000)


@pytest.mark.slow
def test_targeted_file_beats_stock_types(llama3_ckpt: Path, tmp_path: Path) -> None:
    """At Q4_K_M's own size the mix does less damage and has lower KLD on held-out Russian text; between Q3_K_M and
    Q4_K_M it beats Q3_K_M. Every file is under its target, loads, verifies, and llama-quantize reads the mix."""
    from quantkit.quality.evaluate import evaluate_workspace

    ck = load_local(llama3_ckpt, name="m", source=str(llama3_ckpt))
    ws = Workspace(tmp_path / "ws")
    ctx = JobContext.of(ck, ws, calib_samples=16, calib_seq_len=256)
    stock = {a.quant: a for a in make(ctx, "gguf", GGUFOptions(types=["Q3_K_M", "Q4_K_M"], verify=False))}
    q3, q4 = stock["Q3_K_M"], stock["Q4_K_M"]
    mid = (q3.size + q4.size) // 2
    arts = make(ctx, "gguf", GGUFOptions(types=["Q4_K_M"], target_sizes=[str(q4.size), str(mid)]))
    same, between = (next(a for a in arts if a.info.get("target") == str(t)) for t in (q4.size, mid))
    assert same.size <= q4.size and between.size <= mid and same.path.name.endswith("bpw.gguf")
    for a in (same, between):
        entry = ws.artifacts[ws.rel(a.path)]
        assert entry["verify"]["passed"] and entry["mix"] and a.path.with_suffix(".tensor-types.txt").exists()
    bf16 = stock["BF16"].path
    assert tg.mix_damage(same.path, bf16, read_imatrix(ws.root / "gguf" / "imatrix.gguf")) > 0
    kld = {r["artifact"]: r["kld_mean"] for r in evaluate_workspace(ws, model=str(llama3_ckpt))["rows"]}
    assert kld[ws.rel(same.path)] <= kld[ws.rel(q4.path)]
    assert kld[ws.rel(between.path)] < kld[ws.rel(q3.path)]
    if llama_tool("llama-quantize") is not None:  # llama.cpp's own tool reads the mix and writes the same tensors
        ref = tmp_path / "ref.gguf"
        proc = run_tool("llama-quantize", "--imatrix", str(ws.root / "gguf" / "imatrix.gguf"), "--tensor-type-file",
                        str(same.path.with_suffix(".tensor-types.txt")), str(bf16), str(ref), "Q8_0")
        assert proc.returncode == 0, proc.stderr[-2000:]
        ours = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(same.path).tensors}
        theirs = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(ref).tensors}
        assert ours == theirs
    # quantkit's own --tensor-type-file takes the mix and rebuilds the same tensors (same imatrix, same workspace)
    from test_cli import qk

    proc = qk("gguf", str(llama3_ckpt), "-w", str(ws.root), "--types", "q6_k", "--no-verify", "--calib-samples", "16",
              "--calib-seq-len", "256", "--tensor-type-file", str(same.path.with_suffix(".tensor-types.txt")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (again,) = (ws.root / "gguf").glob("*-Q6_K.gguf")
    ours = {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(same.path).tensors}
    assert ours == {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(again).tensors}
    missing = qk("gguf", str(llama3_ckpt), "-w", str(tmp_path / "w2"), "--tensor-type-file", str(tmp_path / "none"))
    assert missing.returncode != 0 and "cannot read --tensor-type-file" in missing.stderr
