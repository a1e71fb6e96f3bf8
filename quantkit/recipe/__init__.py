"""Recipes: one YAML file that says which models to quantize into which formats, how to check them, where to publish.

::

    defaults:                       # every key is optional
      calibration: builtin:ru-mix   # or a .txt/.jsonl/.parquet file (relative to the recipe), or hf:DATASET
      calib_samples: 64
      calib_seq_len: 512
      eval: builtin:ru-eval         # false: no evaluation (and no quality gate)
      ctx: 512                      # evaluation context
      gates: {max_ppl_increase: 0.05, max_kld: 0.05}   # with drift: also max_drift: 0.1
      drift: false                  # true: check that greedy answers to Russian prompts stay in Russian
      workspace: quants             # one folder per model under it (relative to the recipe; default ./quants)
      namespace: my-org             # Hub namespace (default: the token's user)
      private: false
      publish: false
    models:
      - source: T-lite-0.1          # alias, Hub id, local folder (relative to the recipe) or demo
        name: T-lite-0.1            # optional: file and workspace name
        gguf: {types: [Q4_K_M, Q8_0], imatrix: true}      # GGUFOptions
        exl2: {bits: [4.0, 6.5], required: false}          # EXL2Options; required: a failed check() is an error
        gptq: [{bits: 4, group_size: 128}]                 # GPTQOptions, one mapping or a list of variants
        publish: {enabled: true, repos: {gguf: T-lite-0.1-GGUF}}

Each format section is validated by that backend's own options model (plus ``required``), so the options are
defined once. `load_recipe` reports every problem with its file and line; `plan` says what would run (with sizes
estimated from the known parameter count when a model cannot be reached); `run_recipe` runs it: backend steps
are fingerprinted in each workspace, so a rerun skips what is finished. Recipes run as jobs through the
pipeline (`quantkit.pipeline`), exactly as `quantkit gguf MODEL` does.
"""

from __future__ import annotations

from typing import Any

from quantkit.errors import QuantkitError
from quantkit.pipeline import (
    ESTIMATED,
    FormatJob,
    Job,
    Settings,
    default_name,
    failure,
    get_executor,
    plan_job,
    summarize,
)
from quantkit.pipeline.actions import drift_settings
from quantkit.recipe.load import load_recipe
from quantkit.recipe.schema import (
    DEFAULT_WORKSPACE,
    Defaults,
    Gates,
    Problem,
    Recipe,
    RecipeError,
    backend_options,
    backend_sections,
    recipe_schema,
)

__all__ = ["DEFAULT_WORKSPACE", "ESTIMATED", "Defaults", "Gates", "Problem", "Recipe", "RecipeError",
           "backend_options", "backend_sections", "count_steps", "default_name", "drift_settings", "failure",
           "jobs", "load_recipe", "plan", "recipe_schema", "run_recipe", "settings"]


def _select(recipe: Recipe, only: list[str] | None, models: list[str] | None) -> list[tuple[Any, list[str]]]:
    """(model entry, formats to make) for the models and formats asked for."""
    wanted = [f.strip().lower() for item in only or [] for f in item.split(",") if f.strip()]
    known = backend_sections()
    for f in wanted:
        if f not in known:
            raise QuantkitError(f"--only {f}: not a format", f"formats: {', '.join(known)}")
    chosen = []
    for entry in recipe.models:
        names = {recipe.model_name(entry).lower(), entry.source.lower(), recipe.source_spec(entry).lower()}
        if models and not any(m.lower() in names for m in models):
            continue
        fmts = [f for f in entry.formats() if not wanted or f in wanted]
        if fmts:
            chosen.append((entry, fmts))
    if models:
        all_names = [recipe.model_name(e) for e in recipe.models]
        missing = [m for m in models if not any(m.lower() in {recipe.model_name(e).lower(), e.source.lower()}
                                                for e in recipe.models)]
        if missing:
            raise QuantkitError(f"--model {missing[0]}: no such model in {recipe.path.name}",
                                f"models: {', '.join(all_names)}")
    if not chosen:
        raise QuantkitError("nothing selected: no model of the recipe makes " + ", ".join(wanted or ["any format"]),
                            "check --only and --model")
    return chosen


