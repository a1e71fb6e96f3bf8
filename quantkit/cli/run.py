"""`quantkit run RECIPE.yaml`: every model × format of a recipe, evaluated, gated and published; resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from quantkit import console
from quantkit.cli.options import DryRunOpt, JsonOpt, QuietOpt, handle_errors, setup_output
from quantkit.workspace import human_size


@handle_errors
def command(
    file: Annotated[Path, typer.Argument(help="The recipe (YAML), e.g. recipes/t-lite.yaml.")],
    dry_run: DryRunOpt = False,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Only this format (gguf, exl2, gptq); repeatable or comma-separated.")] = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Only this model (its name or source); repeatable.")] = None,
    continue_on_error: Annotated[bool, typer.Option(
        "--continue-on-error", help="When a model or format fails, go on with the rest.")] = False,
    executor: Annotated[str, typer.Option(
        "--executor", help="Where steps run: local (this process) or ray (a Ray cluster; pip install ray).")]
    = "local",
    address: Annotated[str | None, typer.Option(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster).")] = None,
    connect_timeout: Annotated[float, typer.Option(
        "--connect-timeout", min=0, help="Seconds to wait for the Ray cluster at --address to answer.")] = 60.0,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe: quantize every model into every format, evaluate, gate and publish; reruns skip finished work."""
    from quantkit.recipe import failure, load_recipe, plan, run_recipe

    setup_output(quiet, json_output)
    recipe = load_recipe(file)
    if dry_run:
        result = plan(recipe, only=only, models=model)
        if executor != "local":  # which task runs which steps, and what each asks of the node that gets it
            from quantkit.pipeline import get_executor
            from quantkit.recipe import jobs

            result["tasks"] = get_executor(executor, address=address, connect_timeout=connect_timeout).plan(
                jobs(recipe, only=only, models=model))
        if json_output:
            console.emit_json(result)
        else:
            show_plan(result)
        return
    options = {"address": address, "connect_timeout": connect_timeout} if executor == "ray" else {}
    summary = run_recipe(recipe, only=only, models=model, continue_on_error=continue_on_error, executor=executor,
                         **options)
    if json_output:
        console.emit_json(summary)
    else:
        show_summary(summary)
    error = failure(summary)
    if error is not None:
        raise error


def _size(value: Any) -> str:
    return human_size(value) if isinstance(value, int | float) and value else ""


def show_plan(result: dict[str, Any]) -> None:
    """The plan as a table: steps, outputs, estimated sizes, target repos, done / to do."""
    out = Console(highlight=False, markup=False)
    table = Table(title=f"Plan for {Path(result['recipe']).name} (nothing was run)")
    for col in ("model", "format", "step", "output", "est. size", "repo", "status"):
        table.add_column(col, justify="right" if col == "est. size" else "left", overflow="fold")
    for m in result["models"]:
        first = True
        for s in m["steps"]:
            status = s["status"]
            style = {"done": "green", "to do": "", "skip": "yellow", "not needed": "dim"}.get(status, "red")
            table.add_row(m["model"] if first else "", s.get("format") or "", s["step"], str(s.get("output") or ""),
                          ("~" if m["estimated"] and s.get("estimated_size") else "") + _size(s.get("estimated_size")),
                          s.get("repo") or "", console.styled(status, style))
            first = False
        table.add_section()
    out.print(table)
    for m in result["models"]:
        if m.get("note"):
            out.print(f"{m['model']}: {m['note']}")
        for f in m["formats"]:
            if f.get("problem"):
                out.print(console.styled(f"{m['model']}: {f['format']} would fail:", "red"), f["problem"])
            elif not f["can_run"]:
                verb = "is required and would fail" if f["required"] else "would be skipped"
                out.print(f"{m['model']}: {f['format']} {verb} here: {f['reason']}")
    if result.get("tasks"):
        tasks = Table(title="Tasks on the cluster (one per step, each as soon as the steps it reads are done)")
        for col in ("task", "after", "status", "asks"):
            tasks.add_column(col, overflow="fold")
        for t in result["tasks"]:
            after = t["after"] if isinstance(t["after"], list) else [t["after"]] if t["after"] else []
            tasks.add_row(t["task"], ", ".join(after), t.get("status", ""), t["asks"])
        out.print(tasks)
    total = f", about {human_size(result['estimated_size'])} to write" if result["estimated_size"] else ""
    out.print(f"{result['steps']} steps: {result['done']} done, {result['to_do']} to do{total}")


def show_summary(summary: dict[str, Any]) -> None:
    """One row per artifact (or skipped / failed format): status, size, PPL / KLD, where it was published."""
    out = Console(highlight=False, markup=False)
    table = Table(title=f"{Path(summary['recipe']).name}: results")
    for col in ("model", "format", "type", "status", "size", "PPL", "KLD", "repo"):
        table.add_column(col, justify="right" if col in ("size", "PPL", "KLD") else "left", overflow="fold")
    for r in summary["rows"]:
        status = r["status"]
        style = {"ok": "green", "skipped": "yellow"}.get(status, "red")
        text = console.styled(status, style)
        if r.get("note") and status != "ok":
            text.append(f": {r['note']}")
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") is not None else ""
        if r.get("delta_ppl") is not None:
            ppl += f" ({r['delta_ppl']:+.1%})"
        kld = f"{r['kld']:.4f}" if r.get("kld") is not None else ""
        table.add_row(r["model"], r["format"], r["quant"], text, _size(r.get("size")), ppl, kld,
                      r.get("url") or r.get("repo") or "")
    out.print(table)
    if summary.get("nothing_to_do"):
        out.print("nothing to do: everything in the recipe is already done")
