"""`quantkit calib show [SPEC] [--model M]`: what a calibration set holds and what it yields for a model."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from quantkit import console
from quantkit.calibration import DEFAULT_CALIBRATION, DEFAULT_SEQ_LEN, load, summary
from quantkit.cli.options import JsonOpt, QuietOpt, handle_errors, setup_output

app = typer.Typer(help="Inspect calibration data.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Inspect calibration data."""


@app.command("show")
@handle_errors
def show(
    spec: Annotated[str, typer.Argument(help="builtin:ru-mix, builtin:ru-eval, a file, or hf:DATASET[:SPLIT[:COL]]")]
    = DEFAULT_CALIBRATION,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Count tokens with this model's tokenizer.")]
    = None,
    seq_len: Annotated[int, typer.Option("--calib-seq-len", help="Row length for the rows count.")] = DEFAULT_SEQ_LEN,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Characters, Cyrillic share, domains, and tokens / rows for a model's tokenizer."""
    setup_output(quiet, json_output)
    data = load(spec)
    tok = None
    chat = False
    if model:
        from transformers import AutoTokenizer

        from quantkit.source import resolve

        ckpt = resolve(model)
        tok = AutoTokenizer.from_pretrained(ckpt.path)
        chat = ckpt.instruct
    info = summary(data, tok, chat=chat, seq_len=seq_len)
    if model:
        info["model"] = model
    if json_output:
        console.emit_json(info)
        return
    out = console.table_console()
    out.print(f"{info['spec']}: {info['documents']} documents ({info['dialogues']} dialogues), "
              f"{info['characters']:,} characters, {info['bytes']:,} bytes, {info['cyrillic_share']:.1%} Cyrillic")
    table = Table(title="domains")
    table.add_column("domain")
    table.add_column("documents", justify="right")
    table.add_column("characters", justify="right")
    table.add_column("share", justify="right")
    for name, d in info["domains"].items():
        table.add_row(name, str(d["documents"]), f"{d['characters']:,}", f"{d['characters'] / info['characters']:.1%}")
    out.print(table)
    if "tokens" in info:
        template = "chat template applied to dialogues" if info["chat_template_applied"] else "plain text"
        out.print(f"{model}: {info['tokens']:,} tokens ({template}) → {info['rows']} rows of {seq_len}")
