"""The work of the GGUF backend's size-targeted steps: measure once per workspace, allocate and write one file per
target.

See `quantkit.backends.gguf.target.allocate` for the method. The measurement (one quantization of the whole model per
candidate type, and the damage table) is the ``gguf/measure`` step's ``gguf/target-measure.json``; every target
then costs one allocation and one quantization.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.backends.gguf.quantize.core import QuantizeOptions, quantize
from quantkit.backends.gguf.target import allocate as tg
from quantkit.errors import QuantkitError
from quantkit.workspace import write_json_atomic

METHOD_VERSION = 2  # bump when measurement or allocation change, so finished targets are redone


def budget_for(target: str, bf16: Path) -> int:
    """A ``--target-size`` (``4.5G``) or ``--target-bpw`` (``4.8bpw``) as a file size in bytes."""
    text = target.strip().lower()
    if text.endswith("bpw"):
        try:
            bpw = float(text[:-3])
        except ValueError:
            raise QuantkitError(f"bad --target-bpw '{target}'", "write it like 4.8") from None
        info = tg.read_info(bf16)
        return int(bpw * tg.n_weights(bf16) / 8) + info.data_start
    return tg.parse_size(target)


def _table_to_json(table: dict[str, dict[Any, tg.Piece]]) -> dict[str, Any]:
    return {name: {q.name: [p.qtype.name, p.nbytes, p.damage] for q, p in opts.items()} for name, opts in table.items()}


def _table_from_json(data: dict[str, Any]) -> dict[str, dict[Any, tg.Piece]]:
    return {name: {tg.Q[q]: tg.Piece(tg.Q[v[0]], int(v[1]), float(v[2])) for q, v in opts.items()}
            for name, opts in data.items()}


def measure(base: Path, out: Path, imatrix: dict[str, np.ndarray] | None, threads: int, bar: Any) -> dict[str, float]:
    """Measure the damage table of every tensor × candidate type and each group's end-to-end factor, and write
    both to `out` (``target-measure.json``); returns the factors."""
    stage = out.parent / ".target-pieces"
    stage.mkdir(parents=True, exist_ok=True)
    task = bar.add_task("measure tensor sensitivity", total=len(tg.CANDIDATES))

    def quantize_with(overrides: list[tuple[str, int]], path: Path, **kw: Any) -> Path:
        opts = QuantizeOptions(file_type="Q8_0", imatrix=imatrix, tensor_types=overrides, threads=threads, **kw)
        return quantize(base, path, opts)[0]

    def quantize_all(qtype: Any, path: Path) -> Path:
        return quantize_with([(".*", int(qtype))], path, output_type=int(qtype), embedding_type=int(qtype))

    try:
        table = tg.measure(base, stage, imatrix, quantize_all, on_type=lambda q: bar.advance(task))
        factors = group_factors(base, table, stage, quantize_with, bar)
    finally:
        for leftover in stage.glob("*"):
            leftover.unlink()
        stage.rmdir()
    write_json_atomic(out, {"table": _table_to_json(table), "factors": factors})
    return factors


def load_table(path: Path) -> dict[str, dict[Any, tg.Piece]]:
    """The measured table, scaled by the group factors (as `measure` wrote it)."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    return tg.scaled(_table_from_json(saved["table"]), saved["factors"])


PROBE_CHUNKS = 2  # 512-token chunks of calibration text per probe (KLD over their second halves)


def probe_tokens(base: Path) -> np.ndarray:
    """Calibration text (never the eval text) tokenized by the file's own vocabulary: PROBE_CHUNKS × 512 tokens."""
    from quantkit.backends.gguf.llamacpp import LlamaModel
    from quantkit.calibration import load

    model = LlamaModel(base, vocab_only=True)
    try:
        ids: list[int] = []
        for doc in load("builtin:ru-mix").documents:
            ids += model.tokenize(doc.plain() + "\n\n")
            if len(ids) >= PROBE_CHUNKS * 512:
                break
    finally:
        model.close()
    return np.asarray(ids[: PROBE_CHUNKS * 512], dtype=np.int32).reshape(-1, 512)


