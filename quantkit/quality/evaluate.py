"""Quality against the bf16 original on held-out Russian text: perplexity, KL-divergence, top-1 agreement.

One token stream for every format, chunked like llama.cpp's ``llama-perplexity``: chunks of ``n_ctx`` tokens, the
first replaced by BOS when the model adds one, and only the second half of each chunk scored (positions
``n_ctx/2 .. n_ctx-2`` predicting the next token), so every prediction has at least ``n_ctx/2`` tokens of context.
The bf16 reference is computed once through transformers (layer by layer) and cached in the workspace: full
log-probabilities when they fit (``kld_mode: full``), otherwise the top-k log-probabilities and the tail mass
(``kld_mode: top64``, a lower bound of the true KL-divergence that is tight in practice). The cache grows by
chunks: GGUF verification computes and keeps the first chunk (`cached_reference`), eval adds the rest. The measures
themselves are `quantkit.quality.metrics`.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import console
from quantkit.errors import QuantkitError
from quantkit.quality.metrics import kld_full, kld_top, log_softmax, top1_agreement, top_k
from quantkit.source import Checkpoint, load_local
from quantkit.workspace import Workspace, atomic_path, fingerprint

DEFAULT_CTX = 512
DEFAULT_MAX_PPL_INCREASE = 0.05
DEFAULT_MAX_KLD = 0.05
TOP_K = 64
FULL_LIMIT_BYTES = 400 << 20  # keep full reference log-probs up to this size
ROW_BLOCK = 32  # positions per log-softmax / top-k pass in top-k mode


@dataclass
class EvalTokens:
    """The chunks every scorer sees (identical for every format)."""

    chunks: np.ndarray  # int64 [n_chunks, n_ctx]
    first: int
    spec: str
    fingerprint: str


def eval_tokens(ckpt: Checkpoint, spec: str, n_ctx: int, chunks: int | None, tokenizer: Any = None) -> EvalTokens:
    """Tokenize the eval text with the original tokenizer and cut it into llama-perplexity's chunks."""
    from transformers import AutoTokenizer

    from quantkit.calibration import load

    tok = tokenizer or AutoTokenizer.from_pretrained(ckpt.path)
    data = load(spec)
    text = "\n\n".join(d.plain() for d in data.documents)
    ids = tok(text)["input_ids"]
    n = len(ids) // n_ctx
    if n < 2:
        raise QuantkitError(
            f"the eval text {data.spec} has {len(ids):,} tokens: fewer than two chunks of {n_ctx}",
            f"give a longer text (at least {2 * n_ctx:,} tokens) or a smaller --ctx",
        )
    if chunks:
        n = min(n, chunks)
    arr = np.asarray(ids[: n * n_ctx], dtype=np.int64).reshape(n, n_ctx)
    bos = tok.bos_token_id
    if bos is not None and ids and ids[0] == bos:
        arr[:, 0] = bos
    fp = hashlib.sha256(arr.tobytes()).hexdigest()[:16]
    return EvalTokens(arr, n_ctx // 2, str(data.spec), fp)


class Reference:
    """The bf16 reference's per-position log-probabilities (full or top-k + tail) and its perplexity."""

    def __init__(self, mode: str, nll: np.ndarray, argmax: np.ndarray, prob: np.ndarray | None = None,
                 negent: np.ndarray | None = None, top_ids: np.ndarray | None = None,
                 top_logp: np.ndarray | None = None) -> None:
        self.mode, self.nll, self.argmax = mode, nll, argmax
        # full mode keeps p and Σ p·log p per position, so KL(p‖q) = Σ p·log p − p·log q is one dot product
        self.prob, self.negent, self.top_ids, self.top_logp = prob, negent, top_ids, top_logp

    @property
    def n_chunks(self) -> int:
        return int(self.nll.shape[0])

    def head(self, n: int) -> Reference:
        """The first `n` chunks."""
        return Reference(self.mode, *(a[:n] if isinstance(a, np.ndarray) else a for a in self._arrays()))

    def extend(self, more: Reference) -> Reference:
        """These chunks followed by `more`'s (same mode)."""
        return Reference(self.mode, *(None if a is None else np.concatenate([a, b])
                                      for a, b in zip(self._arrays(), more._arrays(), strict=True)))

    def _arrays(self) -> tuple[Any, ...]:
        return self.nll, self.argmax, self.prob, self.negent, self.top_ids, self.top_logp

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.astype(np.float64).mean()))

    def save(self, path: Path) -> None:
        arrays = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        buf = io.BytesIO()
        np.savez(buf, mode=np.array(self.mode), **arrays)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Reference:
        z = np.load(path)
        opt = {k: z[k] for k in ("prob", "negent", "top_ids", "top_logp") if k in z}
        if "logp" in z and "prob" not in z:  # written by quantkit before p and p·log p were cached
            opt["prob"] = np.exp(z["logp"])
            opt["negent"] = (opt["prob"].astype(np.float64) * z["logp"]).sum(-1)
        return cls(str(z["mode"]), z["nll"], z["argmax"], **opt)


