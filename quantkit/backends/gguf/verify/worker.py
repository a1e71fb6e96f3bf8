"""The half of a GGUF's verification that needs torch and transformers, in a process of its own.

It runs while the main process converts and quantizes, and gives the original tokenizer's ids of the sample text,
the eval tokens, and the bf16 reference of the first window (from the workspace when it has it, else computed). In
the main process, these imports and this Python work held the GIL that the quantizer's threads take back after every
C call: a verified 0.5B run took 11-13 s against 4.6 s unverified. Here it only shares the cores. The main process
stores a computed reference in the workspace's cache itself.

    python -m quantkit.backends.gguf.verify.worker JOB.pkl OUT_DIR
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np


def prepare(job: dict[str, Any], out: Path) -> None:
    """Write ``ids.npy`` (the sample text's ids) as soon as it can, then ``reference.npz`` and ``inputs.npz`` (the
    eval tokens, whether the reference was computed)."""
    from quantkit.threads import set_threads

    set_threads(job["threads"])
    from transformers import AutoTokenizer

    from quantkit.quality.evaluate import compute_reference, eval_tokens, find_reference
    from quantkit.quality.texts import sample_text
    from quantkit.workspace import Workspace, atomic_path

    ckpt = job["ckpt"]
    tok = AutoTokenizer.from_pretrained(ckpt.path)
    with atomic_path(out / "ids.npy") as tmp, open(tmp, "wb") as fh:  # first: the tokenizer checks can start
        np.save(fh, np.asarray(tok(sample_text())["input_ids"], np.int64))
    toks = eval_tokens(ckpt, job["spec"], job["n_ctx"], None, tok)
    have = find_reference(Workspace(job["workspace"], read_only=True), ckpt, toks)
    ref = have.head(1) if have is not None else compute_reference(ckpt, toks, stop=1)
    ref.save(out / "reference.npz")
    np.savez(out / "inputs.npz", chunks=toks.chunks, first=toks.first, spec=np.array(toks.spec),
             fingerprint=np.array(toks.fingerprint), computed=have is None)


def main(argv: list[str]) -> int:
    from quantkit.errors import QuantkitError
    from quantkit.interrupts import die_with_parent

    die_with_parent()
    job = pickle.loads(Path(argv[0]).read_bytes())
    try:
        prepare(job, Path(argv[1]))
    except QuantkitError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the parent shows the last line; QUANTKIT_DEBUG=1 the traceback
        if os.environ.get("QUANTKIT_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
