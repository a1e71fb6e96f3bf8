"""`quantkit push`: publish one format of a workspace to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from quantkit import console
from quantkit.cli.options import (
    DryRunOpt,
    ForceOpt,
    JsonOpt,
    PrivateOpt,
    QuietOpt,
    RepoOpt,
    handle_errors,
    setup_output,
)
from quantkit.publish import publish_format, resolve_target
from quantkit.workspace import human_size

FormatOpt = Annotated[str | None, typer.Option(
    "--format", "-f", help="The format (gguf, exl2, gptq or a plugin's) when given a workspace.")]


@handle_errors
def command(
    path: Annotated[Path, typer.Argument(help="The format folder (quants/T-lite-0.1/gguf), or a workspace.")],
    repo: RepoOpt = None,
    fmt: FormatOpt = None,
    private: PrivateOpt = False,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Publish a format folder to the Hub: card, files, EXL2 bitrates as branches; reruns send only what is missing."""
    setup_output(quiet, json_output)
    ws, fmt = resolve_target(path, fmt)
    result = publish_format(ws, fmt, repo=repo, private=private, force=force, dry_run=dry_run)
    if json_output:
        console.emit_json(result)
    elif not quiet:
        show(result)


def show(result: dict[str, Any]) -> None:
    """A table of what was (or would be) uploaded where."""
    out = Console(highlight=False, markup=False)
    if result.get("dry_run"):
        table = Table(title=f"Would publish to {result['repo']}" + (" (private)" if result["private"] else "")
                      + " — nothing was sent")
        for col in ("branch", "file", "size"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for branch in result["branches"]:
            for f in branch["files"]:
                table.add_row(branch["name"], f["path"] + (" (planned)" if f.get("planned") else ""),
                              human_size(f["size"]) if f["size"] else "")
        out.print(table)
        out.print(f"total {human_size(result['total_size'])} in {len(result['branches'])} branch(es)")
    else:
        table = Table(title=f"Published to {result['url']}")
        for col in ("branch", "file", "size", "status"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for f in result["files"]:
            table.add_row(f["branch"], f["path"], human_size(f["size"]), "uploaded")
        for f in result["skipped"]:
            table.add_row(f["branch"], f["path"], human_size(f["size"]), "already there")
        out.print(table)
    verb = "would not publish" if result.get("dry_run") else "not published"
    for r in result.get("refused", []):
        out.print(console.styled(verb, "yellow"), f": {r['quant']} failed the quality gate (--force publishes it)",
                  sep="")
    if result.get("note"):
        out.print(result["note"])
