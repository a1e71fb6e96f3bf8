"""The calibrate step (``model/calibrate``): a workspace's token rows, built once per checkpoint × calibration set ×
shape × seed and read by every format that calibrates on token rows (the GGUF importance matrix, GPTQ).

The rows are ``calibration/rows.npy`` (``int64[samples, seq_len]``, the chat template for instruct models); the
step's record says what they are (spec, shape, the rows' own fingerprint, whether the chat template was used). A
format's step lists `CALIBRATE` among its inputs and reads them with `rows_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quantkit.steps import CALIBRATE, Step, StepResult, StepRun
from quantkit.workspace import fingerprint

PATH = "calibration/rows.npy"
_MEMO: dict[tuple[str, str], CalibrationRows] = {}


@dataclass(frozen=True)
class CalibrationRows:
    """``int64[samples, seq_len]`` token rows and what the cards and fingerprints say about them."""

    rows: np.ndarray
    info: dict[str, Any]  # spec, samples, seq_len, tokens, fingerprint (of the rows), chat, chat_template


def step_fingerprint(ctx: Any) -> str:
    """What the rows depend on: the checkpoint (its tokenizer), the set's content, the shape, the seed, chat."""
    from quantkit.calibration import spec_hash

    return fingerprint("calibration-rows", ctx.checkpoint.fingerprint, spec_hash(ctx.calibration), ctx.calib_samples,
                       ctx.calib_seq_len, ctx.seed, bool(ctx.checkpoint.instruct))


def calibrate_step(ctx: Any) -> Step:
    """The shared calibrate step of a job (its fingerprint is known once the checkpoint is here)."""
    chat = " (chat template)" if ctx.checkpoint is not None and ctx.checkpoint.instruct else ""
    return Step(CALIBRATE, "calibrate",
                f"calibrate: {ctx.calibration} → {ctx.calib_samples}×{ctx.calib_seq_len} token rows{chat}",
                outputs=(PATH,), fingerprint=step_fingerprint(ctx) if ctx.checkpoint is not None else "",
                estimated_size=ctx.calib_samples * ctx.calib_seq_len * 8, action=build_rows)


def build_rows(run: StepRun) -> StepResult:
    """Tokenize the calibration set into rows (the checkpoint's tokenizer, its chat template for instruct models)."""
    from transformers import AutoTokenizer

    from quantkit.calibration import load, rows_fingerprint, token_rows

    ctx = run.ctx
    ckpt = ctx.checkpoint
    data = load(ctx.calibration)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    rows = token_rows(ctx.calibration, tokenizer, n_samples=ctx.calib_samples, seq_len=ctx.calib_seq_len,
                      seed=ctx.seed, chat=ckpt.instruct, data=data)
    info = {"spec": str(data.spec), "samples": int(rows.shape[0]), "seq_len": int(rows.shape[1]),
            "tokens": int(rows.size), "fingerprint": rows_fingerprint(rows), "chat": bool(ckpt.instruct),
            "chat_template": bool(ckpt.instruct and getattr(tokenizer, "chat_template", None))}
    with open(run.path(PATH), "wb") as fh:
        np.save(fh, rows)
    return StepResult(info={"rows": info})


def rows_of(run: StepRun) -> CalibrationRows:
    """The job's calibration rows, as the calibrate step recorded them (read once per process)."""
    rec = run.input(CALIBRATE)
    memo = _MEMO.get((str(rec.path), rec.fingerprint))
    if memo is None:
        memo = CalibrationRows(np.load(rec.path), dict(rec.info["rows"]))
        _MEMO[(str(rec.path), rec.fingerprint)] = memo
    return memo