def reference_mode(ckpt: Checkpoint, toks: EvalTokens) -> str:
    """``full`` when every position's log-probabilities of the whole text fit `FULL_LIMIT_BYTES`, else top-k."""
    n_chunks, n_ctx = toks.chunks.shape
    full = n_chunks * (n_ctx - 1 - toks.first) * ckpt.arch.vocab_size * 4 <= FULL_LIMIT_BYTES
    return "full" if full else f"top{TOP_K}"


def compute_reference(ckpt: Checkpoint, toks: EvalTokens, on_chunk: Any = None, *, start: int = 0,
                      stop: int | None = None) -> Reference:
    """Run the bf16 model (transformers, layer by layer) once over chunks ``start:stop`` (default: all)."""
    from quantkit.layerwise import LayerwiseModel

    chunks = toks.chunks[start:stop]
    n_chunks, n_ctx = chunks.shape
    n_pos = n_ctx - 1 - toks.first
    vocab = ckpt.arch.vocab_size
    full = reference_mode(ckpt, toks) == "full"
    nll = np.empty((n_chunks, n_pos), np.float32)
    argmax = np.empty((n_chunks, n_pos), np.int32)
    prob = np.empty((n_chunks, n_pos, vocab), np.float32) if full else None
    negent = np.empty((n_chunks, n_pos), np.float64) if full else None
    top_ids = None if full else np.empty((n_chunks, n_pos, TOP_K), np.int32)
    top_lp = None if full else np.empty((n_chunks, n_pos, TOP_K), np.float32)
    model = LayerwiseModel(ckpt)
    block = n_pos if full else ROW_BLOCK  # top-k mode: a few rows at a time, so no temporary is vocabulary × n_pos
    for c, logits in enumerate(model.run(chunks, logits=True, first=toks.first)):
        target = chunks[c, toks.first + 1 :]
        for a in range(0, n_pos, block):
            b = min(a + block, n_pos)
            lp = log_softmax(logits[a:b])
            nll[c, a:b] = -lp[np.arange(b - a), target[a:b]]
            argmax[c, a:b] = lp.argmax(-1)
            if full:
                p = np.exp(lp)
                prob[c, a:b] = p  # type: ignore[index]
                negent[c, a:b] = (p.astype(np.float64) * lp).sum(-1)  # type: ignore[index]
            else:
                top_ids[c, a:b], top_lp[c, a:b] = top_k(lp, TOP_K)  # type: ignore[index]
        if on_chunk:
            on_chunk()
    return Reference("full" if full else f"top{TOP_K}", nll, argmax, prob, negent, top_ids, top_lp)


def cached_reference(ws: Workspace, ckpt: Checkpoint, toks: EvalTokens, n_chunks: int | None = None,
                     on_chunk: Any = None) -> Reference:
    """The reference of the first `n_chunks` chunks (default: all), computed once per checkpoint and token set and
    kept in the workspace; a later call that needs more chunks computes only the missing ones. Verification
    (one chunk) and `quantkit eval` (all) share it."""
    want = len(toks.chunks) if n_chunks is None else min(n_chunks, len(toks.chunks))
    have = find_reference(ws, ckpt, toks)
    if have is not None and have.n_chunks >= want:
        return have.head(want)
    start = have.n_chunks if have is not None else 0
    more = compute_reference(ckpt, toks, on_chunk, start=start, stop=want)
    ref = have.extend(more) if have is not None else more
    store_reference(ws, ckpt, toks, ref)
    return ref


def _reference_file(ws: Workspace, ckpt: Checkpoint, toks: EvalTokens) -> tuple[Path, str]:
    ref_fp = fingerprint("reference", 4, ckpt.fingerprint, toks.fingerprint, reference_mode(ckpt, toks))
    return ws.root / "eval" / f"reference-{ref_fp}.npz", ref_fp


def find_reference(ws: Workspace, ckpt: Checkpoint, toks: EvalTokens) -> Reference | None:
    """The workspace's reference for this checkpoint and token set, as far as it goes; None when it has none.
    The file's name holds its fingerprint and it is written atomically, so one that exists is whole. Reads only
    (a verification worker process looks here while the main process holds the workspace)."""
    path, _ = _reference_file(ws, ckpt, toks)
    return Reference.load(path) if path.exists() else None


