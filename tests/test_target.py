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
    # a stock type as a target: at most that file's bytes, so the run makes that file too; --ladder: every stock type
    assert GGUFOptions(target_sizes=["q5_k_s"]).types == ["Q4_K_M", "Q5_K_S"]
    ladder = GGUFOptions(ladder=True)
    assert ladder.types == ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"] and ladder.targets == ladder.types
    assert GGUFOptions(ladder=True, types=["bf16", "q4_k_m", "q8_0"]).targets == ["Q4_K_M", "Q8_0"]
    with pytest.raises(ValueError, match="neither a size"):
        GGUFOptions(target_sizes=["q9"])
    with pytest.raises(ValueError, match="must be a quantized type"):
        GGUFOptions(target_sizes=["bf16"])


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


def test_fallback_follows_llama_cpp_for_rows_a_type_cannot_take() -> None:
    from quantkit.backends.gguf.quantize.fallback import fit_type

    assert fit_type(int(Q.Q2_K), 640) == Q.IQ4_NL and fit_type(int(Q.Q4_K), 576) == Q.Q5_0  # Gemma 3 270M, SmolLM2
    assert fit_type(int(Q.Q5_K), 896) == Q.Q5_1 and fit_type(int(Q.Q6_K), 640) == Q.Q8_0
    assert fit_type(int(Q.Q4_K), 512) == Q.Q4_K and fit_type(int(Q.Q3_K), 80) == Q.F16  # 80: no 32-block either


@pytest.mark.slow
def test_target_and_overrides_on_rows_k_quants_cannot_take(tmp_path: Path) -> None:
    """Hidden size 320 and FFN 640 (like Gemma 3 270M's 640, SmolLM2's 576): the candidate pass forces every type on
    every tensor, and a --tensor-type override asks for a K-quant; llama.cpp applies its row-width fallback to neither,
    so both failed with 'invalid size ... for type q2_K'. Now each such tensor gets llama.cpp's fallback type, the
    targeted file is under its bound and loads."""
    from quantkit.backends.gguf.ggufinfo import read_info
    from quantkit.demo import build_checkpoint

    ckpt_dir = build_checkpoint(tmp_path / "narrow", "llama3", vocab_size=2048, hidden=320, layers=2, heads=4,
                                kv_heads=2, ffn=640)
    ck = load_local(ckpt_dir, name="narrow", source=str(ckpt_dir))
    ws = Workspace(tmp_path / "ws")
    ctx = JobContext.of(ck, ws, calib_samples=8, calib_seq_len=128)
    (stock,) = [a for a in make(ctx, "gguf", GGUFOptions(types=["Q3_K_M"], verify=False)) if a.quant == "Q3_K_M"]
    arts = make(ctx, "gguf", GGUFOptions(types=["Q3_K_M"], target_sizes=[str(stock.size)],
                                         tensor_types=["ffn_down=q2_k"]))
    target = next(a for a in arts if a.info.get("target"))
    assert target.size <= stock.size and ws.artifacts[ws.rel(target.path)]["verify"]["passed"]
    types = {t.name: t.tensor_type for t in read_info(target.path).tensors}
    assert all(types[n] in (Q.IQ4_NL, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16) for n in types if n.endswith("ffn_down.weight"))


@pytest.mark.slow
def test_ladder_rungs_are_under_their_stock_file_and_held_to_beating_it(llama3_ckpt: Path, tmp_path: Path) -> None:
    """`--ladder --q3_k_m --q5_k_m --eval`: one targeted file at each stock file's size, named by the type it
    replaces and never over it; its gate passes only if it beats that stock file on mean and 99.9% KLD."""
    import json

    from test_cli import qk

    proc = qk("gguf", str(llama3_ckpt), "-w", str(tmp_path / "ws"), "--ladder", "--q3_k_m", "--q5_k_m", "--eval",
              "--calib-samples", "16", "--calib-seq-len", "256", "--json")
    assert proc.returncode in (0, 3), proc.stderr[-2000:]
    entries = Workspace(tmp_path / "ws").artifacts
    stock = {e["quant"]: e for e in entries.values()}
    rungs = {e["replaces"]: (k, e) for k, e in entries.items() if e.get("replaces")}
    assert set(rungs) == {"Q3_K_M", "Q5_K_M"}
    for quant, (key, entry) in rungs.items():
        assert f"-target-{quant}-" in Path(key).name and entry["size"] <= stock[quant]["size"]
        ours, theirs = entry["eval"], stock[quant]["eval"]
        beats = ours["kld_mean"] < theirs["kld_mean"] and ours["kld_p999"] < theirs["kld_p999"]
        held = [r for r in entry["gate"]["reasons"] if r.startswith(f"no better than stock {quant}")]
        assert bool(held) != beats, (ours, theirs, entry["gate"])
    passed = all(e["gate"]["passed"] for e in entries.values())
    assert proc.returncode == (0 if passed else 3) and json.loads(proc.stdout)
