"""`quantkit backends`: every backend and whether it can run here (a plugin that cannot load says why)."""

from __future__ import annotations

from rich.table import Table

from quantkit import console
from quantkit.backends.base import describe_backends
from quantkit.cli.options import JsonOpt, handle_errors


@handle_errors
def command(json_output: JsonOpt = False) -> None:
    """List the backends and whether each can run on this machine (and why not)."""
    rows = describe_backends()
    if json_output:
        console.emit_json(rows)
        return
    table = Table(title="Backends")
    for col in ("backend", "format", "runs here", "why not"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["description"], "yes" if r["available"] else "no", r["reason"] or "")
    console.table_console().print(table)