def store_reference(ws: Workspace, ckpt: Checkpoint, toks: EvalTokens, ref: Reference) -> None:
    """Keep `ref` in the workspace as the reference of this checkpoint and token set."""
    path, _ = _reference_file(ws, ckpt, toks)
    path.parent.mkdir(parents=True, exist_ok=True)
    ref.save(path)


def score(scorer: Any, toks: EvalTokens, ref: Reference, on_chunk: Any = None) -> dict[str, Any]:
    """PPL, ΔPPL, KLD (mean, p99, p99.9) and top-1 agreement of one artifact, in one pass over the chunks `ref`
    holds."""
    n_chunks, n_ctx = ref.n_chunks, toks.chunks.shape[1]
    n_pos = n_ctx - 1 - toks.first
    nll = np.empty((n_chunks, n_pos), np.float64)
    kld = np.empty((n_chunks, n_pos), np.float64)
    agree = np.empty((n_chunks, n_pos), bool)
    rows = np.arange(n_pos)
    t0 = time.perf_counter()
    for c in range(n_chunks):
        logits = scorer.chunk_logits(toks.chunks[c], toks.first)[:n_pos]
        agree[c] = top1_agreement(ref.argmax[c], logits)
        lq = log_softmax(logits)
        target = toks.chunks[c, toks.first + 1 :]
        nll[c] = -lq[rows, target]
        if ref.mode == "full":
            kld[c] = kld_full(ref.prob[c], ref.negent[c], lq)  # type: ignore[index]
        else:
            kld[c] = kld_top(ref.top_ids[c], ref.top_logp[c], lq)  # type: ignore[index]
        if on_chunk:
            on_chunk()
    kld = np.maximum(kld, 0.0)
    ppl = float(np.exp(nll.mean()))
    return {
        "ppl": round(ppl, 4),
        "ppl_ref": round(ref.ppl, 4),
        "delta_ppl": round(ppl / ref.ppl - 1.0, 5),
        "kld_mean": round(float(kld.mean()), 6),
        "kld_p99": round(float(np.percentile(kld, 99)), 6),
        "kld_p999": round(float(np.percentile(kld, 99.9)), 6),  # the tail publishers chart against size
        "top1": round(float(agree.mean()), 5),
        "tokens": int(n_chunks * n_pos),
        "chunks": int(n_chunks),
        "ctx": int(n_ctx),
        "eval_set": toks.spec,
        "tokens_fingerprint": toks.fingerprint,
        "kld_mode": ref.mode,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def gate(result: dict[str, Any], max_ppl_increase: float, max_kld: float, drift: dict[str, Any] | None = None,
         max_drift: float | None = None) -> dict[str, Any]:
    reasons = []
    if result["delta_ppl"] > max_ppl_increase:
        reasons.append(f"PPL +{result['delta_ppl']:.1%} > +{max_ppl_increase:.1%}")
    if result["kld_mean"] > max_kld:
        reasons.append(f"KLD {result['kld_mean']:.4f} > {max_kld}")
    extra = _drift_gate(drift, max_drift, reasons) if drift is not None and max_drift is not None else {}
    return {"passed": not reasons, "reasons": reasons, "max_ppl_increase": max_ppl_increase, "max_kld": max_kld,
            **extra}


def _drift_gate(drift: dict[str, Any], max_drift: float, reasons: list[str]) -> dict[str, Any]:
    """`quantkit eval --drift --max-drift`: the share of answers that left Russian (where bf16's did not)."""
    from quantkit.quality.drift import drift_value

    if drift_value(drift) > max_drift + 1e-9:
        reasons.append(f"left Russian in {drift['left_russian']}/{drift['prompts']} answers "
                       f"({drift_value(drift):.0%} > {max_drift:.0%})")
    return {"max_drift": max_drift}


def workspace_checkpoint(ws: Workspace, model: str | None = None) -> Checkpoint:
    """The bf16 checkpoint a workspace was made from (or `model`, resolved)."""
    if model:
        from quantkit.source import resolve

        return resolve(model)
    info = ws.model
    path = info.get("path")
    if not path or not Path(path).exists():
        raise QuantkitError(f"the bf16 checkpoint of {ws.root} is not available ({path})",
                            "pass --model with its alias, Hub id or folder")
    from quantkit.models import find_known

    return load_local(Path(path), name=info.get("name", Path(path).name), source=info.get("source", path),
                      hub_id=info.get("hub_id"), known=find_known(info.get("hub_id") or "") or None)


def check_tokenizer(scorer: Any, tokenizer: Any, vocab_size: int) -> None:
    """Refuse an artifact whose tokenizer differs from the reference's: its numbers would be meaningless. Every
    scorer with a ``tokenize(text)`` (the optional part of the `Scorer` protocol) is checked on Russian text; a
    leading BOS is ignored (engines add it at different places)."""
    from quantkit.quality.texts import sample_text

    if getattr(scorer, "n_vocab", vocab_size) != vocab_size:
        raise QuantkitError(f"{scorer.name} has a vocabulary of {scorer.n_vocab}, the original {vocab_size}",
                            "evaluate artifacts against the checkpoint they were made from")
    tokenize = getattr(scorer, "tokenize", None)
    model = getattr(scorer, "model", None)
    if tokenize is None and model is not None and hasattr(model, "tokenize"):  # a llama.cpp model
        def tokenize(text: str) -> list[int]:
            return list(model.tokenize(text, add_special=True))
    if tokenize is None:
        return
    text = sample_text(2000)
    bos = getattr(tokenizer, "bos_token_id", None)

    def strip(ids: list[int]) -> list[int]:
        return ids[1:] if ids and bos is not None and ids[0] == bos else ids

    ours, theirs = strip(list(tokenize(text))), strip(list(tokenizer(text)["input_ids"]))
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours),
                                                                                               len(theirs)))
        raise QuantkitError(f"{scorer.name} tokenizes Russian text differently from the original model (from token "
                            f"{at} on)", "evaluate artifacts against the checkpoint they were made from")


