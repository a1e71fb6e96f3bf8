"""`quantkit card`: write the model card of a format's folder without publishing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantkit import console
from quantkit.card import artifacts_for, write_card
from quantkit.cli.options import JsonOpt, QuietOpt, handle_errors, setup_output
from quantkit.publish import resolve_target

FormatOpt = Annotated[str | None, typer.Option(
    "--format", "-f", help="The format (gguf, exl2, gptq or a plugin's) when given a workspace.")]
OutputOpt = Annotated[Path | None, typer.Option(
    "--output", "-o", help="Where to write (default <ws>/<format>/README.md).")]
CardRepoOpt = Annotated[str | None, typer.Option("--repo", help="Hub repo named in links and usage snippets.")]


@handle_errors
def command(
    path: Annotated[Path, typer.Argument(help="A workspace, or its format folder (quants/T-lite-0.1/gguf).")],
    fmt: FormatOpt = None,
    output: OutputOpt = None,
    repo: CardRepoOpt = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write the model card (README.md) for one format of a workspace, without publishing."""
    setup_output(quiet, json_output)
    from quantkit.lock import holding

    ws, fmt = resolve_target(path, fmt)
    with holding(ws.root):  # a run adding files to the workspace makes this wait for it (refuse) instead
        ws.data = type(ws)(ws.root).data  # what is recorded now that the lock is held
        written = write_card(ws, fmt, repo=repo, output=output)
        arts = [key for key, _ in artifacts_for(ws, fmt)]
    if json_output:
        console.emit_json({"path": str(written), "format": fmt, "workspace": str(ws.root), "artifacts": arts})
        return
    console.console.print(f"wrote the {fmt} model card for {len(arts)} file(s) to {written}", highlight=False,
                          markup=False)
