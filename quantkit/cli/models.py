"""`quantkit models`: the known Russian models and their aliases, and the architectures quantkit supports."""

from __future__ import annotations

from rich.table import Table

from quantkit import console
from quantkit.arch import registered
from quantkit.cli.options import JsonOpt, handle_errors
from quantkit.models import KNOWN_MODELS


def _formats(cls: type) -> str:
    """The formats whose backend takes this architecture (each backend's ``supports``; one without it takes all)."""
    from quantkit.backends.base import get_backend, list_backends

    out = []
    for name in list_backends():
        try:
            supports = getattr(get_backend(name), "supports", None)
        except Exception:  # noqa: BLE001 - a backend that cannot load is listed by `quantkit backends`
            continue
        if supports is None or supports(cls) is None:
            out.append(name)
    return ", ".join(out)


@handle_errors
def command(json_output: JsonOpt = False) -> None:
    """List the known models (alias → Hub id, architecture, base/instruct, licence) and the supported architectures."""
    arches = registered()
    rows = [
        {"alias": m.alias, "hub_id": m.hub_id, "architecture": m.architecture, "family": m.family,
         "instruct": m.instruct, "license": m.license, "license_note": m.license_note or None,
         "params_b": m.params_b, "note": m.note}
        for m in KNOWN_MODELS
    ]
    supported = [{"architecture": name, "family": cls.family, "gguf_arch": cls.gguf_arch.lower(),
                  "formats": _formats(cls).split(", ")} for name, cls in arches.items()]
    if json_output:  # a list of models (each with its architecture's formats), as before
        for row in rows:
            cls = arches.get(row["architecture"])
            row["formats"] = _formats(cls).split(", ") if cls else []
        console.emit_json(rows)
        return
    table = Table(title="Known models (use the alias, the Hub id, or a local folder)")
    for col in ("alias", "Hub id", "architecture", "kind", "params", "licence"):
        table.add_column(col)
    for m in KNOWN_MODELS:
        licence = m.license + (" (restricted, see below)" if m.license_note else "")
        table.add_row(m.alias, m.hub_id or "(built locally)", m.architecture, "instruct" if m.instruct else "base",
                      f"{m.params_b:g}B" if m.params_b >= 0.1 else "tiny", licence)
    out = console.table_console()
    out.print(table)
    notes = {m.license_note for m in KNOWN_MODELS if m.license_note}
    for note in sorted(notes):
        who = ", ".join(m.alias for m in KNOWN_MODELS if m.license_note == note)
        out.print(f"licence: {who}: {note}")
    arch_table = Table(title="Supported architectures (any checkpoint of these converts, known or not)")
    for col in ("architecture", "family", "GGUF arch", "formats"):
        arch_table.add_column(col)
    for item in supported:
        arch_table.add_row(item["architecture"], item["family"], item["gguf_arch"], ", ".join(item["formats"]))
    out.print(arch_table)
