"""The fast paths of `quantkit gguf`: what they skip must not change what they prove.

The bf16 imatrix forward against the float32 one, the reference shared by verification and evaluation, the
vocabulary-skipping tensor-table reader against gguf's own reader, the pure metrics, and a `--no-verify
--no-imatrix` run that never imports torch or transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from quantkit.backends.base import JobContext
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.backends.gguf.ggufinfo import read_info
from quantkit.backends.gguf.quantize.imatrix import compute_imatrix
from quantkit.pipeline import make, plan_for
from quantkit.quality.evaluate import Reference, evaluate_workspace
from quantkit.quality.metrics import kld_full, kld_top, log_softmax, top_k
from quantkit.source import load_local
from quantkit.workspace import Workspace, record_model


def _ckpt(path: Path):
    return load_local(path, name=path.name, source=str(path))


def test_bf16_imatrix_matches_float32(llama3_ckpt: Path) -> None:
    """The bf16 forward's importance matrix is the float32 one up to rounding: same tensors, same counts,
    per-tensor cosine ≥ 0.9999, the typical column within 0.5%."""
    from transformers import AutoTokenizer

    from quantkit.calibration import token_rows

    ckpt = _ckpt(llama3_ckpt)
    tok = AutoTokenizer.from_pretrained(llama3_ckpt)
    rows = token_rows("builtin:ru-mix", tok, n_samples=4, seq_len=128, seed=0)
    fast, n_fast = compute_imatrix(ckpt, rows, bos=tok.bos_token_id)
    exact, n_exact = compute_imatrix(ckpt, rows, bos=tok.bos_token_id, dtype="float32")
    assert set(fast) == set(exact) and len(fast) == 7 * ckpt.arch.n_layer
    assert n_fast == n_exact
    for name, ref in exact.items():
        got = fast[name]
        cos = float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))
        assert cos >= 0.9999, (name, cos)
        assert np.median(np.abs(got / ref - 1)) < 0.005, name
    # q, k and v share one input: their sums are the same numbers (computed once), as in llama-imatrix
    assert np.array_equal(fast["blk.0.attn_q.weight"], fast["blk.0.attn_k.weight"])


def _references(ws: Workspace) -> list[Path]:
    """The bf16 reference caches in the workspace (named by what they are a reference of)."""
    return sorted((ws.root / "eval").glob("reference-*.npz"))


def test_verification_window_without_evaluation(llama3_ckpt: Path, tmp_path: Path) -> None:
    """A run that does not evaluate checks the forward on the eval text's first 128 tokens only (a quarter of a
    chunk), with a reference of its own, so evaluation's cache is never overwritten."""
    ws = Workspace(tmp_path / "ws")
    arts = make(JobContext.of(_ckpt(llama3_ckpt), ws), "gguf", GGUFOptions(types=["Q8_0"], imatrix=False))
    bf16 = ws.artifacts[ws.rel(arts[0].path)]["verify"]
    assert bf16["kld_vs_transformers"] <= 0.001 and bf16["positions_compared"] == 63
    (ref,) = _references(ws)
    assert Reference.load(ref).nll.shape == (1, 63)


def test_verification_and_eval_share_one_reference(llama3_ckpt: Path, tmp_path: Path) -> None:
    """A run that evaluates next: verification computes the bf16 reference of the eval text's first chunk only and
    keeps it; evaluation extends the same file to every chunk, with the first chunk's numbers unchanged."""
    ws = Workspace(tmp_path / "ws")
    ck = _ckpt(llama3_ckpt)
    ctx = JobContext.of(ck, ws, eval="builtin:ru-eval", ctx=512)
    opts = GGUFOptions(types=["Q8_0"], imatrix=False)
    arts = make(ctx, "gguf", opts, only=[s.key for s in plan_for(ctx, "gguf", opts) if s.kind != "evaluate"])
    record_model(ws, ck)
    bf16 = ws.artifacts[ws.rel(arts[0].path)]["verify"]
    assert bf16["kld_vs_transformers"] <= 0.001 and bf16["positions_compared"] == 255
    assert "kld_vs_transformers" not in ws.artifacts[ws.rel(arts[1].path)]["verify"]  # quantized: parity only
    (path,) = _references(ws)
    first = Reference.load(path)
    assert first.n_chunks == 1
    report = evaluate_workspace(ws)
    assert _references(ws) == [path]  # the same file, extended
    full = Reference.load(path)
    assert full.n_chunks == report["chunks"] > 1
    np.testing.assert_array_equal(full.nll[:1], first.nll)
    rows = {r["quant"]: r for r in report["rows"]}
    assert rows["BF16"]["kld_mean"] < 1e-3 < rows["Q8_0"]["kld_mean"] * 1e6
    # a second run finds conversion, quantization and both verifications done: nothing is recorded again
    before = {k: v["finished"] for k, v in Workspace(ws.root).steps.items()}
    assert {"gguf/verify/BF16", "gguf/verify/Q8_0"} <= set(before)
    again = make(JobContext.of(ck, Workspace(ws.root)), "gguf", GGUFOptions(types=["Q8_0"], imatrix=False))
    assert [a.path for a in again] == [a.path for a in arts]
    assert {k: v["finished"] for k, v in Workspace(ws.root).steps.items()} == before


