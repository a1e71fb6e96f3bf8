"""Checks that a GGUF is right: it loads in llama.cpp, its tokenizer splits Russian text exactly like the original,
and (for an unquantized file) its next-token distribution matches the checkpoint's float32 transformers forward.

The cost is bounded and does not depend on the vocabulary beyond one head: the tokenizer check reads a fixed ~6,000
characters, and the forward check runs one window of the held-out eval text through both models and compares the
second half of it. When the run goes on to evaluate, the window is evaluation's first chunk and its reference is
evaluation's own (computed once per checkpoint and text, cached in the workspace, used by both); otherwise it is the
first `WINDOW` tokens, a quarter of a chunk, with its own cached reference. Only the reference's top-k
log-probabilities and tail mass are compared when the vocabulary is large (the reference's own mode), so nothing
holds more than one window of logits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import console
from quantkit.errors import QuantkitError
from quantkit.quality.metrics import kld_full, kld_top_q, log_softmax, logsumexp, top2_gap
from quantkit.quality.texts import first_token_difference, sample_text
from quantkit.source import Checkpoint
from quantkit.workspace import Workspace

MAX_BF16_KLD = 0.01  # bf16 GGUF vs bf16 transformers: only accumulation order differs (measured ~2e-6)
EVAL_SPEC = "builtin:ru-eval"
WINDOW = 128  # tokens of the eval text the forward check runs when the run does not evaluate
TIE = 0.01  # positions whose top two reference log-probabilities are this close are ties at any precision


def window(evaluation: tuple[str, int] | None, n_ctx: int = WINDOW) -> tuple[str, int]:
    """The forward check's text and window length: evaluation's first chunk (whose cached reference evaluation
    shares) when the run evaluates, else the eval text's first `n_ctx` tokens."""
    if evaluation:
        return evaluation[0], evaluation[1]
    return EVAL_SPEC, n_ctx


class Verifier:
    """Verification of the files of one checkpoint: the tokenizer and its ids of the sample text loaded once."""

    def __init__(self, ckpt: Checkpoint, *, workspace: Workspace | None = None, tokenizer: Any = None,
                 evaluation: tuple[str, int] | None = None, n_ctx: int = WINDOW,
                 given: tuple[list[int], Callable[[], tuple[Any, Any]]] | None = None) -> None:
        """`evaluation`: (eval text, chunk length) of the evaluation that follows in this run, whose first chunk
        and cached reference the forward check then shares; else the first `n_ctx` tokens of the eval text.
        `given`: the sample text's ids, and what gives the eval tokens and their reference, prepared elsewhere
        (`Prepared`)."""
        self.ckpt, self.ws = ckpt, workspace
        self.text = sample_text()
        self.spec, self.n_ctx = window(evaluation, n_ctx)
        self._given = given
        if given is not None:
            self.hf_ids: list[int] = given[0]
            return
        from transformers import AutoTokenizer

        self.tok = tokenizer or AutoTokenizer.from_pretrained(ckpt.path)
        self.hf_ids = self.tok(self.text)["input_ids"]

    def verify(self, path: Path, *, forward: bool) -> dict[str, Any]:
        """Raise a `QuantkitError` when the file is broken; return what was checked."""
        from quantkit.backends.gguf.llamacpp import LlamaModel, LlamaScorer

        # computed here, the reference comes first: transformers' memory is freed before llama.cpp maps the file
        # (a lower peak); from the worker process (`Prepared`), it is waited for once the file is loaded
        ref = self._reference() if forward and self._given is None else None
        if ref is not None:
            _trim_heap()
        scorer = LlamaScorer(path, n_ctx=self.n_ctx) if forward else None
        model = scorer.model if scorer is not None else LlamaModel(path)
        try:
            first = first_token_difference(model, self.text, self.hf_ids)
            if first is not None:
                raise QuantkitError(
                    f"{Path(path).name}: llama.cpp tokenizes Russian text differently from the original tokenizer "
                    f"(first difference at token {first} of {len(self.hf_ids)})",
                    "the tokenizer metadata is wrong; report it with the model id",
                )
            report: dict[str, Any] = {"loads": True, "tokenizer_parity": True, "tokens_compared": len(self.hf_ids)}
            if scorer is not None:
                report.update(self._forward(scorer, Path(path).name, *(ref or self._reference())))
        finally:
            (scorer or model).close()
        return report

    def _reference(self) -> tuple[Any, Any]:
        """The eval tokens and the bf16 reference of their first chunk (from the workspace when it has it)."""
        from quantkit.quality.evaluate import cached_reference, compute_reference, eval_tokens

        if self._given is not None:
            return self._given[1]()
        toks = eval_tokens(self.ckpt, self.spec, self.n_ctx, None, self.tok)
        ref = (cached_reference(self.ws, self.ckpt, toks, 1) if self.ws is not None
               else compute_reference(self.ckpt, toks, stop=1))
        return toks, ref

    def _forward(self, scorer: Any, name: str, toks: Any, ref: Any) -> dict[str, Any]:
        """KL-divergence and top-1 agreement with the bf16 reference on the eval text's first chunk."""
        n_pos = toks.chunks.shape[1] - 1 - toks.first
        logits = scorer.chunk_logits(toks.chunks[0], toks.first)[:n_pos]
        if ref.mode == "full":
            kld_rows = kld_full(ref.prob[0], ref.negent[0], log_softmax(logits, np.float64))  # type: ignore[index]
            gap = top2_gap(np.log(np.maximum(ref.prob[0], 1e-38)))  # type: ignore[index]
        else:  # only the reference's top-k columns and the normaliser: no vocabulary-sized float64 matrix
            ids = ref.top_ids[0]  # type: ignore[index]
            lq_top = np.take_along_axis(logits, ids, -1).astype(np.float64) - logsumexp(logits)[:, None]
            kld_rows = kld_top_q(ref.top_logp[0], lq_top)  # type: ignore[index]
            gap = top2_gap(ref.top_logp[0])  # type: ignore[index]
        kld = float(np.maximum(kld_rows, 0.0).mean())
        decided = gap >= TIE
        agree = logits.argmax(-1) == ref.argmax[0]
        top1 = float(agree[decided].mean()) if decided.any() else 1.0
        if kld > MAX_BF16_KLD:
            raise QuantkitError(
                f"{name}: llama.cpp's output differs from transformers' (KL-divergence {kld:.4f})",
                "the conversion is wrong for this model; report it with the model id",
            )
        return {"kld_vs_transformers": round(kld, 8), "top1_vs_transformers": round(top1, 4),
                "positions_compared": int(n_pos), "kld_mode": ref.mode}


