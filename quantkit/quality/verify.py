"""Verification, format-neutral: every artifact loads in its real engine, tokenizes Russian exactly like the
original and gives finite, non-constant next-token logits on held-out Russian text, before anything can publish it.

The `verify` step every format gets unless it declares its own (GGUF compares llama.cpp with transformers in
`backends.gguf.verify.checks`); its report keeps the sha256 of every file it checked, so publishing can refuse a
file that changed since."""

from __future__ import annotations

from typing import Any

from quantkit.quality.texts import first_token_difference, sample_text  # noqa: F401 - re-exported

WINDOW = 128  # tokens of held-out text the logits are checked on
VERSION = 1


def current_hashes(ws: Any, entry: dict[str, Any]) -> dict[str, str]:
    """sha256 of every file of an artifact as it is on disk now (remembered per file while unchanged)."""
    from quantkit.workspace import file_sha256

    out: dict[str, str] = {}
    for rel in entry.get("files") or []:
        path = ws.abs(rel)
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        for f in files:
            out[ws.rel(f)] = file_sha256(f)
    return out


def verify_action(run: Any) -> Any:
    """Load the artifact in its format's engine (the backend's scorer), check its tokenizer against the original's
    on Russian text and its logits on the first `WINDOW` tokens of the eval text."""
    import numpy as np
    from transformers import AutoTokenizer

    from quantkit.backends.base import get_backend
    from quantkit.errors import QuantkitError
    from quantkit.quality.evaluate import check_tokenizer, eval_tokens
    from quantkit.steps import StepFailure, StepResult

    (made,) = run.step.inputs
    rec = run.input(made)
    ws, ckpt = run.ctx.workspace, run.ctx.checkpoint
    key = rec.artifacts[0]
    entry = ws.artifacts[key]
    hashes = dict(entry.get("sha256") or current_hashes(ws, entry))
    backend = get_backend(str(run.step.format))
    try:
        try:
            scorer = backend.scorer(ws.abs(key), n_ctx=WINDOW)
        except NotImplementedError:
            raise QuantkitError(f"{key}: the {run.step.format} backend has no scorer, so its files cannot be "
                                "loaded and checked", "publish them with --force if you checked them yourself") \
                from None
        try:
            tok = AutoTokenizer.from_pretrained(ckpt.path)
            check_tokenizer(scorer, tok, ckpt.arch.vocab_size)
            toks = eval_tokens(ckpt, "builtin:ru-eval", WINDOW, 1, tok)
            logits = np.asarray(scorer.chunk_logits(toks.chunks[0], toks.first), dtype=np.float32)
        finally:
            scorer.close()
        if not np.isfinite(logits).all():
            raise QuantkitError(f"{key}: its logits are not finite on Russian text", "the file is broken; rebuild it")
        if float(logits.std(axis=-1).min()) == 0.0:
            raise QuantkitError(f"{key}: its logits are constant on Russian text", "the file is broken; rebuild it")
    except QuantkitError as exc:
        raise StepFailure(exc.message, exc.hint,
                          updates={key: {"verify": {"passed": False, "error": exc.message, "sha256": hashes}}}
                          ) from exc
    report = {"passed": True, "loads": True, "tokenizer_parity": True, "finite_logits": True,
              "positions_checked": int(logits.shape[0]), "sha256": hashes}
    return StepResult(info=report, updates={key: {"verify": report}})