def _log_probs(path: Path, chunks: np.ndarray) -> list[np.ndarray]:
    from quantkit.backends.gguf.llamacpp import LlamaScorer
    from quantkit.quality.metrics import log_softmax

    scorer = LlamaScorer(path, n_ctx=512)
    try:
        return [log_softmax(scorer.chunk_logits(c, 256), np.float64) for c in chunks]
    finally:
        scorer.close()


def group_factors(base: Path, table: dict[str, dict[Any, tg.Piece]], stage: Path, quantize_with: Any,
                  bar: Any) -> dict[str, float]:
    """Per tensor group: KL-divergence from BF16 per unit of weight-space damage, measured with the group alone at
    the lowest candidate type (one quantization and one short llama.cpp scoring per group)."""
    groups = sorted({tg.group_of(name) for name in table})
    task = bar.add_task("measure each tensor group's effect on the output", total=len(groups) + 1)
    chunks = probe_tokens(base)
    ref = _log_probs(base, chunks)
    bar.advance(task)

    def kld(path: Path) -> float:
        got = _log_probs(path, chunks)
        return float(np.mean([(np.exp(a) * (a - b)).sum(-1).mean() for a, b in zip(ref, got, strict=True)]))

    high = [(f"^{re.escape(name)}$", int(max(opts.values(), key=lambda p: p.nbytes).qtype))
            for name, opts in table.items()]
    floor = kld(quantize_with(high, stage / "probe-high.gguf"))
    factors: dict[str, float] = {}
    for group in groups:
        overrides, damage = tg.group_probe(table, group)
        path = quantize_with(overrides, stage / f"probe-{group}.gguf")
        factors[group] = max(kld(path) - floor, 1e-12) / max(damage, 1e-30)
        path.unlink()
        bar.advance(task)
    return factors


def write_target(run: Any, name: str, base: Path, target: str, table: dict[str, dict[Any, tg.Piece]],
                 imatrix: dict[str, np.ndarray] | None, threads: int, budget: int | None = None
                 ) -> tuple[Path, Path, tg.Plan, int]:
    """Allocate for one target and write ``<Model>-target-<target>-<bpw>bpw.gguf`` (what was asked, and the bits per
    weight the file has) and its ``.tensor-types.txt`` into the step's staging folder; returns both, the allocation
    and the budget (`budget` when given: a stock file's size). The target is a bound: a file over it is never kept."""
    from quantkit.backends.gguf.ggufinfo import gguf_stats

    budget = budget if budget is not None else budget_for(target, base)
    fixed = tg.fixed_bytes(base, set(table))
    plan = tg.allocate(table, budget, fixed, tg.n_weights(base))
    work = run.path(f"gguf/.{name}-target-{target}.gguf")
    task = run.bar.add_task(f"quantize → best mix under {target}", total=1)
    opts = QuantizeOptions(file_type="Q8_0", imatrix=imatrix, tensor_types=plan.tensor_types(), threads=threads,
                           need=plan.nbytes + (1 << 20))
    files = quantize(base, work, opts, on_done=lambda: run.bar.advance(task))
    size = sum(f.stat().st_size for f in files)
    if size > budget:
        raise QuantkitError(f"the {target} mix came out {size:,} bytes, over its target {budget:,}",
                            "report it with the model id; a slightly smaller target works around it")
    _, bpw = gguf_stats(files[0])
    dst = run.path(f"gguf/{name}-target-{target}-{bpw:.2f}bpw.gguf")
    files[0].rename(dst)
    types_file = dst.with_suffix(".tensor-types.txt")
    types_file.write_text(plan.type_file(), encoding="utf-8")
    return dst, types_file, plan, budget
