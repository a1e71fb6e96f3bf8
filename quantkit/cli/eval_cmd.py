"""`quantkit eval WORKSPACE|ARTIFACT`: one PPL / KLD / top-1 table for every artifact, whatever its format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from quantkit import console
from quantkit.cli.options import JsonOpt, QuietOpt, ThreadsOpt, handle_errors, setup_output
from quantkit.errors import GateFailed, QuantkitError
from quantkit.quality.drift import DEFAULT_MAX_DRIFT, DEFAULT_NEW_TOKENS, DEFAULT_PROMPTS
from quantkit.quality.drift import PREFIX_TOKENS as PREFIX
from quantkit.quality.evaluate import DEFAULT_CTX, DEFAULT_MAX_KLD, DEFAULT_MAX_PPL_INCREASE, evaluate_workspace
from quantkit.workspace import MANIFEST, Workspace, human_size


def find_workspace(target: Path) -> tuple[Workspace, list[Path] | None]:
    """A workspace folder, a format folder inside one, or one artifact (file or folder) inside one."""
    target = target.resolve()
    if not target.exists():
        raise QuantkitError(f"{target} does not exist", "pass a workspace (quants/<model>) or an artifact")
    for folder in [target, *target.parents]:
        if (folder / MANIFEST).exists():
            ws = Workspace(folder)
            if folder == target:
                return ws, None
            rel = target.relative_to(folder).as_posix()
            if rel in ws.artifacts:
                return ws, [target]
            inside = [ws.abs(k) for k in ws.artifacts if k.startswith(rel + "/")]
            if inside:
                return ws, inside
            raise QuantkitError(f"{target} is not an artifact of the workspace {folder}",
                                "pass the workspace or one of its artifacts")
    raise QuantkitError(f"{target} is not inside a quantkit workspace (no {MANIFEST} found)",
                        "pass the workspace folder quantkit made (quants/<model>)")


@handle_errors
def command(
    target: Annotated[Path, typer.Argument(help="A workspace (quants/<model>), a format folder, or one artifact.")],
    eval_spec: Annotated[str, typer.Option("--eval", help="Eval text: builtin:ru-eval, a file, or hf:...")]
    = "builtin:ru-eval",
    ctx: Annotated[int, typer.Option("--ctx", min=16, help="Context (chunk) length, like llama-perplexity -c.")]
    = DEFAULT_CTX,
    chunks: Annotated[int | None, typer.Option("--chunks", min=2, help="Use at most this many chunks.")] = None,
    max_ppl_increase: Annotated[float, typer.Option("--max-ppl-increase", help="Gate: relative PPL increase.")]
    = DEFAULT_MAX_PPL_INCREASE,
    max_kld: Annotated[float, typer.Option("--max-kld", help="Gate: mean KL-divergence.")] = DEFAULT_MAX_KLD,
    model: Annotated[str | None, typer.Option("--model", help="The bf16 original, if not the workspace's.")] = None,
    drift: Annotated[bool, typer.Option("--drift", help="Also check that answers stay in Russian (greedy "
                                        "generation from bf16 and every artifact).")] = False,
    drift_prompts: Annotated[Path | None, typer.Option("--drift-prompts", help="Your own prompts (.jsonl with "
                             "{\"prompt\"} per line, or .txt one per line); implies --drift.")] = None,
    drift_count: Annotated[int, typer.Option("--drift-count", min=0, help="Prompts to use (0 = all).")]
    = DEFAULT_PROMPTS,
    drift_tokens: Annotated[int, typer.Option("--drift-tokens", min=1, max=1024, help="New tokens per answer.")]
    = DEFAULT_NEW_TOKENS,
    max_drift: Annotated[float, typer.Option("--max-drift", min=0.0, max=1.0, help="Gate: share of answers "
                         "that left Russian (where bf16's did not).")] = DEFAULT_MAX_DRIFT,
    threads: ThreadsOpt = 0,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure perplexity, KL-divergence and top-1 agreement of every artifact against the bf16 original."""
    from quantkit.threads import set_threads

    setup_output(quiet, json_output)
    set_threads(threads)  # the bf16 reference (torch) and every scorer (llama.cpp, transformers)
    ws, only = find_workspace(target)
    settings = drift_settings(drift, drift_prompts, drift_count, drift_tokens, max_drift)
    report = evaluate_workspace(ws, only=only, eval_spec=eval_spec, n_ctx=ctx, chunks=chunks,
                                max_ppl_increase=max_ppl_increase, max_kld=max_kld, model=model, drift=settings)
    if json_output:
        console.emit_json(report)
    else:
        show(report)
    if not report["passed"]:
        failing = [r["artifact"] for r in report["rows"] if not r["passed"]]
        raise GateFailed(f"{len(failing)} artifact(s) failed the quality gate: {', '.join(failing)}",
                         "use a larger type, or relax --max-ppl-increase / --max-kld"
                         + (" / --max-drift" if settings else ""))


