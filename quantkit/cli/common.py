"""What every format command shares: its flags become a one-model job of the pipeline; plan or run it, summarise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.table import Table

from quantkit import console
from quantkit.errors import GateFailed, QuantkitError
from quantkit.pipeline import FormatJob, Job, LocalExecutor, Settings, plan_job
from quantkit.workspace import human_size


def format_job(backend_name: str, model: str, options: BaseModel, *, calibration: str, calib_samples: int,
               calib_seq_len: int, workspace: Path | None, evaluate: bool = False, push: bool = False,
               repo: str | None = None, private: bool = False, force: bool = False, threads: int = 0) -> Job:
    """A format command's flags as a one-model job."""
    from quantkit.calibration import DEFAULT_EVAL
    from quantkit.hubname import HUB_ID, REPO_NAME
    from quantkit.scan import public_command

    if repo is not None and not (HUB_ID.match(repo) or REPO_NAME.match(repo)):  # refused before any work
        raise QuantkitError(f"--repo '{repo}' is not a Hub repo id",
                            "use NAMESPACE/NAME or NAME (letters, digits, '.', '-', '_'), e.g. me/T-lite-0.1-GGUF")
    shown = {}
    if Path(model).expanduser().exists():  # a local path is not shown in the card; its folder name is
        shown = {model: Path(model).expanduser().resolve().name}
    settings = Settings(calibration=calibration, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
                        threads=threads, eval=DEFAULT_EVAL if evaluate else None, publish=push, private=private,
                        force=force)
    return Job(source=model, formats=(FormatJob(backend_name, (options,), required=True, repo=repo),),
               settings=settings, workspace=workspace,
               command=public_command(["quantkit", *sys.argv[1:]], shown), label=f"quantkit {backend_name}")


def run_format(backend_name: str, model: str, options: BaseModel, *, json_output: bool, dry_run: bool = False,
               **flags: Any) -> dict[str, Any]:
    """The body of `quantkit gguf|gptq|exl2 ...`: a one-model job, planned or run by the local executor like any
    recipe; returns (and prints) the summary."""
    job = format_job(backend_name, model, options, **flags)
    if dry_run:
        summary = plan_format(job)
        show_plan(summary, json_output)
        return summary
    (result,) = LocalExecutor().run([job], strict=True)
    (res,) = result.formats
    summary: dict[str, Any] = {"model": result.model, "format": backend_name, "workspace": result.workspace,
                               "artifacts": res.artifacts}
    if res.eval is not None:
        summary["eval"] = res.eval
    if res.publish is not None:
        summary["publish"] = res.publish
    show_summary(summary, json_output)
    if res.eval is not None and not res.eval.get("passed", True):
        raise GateFailed("one or more artifacts failed the quality gate (see the table above)",
                         "choose a larger type; `quantkit eval` takes other bounds (--max-kld, "
                         "--max-ppl-increase)")
    return summary


def plan_format(job: Job) -> dict[str, Any]:
    """The dry run of a one-model job: the same steps a recipe plans, for one format. An engine that cannot take
    the architecture is refused; one that cannot run on this machine is planned and says why."""
    from quantkit.calibration import check as check_calibration
    from quantkit.pipeline.plan import refusal
    from quantkit.source import architecture_of

    (fj,) = job.formats
    check_calibration(job.settings.calibration)
    _, reason, hint = refusal(fj.format, architecture_of(job.source))
    if reason is not None and hint.startswith("quantkit models"):
        raise QuantkitError(reason, hint)
    planned = plan_job(job)
    (fmt,) = planned["formats"]
    if fmt["problem"]:
        raise QuantkitError(fmt["problem"], f"quantkit {fj.format} --help")
    summary = {"model": planned["model"], "format": fj.format, "workspace": planned["workspace"], "dry_run": True,
               "estimated": planned["estimated"], "note": planned["note"], "can_run_here": reason is None,
               "reason": reason, "plan": [s.to_dict() for s in planned["steps"]]}
    if "publish" in fmt:
        summary["publish"] = fmt["publish"]
    return summary


def show_plan(summary: dict[str, Any], json_output: bool) -> None:
    if json_output:
        console.emit_json(summary)
        return
    table = Table(title=f"Plan for {summary['model']} → {summary['format']} (nothing was run)")
    for col in ("step", "output", "estimated size", "status"):
        table.add_column(col)
    for step in summary["plan"]:
        size = step.get("estimated_size")
        table.add_row(str(step.get("step", "")), str(step.get("output") or ""),
                      human_size(size) if isinstance(size, int | float) else "",
                      step.get("status") or ("done" if step.get("done") else "to do"))
    out = console.table_console()
    out.print(table)
    if summary.get("note"):
        out.print(summary["note"])
    if not summary["can_run_here"]:
        out.print(console.styled("cannot run here:", "yellow"), summary["reason"])
    if summary.get("publish"):
        out.print(f"would publish to {summary['publish'].get('repo')}")


def show_summary(summary: dict[str, Any], json_output: bool) -> None:
    if json_output:
        console.emit_json(summary)
        return
    table = Table(title=f"{summary['model']}: {summary['format']} artifacts in {summary['workspace']}")
    for col in ("file", "type", "size", "bits/weight"):
        table.add_column(col)
    for art in summary["artifacts"]:
        bpw = art.get("bpw")
        table.add_row(art["path"], art["quant"], human_size(art["size"]), f"{bpw:.2f}" if bpw else "")
    console.table_console().print(table)
    if "eval" in summary:
        from quantkit.cli.eval_cmd import show

        show(summary["eval"])
    if "publish" in summary and summary["publish"].get("url"):
        console.table_console().print(f"published: {summary['publish']['url']}")
