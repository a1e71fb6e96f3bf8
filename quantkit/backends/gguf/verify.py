"""Checks that a GGUF is right: it loads in llama.cpp, its tokenizer splits Russian text exactly like the original,
and (for an unquantized file) its next-token distribution matches the checkpoint's float32 transformers forward.

The cost is bounded and does not depend on the vocabulary beyond one head: the tokenizer check reads a fixed ~6,000
characters, and the forward check runs one window of the held-out eval text through both models and compares the
second half of it. When the run goes on to evaluate, the window is evaluation's first chunk and its reference is
evaluation's own (computed once per checkpoint and text, cached in the workspace, used by both); otherwise it is the
first `WINDOW` tokens, a quarter of a chunk, with its reference cached under its own step. Only the reference's top-k
log-probabilities and tail mass are compared when the vocabulary is large (the reference's own mode), so nothing
holds more than one window of logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.metrics import kld_full, kld_top_q, log_softmax, logsumexp, top2_gap
from quantkit.source import Checkpoint
from quantkit.verify import first_token_difference, sample_text
from quantkit.workspace import Workspace

MAX_BF16_KLD = 0.01  # bf16 GGUF vs bf16 transformers: only accumulation order differs (measured ~2e-6)
EVAL_SPEC = "builtin:ru-eval"
WINDOW = 128  # tokens of the eval text the forward check runs when the run does not evaluate
TIE = 0.01  # positions whose top two reference log-probabilities are this close are ties at any precision


class Verifier:
    """Verification of the files of one checkpoint: the tokenizer and its ids of the sample text loaded once."""

    def __init__(self, ckpt: Checkpoint, *, workspace: Workspace | None = None, tokenizer: Any = None,
                 evaluation: tuple[str, int] | None = None, n_ctx: int = WINDOW) -> None:
        """`evaluation`: (eval text, chunk length) of the evaluation that follows in this run, whose first chunk
        and cached reference the forward check then shares; else the first `n_ctx` tokens of the eval text."""
        from transformers import AutoTokenizer

        self.ckpt, self.ws = ckpt, workspace
        self.tok = tokenizer or AutoTokenizer.from_pretrained(ckpt.path)
        self.text = sample_text()
        self.hf_ids: list[int] = self.tok(self.text)["input_ids"]
        self.spec, self.n_ctx = evaluation or (EVAL_SPEC, n_ctx)
        self.step = "eval.reference" if evaluation else "gguf.verify.reference"

    def verify(self, path: Path, *, forward: bool) -> dict[str, Any]:
        """Raise a `QuantkitError` when the file is broken; return what was checked."""
        from quantkit.backends.gguf.llamacpp import LlamaModel, LlamaScorer

        # the reference first: transformers' memory is freed before llama.cpp maps the file (a lower peak)
        ref = self._reference() if forward else None
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
            if scorer is not None and ref is not None:
                report.update(self._forward(scorer, Path(path).name, *ref))
        finally:
            (scorer or model).close()
        return report

    def _reference(self) -> tuple[Any, Any]:
        """The eval tokens and the bf16 reference of their first chunk (from the workspace when it has it)."""
        from quantkit.evaluate import cached_reference, compute_reference, eval_tokens

        toks = eval_tokens(self.ckpt, self.spec, self.n_ctx, None, self.tok)
        ref = (cached_reference(self.ws, self.ckpt, toks, 1, step=self.step) if self.ws is not None
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
    """A `Verifier` built in a background thread while llama.cpp quantizes: its imports (torch, transformers, the
    model's modeling code) and the tokenizer are Python work, and quantization runs in C without the GIL, so on a
    0.5B model the ~3 s of set-up overlaps the quantization instead of following it."""

    def __init__(self, ckpt: Checkpoint, workspace: Workspace, evaluation: tuple[str, int] | None = None) -> None:
        import threading

        self._result: Verifier | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._build, args=(ckpt, workspace, evaluation), daemon=True,
                                         name="quantkit-verify-setup")
        self._thread.start()

    def _build(self, ckpt: Checkpoint, workspace: Workspace, evaluation: tuple[str, int] | None) -> None:
        try:
            from quantkit.layerwise import LayerwiseModel

            self._result = Verifier(ckpt, workspace=workspace, evaluation=evaluation)
            LayerwiseModel(ckpt)  # on the meta device: imports the architecture's modeling code, allocates nothing
        except BaseException as exc:  # noqa: BLE001 - handed to the caller of `get`
            self._error = exc

    def get(self) -> Verifier:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
