"""`quantkit eval WORKSPACE|ARTIFACT`: one PPL / KLD / top-1 table for every artifact, whatever its format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from quantkit import console
from quantkit.cli.options import JsonOpt, QuietOpt, handle_errors, setup_output
from quantkit.errors import QuantkitError
from quantkit.evaluate import DEFAULT_CTX, DEFAULT_MAX_KLD, DEFAULT_MAX_PPL_INCREASE, evaluate_workspace
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
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure perplexity, KL-divergence and top-1 agreement of every artifact against the bf16 original."""
    setup_output(quiet, json_output)
    ws, only = find_workspace(target)
    report = evaluate_workspace(ws, only=only, eval_spec=eval_spec, n_ctx=ctx, chunks=chunks,
                                max_ppl_increase=max_ppl_increase, max_kld=max_kld, model=model)
    if json_output:
        console.emit_json(report)
    else:
        show(report)
    if not report["passed"]:
        failing = [r["artifact"] for r in report["rows"] if not r["passed"]]
        raise QuantkitError(f"{len(failing)} artifact(s) failed the quality gate: {', '.join(failing)}",
                            "use a larger type, or relax --max-ppl-increase / --max-kld")


def show(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['model']} on {report['eval_set']}: {report['chunks']} chunks × {report['ctx']} "
                        f"tokens, bf16 PPL {report['reference_ppl']:.3f} (KLD {report['kld_mode']})")
    for col in ("artifact", "type", "size", "bpw", "PPL", "ΔPPL", "KLD mean", "KLD p99", "top-1", "gate"):
        table.add_column(col, justify="right" if col not in ("artifact", "type", "gate") else "left")
    for r in report["rows"]:
        if "skipped" in r:
            table.add_row(r["artifact"], r["quant"], "", "", "", "", "", "", "", f"skipped: {r['skipped']}")
            continue
        table.add_row(
            r["artifact"], r["quant"], human_size(r["size"]) if r.get("size") else "",
            f"{r['bpw']:.2f}" if r.get("bpw") else "", f"{r['ppl']:.3f}", f"{r['delta_ppl']:+.2%}",
            f"{r['kld_mean']:.5f}", f"{r['kld_p99']:.4f}", f"{r['top1']:.2%}",
            "pass" if r["passed"] else "FAIL: " + "; ".join(r["reasons"]),
        )
    console.table_console().print(table)
