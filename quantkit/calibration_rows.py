"""The calibration step: a workspace's token rows, built once per checkpoint × calibration set × shape × seed and
shared by every backend that calibrates on token rows (the GGUF importance matrix, GPTQ).

The rows are saved as ``calibration/rows.npy`` and recorded as the workspace step ``calibration.rows``; a second
format, or a rerun, loads them instead of loading the tokenizer and tokenizing the set again. A plan (read-only
workspace) builds them in memory and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantkit.workspace import atomic_path, fingerprint

STEP = "calibration.rows"
PATH = "calibration/rows.npy"
_MEMO: dict[tuple[str, str], CalibrationRows] = {}


@dataclass(frozen=True)
class CalibrationRows:
    """``int64[samples, seq_len]`` token rows and what the cards and fingerprints say about them."""

    rows: np.ndarray
    info: dict[str, Any]  # spec, samples, seq_len, tokens, fingerprint (of the rows), chat, chat_template


def step_fingerprint(ctx: Any, content_hash: str) -> str:
    """What the rows depend on: the checkpoint (its tokenizer), the set's content, the shape, the seed, chat."""
    return fingerprint("calibration-rows", ctx.checkpoint.fingerprint, content_hash, ctx.calib_samples,
                       ctx.calib_seq_len, ctx.seed, bool(ctx.checkpoint.instruct))


def calibration_rows(ctx: Any, tokenizer: Any = None) -> CalibrationRows:
    """The job's calibration rows: from the workspace when built already, else built (with `tokenizer`, or the
    checkpoint's) and recorded."""
    from quantkit.calibration import load, rows_fingerprint, token_rows

    ws, ckpt = ctx.workspace, ctx.checkpoint
    data = load(ctx.calibration)
    fp = step_fingerprint(ctx, data.content_hash)
    memo = _MEMO.get((str(ws.root), fp))
    if memo is not None:
        return memo
    path = ws.root / PATH
    if ws.is_done(STEP, fp):
        rows = np.load(path)
        found = CalibrationRows(rows, dict(ws.step_info(STEP)["rows"]))
        _MEMO[(str(ws.root), fp)] = found
        return found
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    rows = token_rows(ctx.calibration, tokenizer, n_samples=ctx.calib_samples, seq_len=ctx.calib_seq_len,
                      seed=ctx.seed, chat=ckpt.instruct, data=data)
    info = {"spec": str(data.spec), "samples": int(rows.shape[0]), "seq_len": int(rows.shape[1]),
            "tokens": int(rows.size), "fingerprint": rows_fingerprint(rows), "chat": bool(ckpt.instruct),
            "chat_template": bool(ckpt.instruct and getattr(tokenizer, "chat_template", None))}
    made = CalibrationRows(rows, info)
    if not ws.read_only:
        ws.dir("calibration")
        with atomic_path(path, need=rows.nbytes) as tmp, open(tmp, "wb") as f:
            np.save(f, rows)
        ws.record_step(STEP, fp, [path], rows=info)
    _MEMO[(str(ws.root), fp)] = made
    return made
