"""Quality check against bf16: one token stream for every format, PPL / KLD / top-1, and the gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.backends.base import JobContext
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.errors import EXIT_GATE, QuantkitError
from quantkit.pipeline import make
from quantkit.quality.evaluate import evaluate_workspace
from quantkit.source import load_local
from quantkit.workspace import Workspace

QK = [sys.executable, "-m", "quantkit.cli.app"]


@pytest.fixture(scope="module")
def ladder(llama3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("eval") / "ws")
    ck = load_local(llama3_ckpt, name="tiny-llama3", source=str(llama3_ckpt))
    ctx = JobContext.of(ck, ws, calib_samples=16, calib_seq_len=256)
    make(ctx, "gguf", GGUFOptions(types=["Q2_K", "Q4_K_M", "Q8_0"], verify=False))
    from quantkit.workspace import record_model

    record_model(ws, ck)
    return ws


@pytest.mark.slow
def test_ladder_orders_and_bf16_matches(ladder: Workspace) -> None:
    report = evaluate_workspace(ladder, n_ctx=256, chunks=12)
    rows = {r["quant"]: r for r in report["rows"]}
    assert set(rows) == {"BF16", "Q2_K", "Q4_K_M", "Q8_0"}
    # identical tokens were fed to every scorer
    assert len({r["tokens_fingerprint"] for r in rows.values()}) == 1
    assert rows["BF16"]["kld_mean"] < 1e-3 and rows["BF16"]["top1"] >= 0.99
    assert abs(rows["BF16"]["delta_ppl"]) < 0.005
    assert rows["Q8_0"]["kld_mean"] < rows["Q4_K_M"]["kld_mean"] < rows["Q2_K"]["kld_mean"]
    assert rows["Q8_0"]["top1"] >= rows["Q2_K"]["top1"]
    for r in rows.values():
        assert r["ppl"] > 1 and r["kld_p999"] >= r["kld_p99"] >= r["kld_mean"] * 0.5
    entry = ladder.artifacts["gguf/tiny-llama3-Q8_0.gguf"]
    assert entry["eval"]["kld_mean"] == rows["Q8_0"]["kld_mean"] and entry["gate"]["passed"] is True


@pytest.mark.slow
def test_gate_fails_and_cli_exits_nonzero(ladder: Workspace) -> None:
    proc = subprocess.run([*QK, "eval", str(ladder.root), "--ctx", "256", "--chunks", "12", "--max-kld", "1e-6",
                           "--json"], capture_output=True, text=True)
    assert proc.returncode == EXIT_GATE, proc.stderr  # the one exit code of a failed gate
    report = json.loads(proc.stdout)
    failing = {r["quant"] for r in report["rows"] if not r["passed"]}
    assert "Q2_K" in failing and "BF16" not in failing
    assert proc.stderr.strip().count("\n") == 0 and "failed the quality gate" in proc.stderr
    assert Workspace(ladder.root).artifacts["gguf/tiny-llama3-Q2_K.gguf"]["gate"]["passed"] is False


@pytest.mark.slow
def test_refuses_short_text_and_foreign_tokenizer(ladder: Workspace, qwen2_ckpt: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Совсем короткий текст для проверки.", encoding="utf-8")
    with pytest.raises(QuantkitError, match="fewer than two chunks"):
        evaluate_workspace(ladder, eval_spec=str(short), n_ctx=256)
    with pytest.raises(QuantkitError, match="tokenizes Russian text differently|vocabulary"):
        evaluate_workspace(ladder, only=[ladder.root / "gguf" / "tiny-llama3-Q8_0.gguf"], n_ctx=256, chunks=2,
                           model=str(qwen2_ckpt))


def test_unknown_artifact_format(tmp_path: Path) -> None:
    from quantkit.backends.base import backend_for

    odd = tmp_path / "model.bin"
    odd.write_bytes(b"\0" * 16)
    with pytest.raises(QuantkitError, match="not an artifact quantkit knows"):
        backend_for(odd)


@pytest.mark.parametrize("fixture", ["qwen2_ckpt", "llama3_ckpt"])
def test_reference_forward_matches_float64(fixture: str, request: pytest.FixtureRequest,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer-by-layer reference (oneDNN float32 linears, embedding rows, sliced head) is the bf16 model's exact
    function to float32 accuracy: a bf16-rounded path would be ~1e-2 off, this one is within 1e-5 of the scale."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit import layerwise

    path = request.getfixturevalue(fixture)
    monkeypatch.setattr(layerwise, "HEAD_SLICE", 700)  # several slices and a ragged last one on a 2,048 vocabulary
    ck = load_local(path, name=fixture, source=str(path))
    rows = np.random.default_rng(0).integers(0, ck.arch.vocab_size, size=(3, 96))
    first = 40
    got = np.stack(list(layerwise.LayerwiseModel(ck).run(rows, logits=True, first=first, batch=2)))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(torch.float64).eval()
    with torch.no_grad():
        want = model(torch.as_tensor(rows)).logits[:, first:].numpy()
    assert got.shape == want.shape and got.dtype == np.float32
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale, np.abs(got - want).max() / scale