def test_tensor_table_reader_matches_gguf(qwen2_ckpt: Path, tmp_path: Path) -> None:
    from quantkit.backends.gguf.convert.converter import Converter

    out = Converter(_ckpt(qwen2_ckpt)).write(tmp_path / "m.gguf")[0]
    ours = read_info(out)
    theirs = gguf.GGUFReader(out)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape)
        assert a.data_offset == b.data_offset and a.n_bytes == b.n_bytes


def test_kld_from_top_k_and_full() -> None:
    rng = np.random.default_rng(0)
    p_logits, q_logits = rng.normal(size=(5, 300)) * 3, rng.normal(size=(5, 300)) * 3
    lp, lq = log_softmax(p_logits, np.float64), log_softmax(q_logits, np.float64)
    exact = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(kld_full(np.exp(lp), (np.exp(lp) * lp).sum(-1), lq), exact, rtol=1e-9)
    ids, top = top_k(lp, 299)  # every column but one: the tail is one token, so the bound is exact
    np.testing.assert_allclose(kld_top(ids, top, lq), exact, rtol=1e-6)
    ids, top = top_k(lp, 8)
    assert np.all(kld_top(ids, top, lq) <= exact + 1e-12)


@pytest.mark.parametrize("flags", [["--no-verify", "--no-imatrix"]])
def test_plain_run_imports_neither_torch_nor_transformers(qwen2_ckpt: Path, tmp_path: Path, flags: list[str]) -> None:
    code = ("import sys, json\nfrom quantkit.cli.app import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(json.dumps(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code, "gguf", str(qwen2_ckpt), "--q8_0", *flags, "-w",
                           str(tmp_path / "ws"), "-q"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "ws" / "gguf").is_dir()


def test_logsumexp_and_top_k_columns() -> None:
    from quantkit.quality.metrics import kld_top_q, logsumexp

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(4, 1000)) * 5).astype(np.float32)
    lq = log_softmax(logits, np.float64)
    np.testing.assert_allclose(logsumexp(logits), (logits - lq)[:, 0], rtol=1e-6)
    lp = log_softmax(rng.normal(size=(4, 1000)) * 5, np.float64)
    ids, top = top_k(lp, 16)
    lq_top = np.take_along_axis(logits, ids, -1) - logsumexp(logits)[:, None]
    np.testing.assert_allclose(kld_top_q(top, lq_top), kld_top(ids, top, lq), rtol=1e-5)


@pytest.mark.parametrize("fixture", ["qwen2_ckpt", "mistral_ckpt"])
def test_fast_metadata_packing_writes_the_same_bytes(fixture: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """BPE (strings, token types, merges) and SentencePiece (scores too): the whole file is byte-identical with
    gguf's own packing."""
    from quantkit.backends.gguf.convert import converter as convert
    from quantkit.backends.gguf.convert.kvpack import MIN_ITEMS, fast_arrays
    from quantkit.workspace import file_sha256

    ckpt = _ckpt(request.getfixturevalue(fixture))
    fast = convert.Converter(ckpt).write(tmp_path / "fast.gguf")[0]
    monkeypatch.setattr(convert, "fast_arrays", lambda writer: None)
    slow = convert.Converter(ckpt).write(tmp_path / "slow.gguf")[0]
    assert file_sha256(fast) == file_sha256(slow)
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    plain = w._pack_val
    fast_arrays(w)
    n = MIN_ITEMS + 1
    for val, sub in ([["а", "бв", "ж" * 300] * n, None], [[1, 2, -3] * n, None], [[0.5, -1e-8] * n, None],
                     [[1, 2, 3] * n, gguf.GGUFValueType.UINT8], [[1, 2.5] * n, None], [[True] * n, None]):
        try:
            want = plain(val, gguf.GGUFValueType.ARRAY, True, sub)
        except ValueError:
            with pytest.raises(ValueError):
                w._pack_val(val, gguf.GGUFValueType.ARRAY, True, sub)
            continue
        assert w._pack_val(val, gguf.GGUFValueType.ARRAY, True, sub) == want


def test_verification_worker_failure_and_stop(qwen2_ckpt: Path, tmp_path: Path) -> None:
    """The torch half of verification runs in its own process: its failure is one line naming it, and stopping it
    (an error or interrupt elsewhere) leaves no process and no file behind."""
    from quantkit.backends.gguf.verify.checks import Prepared
    from quantkit.errors import QuantkitError

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in qwen2_ckpt.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    ck = _ckpt(broken)
    (broken / "tokenizer.json").write_text("{", encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    prepared = Prepared(ck, ws)
    with pytest.raises(QuantkitError, match=r"^verification could not run: ") as err:
        prepared.get()
    assert "\n" not in err.value.message and "Traceback" not in err.value.message
    prepared.close()
    assert not [p for p in ws.root.iterdir() if p.name.startswith(".verify")]

    running = Prepared(_ckpt(qwen2_ckpt), ws)
    running.close()
    assert running._proc.poll() is not None
    assert not [p for p in ws.root.iterdir() if p.name.startswith(".verify")]