def drift_settings(on: bool, prompts: Path | None, count: int, tokens: int, max_drift: float) -> Any:
    """The drift check's settings (None when off); a bad prompts file fails here, before any model is loaded."""
    if not on and prompts is None:
        return None
    from quantkit.quality.drift import load_prompts
    from quantkit.quality.generate import DriftSettings

    spec = str(prompts) if prompts is not None else None
    load_prompts(spec, None)
    return DriftSettings(prompts=spec, count=count or None, new_tokens=tokens, max_drift=max_drift)


def _kept(r: dict[str, Any]) -> list[str]:
    d = r.get("drift")
    if not d:
        return []
    kept = f"{d['kept']:.0%} ({d['prompts'] - d['left_russian']}/{d['prompts']})"
    return [kept, f"{d['same_prefix']}/{d['prompts']}"]


def show_drift(report: dict[str, Any]) -> None:
    """The drift check's setting and the worst answers side by side."""
    info = report.get("drift")
    if not info:
        return
    out = console.table_console()
    dtype = f", bf16 answers in {info['bf16_dtype']}" if info.get("bf16_dtype") else ""
    out.print(f"Russian kept: {info['count']} prompts from {info['prompts']}, greedy, {info['new_tokens']} new tokens"
              f" ({'chat template' if info['instruct'] else 'plain text'}{dtype}); "
              f"same@N: answers identical to bf16's for the first {PREFIX} tokens.")
    first = next((r["drift"] for r in report["rows"] if r.get("drift")), None)
    if first and first.get("left_russian_bf16"):
        out.print(f"bf16 itself left Russian in {first['left_russian_bf16']}/{first['prompts']} answers: those prompts "
                  "count as kept for every artifact.")
    for r in report["rows"]:
        d = r.get("drift") or {}
        secs = f"{d['seconds']:.1f} s for {d['generated_tokens']} tokens" if d.get("seconds") is not None else ""
        if secs:
            out.print(f"  {r['artifact']}: Cyrillic {_pct(d.get('cyrillic'))} of letters (bf16 "
                      f"{_pct(d.get('cyrillic_bf16'))}), mean common prefix {d['mean_common_prefix']} tokens; {secs}")
        for ex in [e for e in d.get("examples", []) if e.get("left_russian")][:3]:
            out.print(f"    prompt: {_short(ex['prompt'])}\n      bf16: {_short(ex['bf16'])}\n      "
                      f"{Path(r['artifact']).name}: {_short(ex['answer'])}\n      → {ex['left_russian']}",
                      markup=False, highlight=False)


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, int | float) else "—"


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def show(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['model']} on {report['eval_set']}: {report['chunks']} chunks × {report['ctx']} "
                        f"tokens, bf16 PPL {report['reference_ppl']:.3f} (KLD {report['kld_mode']})")
    drift_cols = ["Russian kept", f"same@{PREFIX}"] if report.get("drift") else []
    for col in ("artifact", "type", "size", "bpw", "PPL", "ΔPPL", "KLD mean", "KLD p99", "top-1", *drift_cols,
                "gate"):
        table.add_column(col, justify="right" if col not in ("artifact", "type", "gate") else "left")
    for r in report["rows"]:
        if "skipped" in r:
            table.add_row(r["artifact"], r["quant"], "", "", "", "", "", "", "", *([""] * len(drift_cols)),
                          f"skipped: {r['skipped']}")
            continue
        table.add_row(
            r["artifact"], r["quant"], human_size(r["size"]) if r.get("size") else "",
            f"{r['bpw']:.2f}" if r.get("bpw") else "", f"{r['ppl']:.3f}", f"{r['delta_ppl']:+.2%}",
            f"{r['kld_mean']:.5f}", f"{r['kld_p99']:.4f}", f"{r['top1']:.2%}",
            *(_kept(r) or [""] * len(drift_cols)),
            "pass" if r["passed"] else "FAIL: " + "; ".join(r["reasons"]),
        )
    console.table_console().print(table)
    show_drift(report)
