"""`quantkit recipe validate FILE`: check a recipe without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from quantkit import console
from quantkit.cli.options import JsonOpt, handle_errors

app = typer.Typer(help="Work with recipes (see recipes/ for examples).", no_args_is_help=True)


@app.command("validate")
@handle_errors
def validate(
    file: Annotated[Path, typer.Argument(help="The recipe (YAML).")],
    json_output: JsonOpt = False,
) -> None:
    """Check a recipe's keys, types and sources; print "ok: N models, M steps" or each problem with its line."""
    from quantkit.recipe import RecipeError, count_steps, load_recipe

    try:
        recipe = load_recipe(file)
    except RecipeError as exc:
        if json_output:
            console.emit_json({"ok": False, "problems": [vars(p) for p in exc.problems]})
        else:
            for p in exc.problems:
                console.error(str(p))
        raise typer.Exit(exc.exit_code) from None
    n_models, n_steps = len(recipe.models), count_steps(recipe)
    if json_output:
        console.emit_json({"ok": True, "models": n_models, "steps": n_steps})
    else:
        print(f"ok: {n_models} models, {n_steps} steps")