def evaluate_workspace(
    ws: Workspace,
    *,
    only: list[Path] | None = None,
    eval_spec: str = "builtin:ru-eval",
    n_ctx: int = DEFAULT_CTX,
    chunks: int | None = None,
    max_ppl_increase: float = DEFAULT_MAX_PPL_INCREASE,
    max_kld: float = DEFAULT_MAX_KLD,
    model: str | None = None,
    drift: Any = None,
) -> dict[str, Any]:
    """Score every artifact of the workspace (or `only` these) against the bf16 reference; record and gate.
    The workspace is locked meanwhile (another run writing it makes this refuse). `drift`
    (`quantkit.quality.generate.DriftSettings`) adds the language-drift check and its gate."""
    from quantkit.lock import holding

    with holding(ws.root):
        ckpt = workspace_checkpoint(ws, model) if model else None
        report, updates = evaluate_artifacts(ws, only=only, eval_spec=eval_spec, n_ctx=n_ctx, chunks=chunks,
                                             max_ppl_increase=max_ppl_increase, max_kld=max_kld, drift=drift,
                                             checkpoint=ckpt)
        for key, fields in updates.items():
            ws.update_artifact(key, **fields)
        return report


def evaluate_artifacts(ws: Workspace, *, only: list[Path] | None, eval_spec: str, n_ctx: int, chunks: int | None,
                       max_ppl_increase: float, max_kld: float, drift: Any = None, checkpoint: Checkpoint | None = None
                       ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Score artifacts and gate them; returns the report and, per artifact key, the fields to record on its entry
    (``eval``, ``gate``, ``drift``). Writes only caches (the reference, generated answers), never the manifest.
    An artifact whose recorded evaluation has this reference, text and entry fingerprint is not scored again."""
    from transformers import AutoTokenizer

    from quantkit.backends.base import backend_for

    ckpt = checkpoint or workspace_checkpoint(ws)
    tok = AutoTokenizer.from_pretrained(ckpt.path)
    toks = eval_tokens(ckpt, eval_spec, n_ctx, chunks, tok)
    check = _drift_check(ws, ckpt, tok, drift)
    keys = [ws.rel(Path(p)) for p in only] if only else sorted(ws.artifacts)
    if not keys:
        raise QuantkitError(f"{ws.root} has no artifacts to evaluate", "quantize first (quantkit gguf ...)")
    rows: list[dict[str, Any]] = []
    updates: dict[str, dict[str, Any]] = {}
    with console.progress() as bar:
        task = None

        def on_chunk() -> None:
            nonlocal task
            if task is None:
                task = bar.add_task("bf16 reference", total=len(toks.chunks))
            bar.advance(task)

        ref = cached_reference(ws, ckpt, toks, on_chunk=on_chunk)
        _, ref_fp = _reference_file(ws, ckpt, toks)
        for key in keys:
            entry = ws.artifacts.get(key, {})
            path = ws.abs(key)
            if not path.exists():
                raise QuantkitError(f"artifact {key} is missing from {ws.root}", "rerun the command that made it")
            backend = backend_for(path)
            reason = backend.check()
            if reason is not None:
                rows.append({"artifact": key, "format": backend.name, "quant": entry.get("quant", "?"),
                             "skipped": reason, "passed": True})
                continue
            efp = fingerprint("eval", ref_fp, entry.get("fingerprint"), entry.get("size"))
            old = entry.get("eval")
            if isinstance(old, dict) and old.get("fingerprint") == efp:
                result = old
            else:
                scorer = backend.scorer(path, n_ctx=n_ctx)
                try:
                    check_tokenizer(scorer, tok, ckpt.arch.vocab_size)
                    task = bar.add_task(f"eval {Path(key).name}", total=len(toks.chunks))
                    result = {**score(scorer, toks, ref, on_chunk=lambda t=task: bar.advance(t)), "fingerprint": efp}
                finally:
                    scorer.close()
            drifted = _drift_one(check, bar, key, entry, backend) if check else None
            verdict = gate(result, max_ppl_increase, max_kld, drifted, drift.max_drift if check else None)
            updates[key] = {"eval": result, "gate": verdict, **({"drift": drifted} if drifted else {})}
            rows.append({"artifact": key, "format": backend.name, "quant": entry.get("quant", "?"),
                         "size": entry.get("size"), "bpw": entry.get("bpw"), **result, "passed": verdict["passed"],
                         "reasons": verdict["reasons"], **({"drift": drifted} if drifted else {})})
    _hold_to_stock(ws, rows, updates)
    report = {"model": ckpt.name, "workspace": str(ws.root), "eval_set": toks.spec, "ctx": n_ctx,
              "chunks": int(len(toks.chunks)), "tokens_fingerprint": toks.fingerprint, "reference_ppl": ref.ppl,
              "kld_mode": ref.mode, "passed": all(r["passed"] for r in rows), "rows": rows,
              **({"drift": check.summary()} if check else {})}
    return report, updates


def _hold_to_stock(ws: Workspace, rows: list[dict[str, Any]], updates: dict[str, dict[str, Any]]) -> None:
    """A file made at a stock type's size (``--ladder``, ``--target-size Q4_K_M``) passes only if it beats that
    stock file on mean and 99.9% KLD, scored on the same tokens; otherwise its gate fails and it is not published."""
    for row in rows:
        entry = ws.artifacts.get(row["artifact"], {})
        stock_key = next((k for k, e in ws.artifacts.items() if entry.get("replaces")
                          and (e.get("format"), e.get("quant")) == (entry.get("format"), entry["replaces"])), None)
        if stock_key is None or "kld_mean" not in row:
            continue
        stock = updates.get(stock_key, {}).get("eval") or ws.artifacts[stock_key].get("eval")
        if not isinstance(stock, dict) or stock.get("tokens_fingerprint") != row.get("tokens_fingerprint"):
            continue
        mean, tail = row["kld_mean"], row.get("kld_p999", 0.0)
        if mean < stock["kld_mean"] and tail < stock.get("kld_p999", float("inf")):
            continue
        why = (f"no better than stock {entry['replaces']} (mean KLD {mean:.5f} vs {stock['kld_mean']:.5f}, 99.9% "
               f"{tail:.4f} vs {stock.get('kld_p999', float('nan')):.4f})")
        row["passed"] = False
        row["reasons"] = [*row.get("reasons", []), why]
        verdict = updates[row["artifact"]]["gate"]
        verdict["passed"], verdict["reasons"] = False, [*verdict["reasons"], why]


def _drift_check(ws: Workspace, ckpt: Checkpoint, tok: Any, drift: Any) -> Any:
    """The language-drift check (`generate`), set up before any expensive step (bad prompts fail here)."""
    if drift is None:
        return None
    from quantkit.quality.generate import DriftCheck

    return DriftCheck(ws, ckpt, tok, drift)


def _drift_one(check: Any, bar: Any, key: str, entry: dict[str, Any], backend: Any) -> dict[str, Any]:
    n = len(check.prompts)
    ref_task = None

    def on_ref() -> None:
        nonlocal ref_task
        if ref_task is None:
            ref_task = bar.add_task("bf16 answers", total=n)
        bar.advance(ref_task)

    task = bar.add_task(f"answers {Path(key).name}", total=n)
    return check.artifact(key, entry, backend, on_prompt=lambda: bar.advance(task), on_reference=on_ref)