def verify_gguf(ckpt: Checkpoint, path: Path, *, forward: bool, n_tokens: int = WINDOW,
                workspace: Workspace | None = None) -> dict[str, Any]:
    """One file's verification (`Verifier`); `n_tokens` is the length of the window (its second half is
    compared)."""
    return Verifier(ckpt, workspace=workspace, n_ctx=n_tokens).verify(path, forward=forward)


def _trim_heap() -> None:
    """Hand the memory transformers freed back to the system before llama.cpp loads the model: glibc keeps large
    freed blocks in the heap, and the two peaks then add up (verifying a 0.5B model peaked at 2.8 GB, 2.3 with it)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


class Prepared:
    """The torch/transformers half of verification (`verify_worker`), started in a process of its own when the run
    begins, so its ~5 s of imports, tokenizer and reference forward on a 0.5B model run beside the conversion
    instead of after it, without taking the GIL from the quantizer's threads. `get` waits for it and returns the
    `Verifier`; `close` stops it and removes its files (also on errors and interrupts)."""

    def __init__(self, ckpt: Checkpoint, workspace: Workspace, evaluation: tuple[str, int] | None = None,
                 threads: int = 0) -> None:
        import pickle
        import subprocess
        import sys

        from quantkit.interrupts import child_env
        from quantkit.workspace import private_temp_name

        self.ckpt, self.ws, self.evaluation = ckpt, workspace, evaluation
        self._done: tuple[Any, Any] | None = None
        spec, n_ctx = window(evaluation)
        self.dir = private_temp_name(workspace.root / "verify")  # a dead run's is removed with its other partials
        self.dir.mkdir(parents=True, exist_ok=True)
        job = {"ckpt": ckpt, "spec": spec, "n_ctx": n_ctx, "workspace": str(workspace.root),
               "threads": threads}
        (self.dir / "job.pkl").write_bytes(pickle.dumps(job))
        with open(self.dir / "log.txt", "w") as log:
            self._proc: Any = subprocess.Popen(
                [sys.executable, "-m", "quantkit.backends.gguf.verify.worker", str(self.dir / "job.pkl"),
                 str(self.dir)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env())

    def get(self) -> Verifier:
        """The `Verifier`, as soon as the worker has tokenized (its reference is waited for when first needed)."""
        import time

        ids = self.dir / "ids.npy"
        while not ids.exists() and self._proc.poll() is None:
            time.sleep(0.02)
        if not ids.exists():
            self._failed()
        return Verifier(self.ckpt, workspace=self.ws, evaluation=self.evaluation,
                        given=(np.load(ids).tolist(), self._reference))

    def _reference(self) -> tuple[Any, Any]:
        from quantkit.quality.evaluate import EvalTokens, Reference, store_reference

        if self._done is None:
            if self._proc.wait() != 0:
                self._failed()
            z = np.load(self.dir / "inputs.npz")
            toks = EvalTokens(z["chunks"], int(z["first"]), str(z["spec"]), str(z["fingerprint"]))
            ref = Reference.load(self.dir / "reference.npz")
            if bool(z["computed"]):
                store_reference(self.ws, self.ckpt, toks, ref)
            self._done = (toks, ref)
        return self._done

    def _failed(self) -> None:
        self._proc.wait()
        if self._proc.returncode != 0:
            err = (self.dir / "log.txt").read_text(encoding="utf-8", errors="replace")
            if os.environ.get("QUANTKIT_DEBUG"):
                console.info(err)
            last = next((line for line in reversed(err.splitlines()) if line.strip()), "no message")
            raise QuantkitError(f"verification could not run: {last.removeprefix('error: ')}",
                                "QUANTKIT_DEBUG=1 shows the worker's traceback; --no-verify skips verification")
        raise QuantkitError("verification's worker stopped without its results", "run the same command again")

    def close(self) -> None:
        import shutil

        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