def settings(recipe: Recipe, entry: Any) -> Settings:
    """The effective settings of one model of the recipe."""
    st = recipe.settings(entry)
    return Settings(calibration=st["calibration"], calib_samples=st["calib_samples"],
                    calib_seq_len=st["calib_seq_len"], seed=st["seed"], threads=st["threads"], eval=st["eval"],
                    ctx=st["ctx"], chunks=st["chunks"], max_ppl_increase=st["max_ppl_increase"],
                    max_kld=st["max_kld"], drift=st["drift"], max_drift=st["max_drift"], publish=st["publish"],
                    private=st["private"])


def jobs(recipe: Recipe, *, only: list[str] | None = None, models: list[str] | None = None) -> list[Job]:
    """The recipe as jobs: one per selected model, with the selected formats in the recipe's order."""
    out = []
    for entry, fmts in _select(recipe, only, models):
        name = recipe.model_name(entry)
        st = settings(recipe, entry)
        formats = tuple(FormatJob(fmt, tuple(recipe.options(entry, fmt)), required=recipe.required(entry, fmt),
                                  repo=recipe.repo_for(entry, fmt, name) if st.publish else None) for fmt in fmts)
        out.append(Job(source=recipe.source_spec(entry), formats=formats, settings=st, name=entry.name,
                       workspace_root=recipe.workspace_root(), command=f"quantkit run {recipe.path.name}",
                       label=str(recipe.path)))
    return out


def plan(recipe: Recipe, *, only: list[str] | None = None, models: list[str] | None = None,
         resolve_models: bool = True) -> dict[str, Any]:
    """What `run_recipe` would do, without doing anything: per model and format, the steps with their outputs,
    estimated sizes, target repos, resources and whether they are done. Models that cannot be reached offline are
    planned from their known parameter count. With ``resolve_models=False`` nothing is looked up (for `validate`).
    Nothing is written: workspaces are opened read-only, and weight hashes are not cached."""
    out_models = []
    for job in jobs(recipe, only=only, models=models):
        model_plan = plan_job(job, resolve_models=resolve_models, check=resolve_models)
        model_plan["steps"] = [s.to_dict() for s in model_plan["steps"]]
        out_models.append(model_plan)
    all_steps = [s for m in out_models for s in m["steps"]]
    todo = [s for s in all_steps if s["status"] == "to do"]
    return {"recipe": str(recipe.path), "dry_run": True, "models": out_models,
            "steps": len(all_steps), "to_do": len(todo), "done": sum(s["status"] == "done" for s in all_steps),
            "estimated_size": sum(s["estimated_size"] or 0 for s in todo
                                  if s["kind"] in ("resolve", "convert", "quantize", "target")),
            "estimated": any(m["estimated"] for m in out_models)}


def count_steps(recipe: Recipe) -> int:
    """How many steps the recipe has, without looking any model up (for `quantkit recipe validate`)."""
    return plan(recipe, resolve_models=False)["steps"]


def run_recipe(recipe: Recipe, *, only: list[str] | None = None, models: list[str] | None = None,
               continue_on_error: bool = False, executor: str = "local", **executor_options: Any) -> dict[str, Any]:
    """Run every selected model × format through the executor: backend steps (resumable), evaluation with the
    recipe's gates, publishing.

    Returns the summary: one row per artifact (or per skipped / failed format) and whether anything was done.
    A failure stops the run unless `continue_on_error`; gate failures never stop it (they block publishing)."""
    todo = jobs(recipe, only=only, models=models)
    results = get_executor(executor, **executor_options).run(todo, keep_going=continue_on_error)
    return summarize(results, str(recipe.path))
