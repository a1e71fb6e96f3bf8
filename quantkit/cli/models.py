"""`quantkit models`: the known Russian models and their aliases."""

from __future__ import annotations

from rich.table import Table

from quantkit import console
from quantkit.cli.options import JsonOpt, handle_errors
from quantkit.models import KNOWN_MODELS


@handle_errors
def command(json_output: JsonOpt = False) -> None:
    """List the known models (alias → Hub id, architecture, base/instruct, licence)."""
    rows = [
        {"alias": m.alias, "hub_id": m.hub_id, "architecture": m.architecture, "instruct": m.instruct,
         "license": m.license, "params_b": m.params_b, "note": m.note}
        for m in KNOWN_MODELS
    ]
    if json_output:
        console.emit_json(rows)
        return
    table = Table(title="Known models (use the alias, the Hub id, or a local folder)")
    for col in ("alias", "Hub id", "architecture", "kind", "params", "licence"):
        table.add_column(col)
    for m in KNOWN_MODELS:
        table.add_row(m.alias, m.hub_id, m.architecture, "instruct" if m.instruct else "base",
                      f"{m.params_b:g}B", m.license)
    table.add_row("demo", "(built locally)", "LlamaForCausalLM", "base", "tiny", "apache-2.0")
    console.table_console().print(table)
