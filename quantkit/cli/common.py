"""What every format command shares: resolve the model, run the backend, evaluate, publish, summarise."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.table import Table

from quantkit import console
from quantkit.backends.base import Artifact, JobContext, get_backend
from quantkit.errors import GateFailed, QuantkitError
from quantkit.fingerprint import reading_only
from quantkit.models import DEMO_ALIAS
from quantkit.source import architecture_of, resolve
from quantkit.threads import set_threads
from quantkit.workspace import Workspace, human_size, record_model


def run_format(
    backend_name: str,
    model: str,
    options: BaseModel,
    *,
    calibration: str,
    calib_samples: int,
    calib_seq_len: int,
    workspace: Path | None,
    json_output: bool,
    evaluate: bool = False,
    push: bool = False,
    repo: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    force: bool = False,
    threads: int = 0,
    eval_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of `quantkit gguf|gptq|exl2 ...`: returns (and prints) the summary."""
    from quantkit.calibration import check as check_calibration
    from quantkit.scan import public_command

    backend = get_backend(backend_name)
    check_calibration(calibration)  # a bad file is refused now, not after conversion and the imatrix
    require = getattr(backend, "supports", None)  # an engine that cannot run the architecture: no download
    known_arch = architecture_of(model)  # an alias or a local folder: the refusal is the same on every machine
    if require is not None and known_arch is not None and (unsupported := require(known_arch)):
        raise QuantkitError(unsupported, "quantkit models lists which formats each architecture supports")
    reason = backend.check()
    if reason is not None and not dry_run:  # before the source is resolved: nothing is downloaded for nothing
        raise QuantkitError(reason, f"quantkit {backend_name} --dry-run shows the plan")
    if threads and not dry_run:
        set_threads(threads)
    if dry_run:
        from quantkit.demo import demo_folder

        settings = {"calibration": calibration, "calib_samples": calib_samples, "calib_seq_len": calib_seq_len}
        try:
            if model == DEMO_ALIAS and not (demo_folder() / "config.json").exists():
                raise QuantkitError("the demo model is built on the first run")  # a plan builds nothing
            ckpt = resolve(model, require=require, allow_download=False)  # a plan downloads nothing
        except QuantkitError as exc:
            if "not in the cache" not in exc.message and model != DEMO_ALIAS:
                raise
            summary = estimated_plan(backend_name, model, options, reason=reason, workspace=workspace,
                                     settings=settings)
            show_plan(summary, json_output)
            return summary
    else:
        ckpt = resolve(model, require=require)
    ckpt.tensors  # noqa: B018 - headers and the shard index are checked now, before any work
    ws = Workspace.for_model(ckpt.name, workspace, read_only=dry_run)  # a plan creates and writes nothing
    if not dry_run:
        ws.lock()
    shown = ckpt.hub_id or ckpt.name
    ctx = JobContext(
        checkpoint=ckpt, workspace=ws, calibration=calibration, calib_samples=calib_samples,
        calib_seq_len=calib_seq_len, threads=threads,
        command=public_command(["quantkit", *sys.argv[1:]],
                               {model: shown} if Path(model).expanduser().exists() else {}),
    )
    if dry_run:
        with reading_only():  # not even the weight-hash cache is written
            record_model(ws, ckpt)  # in memory only: the workspace is read-only
            steps = backend.plan(ctx, options)
            summary = {"model": ckpt.name, "format": backend_name, "workspace": str(ws.root), "dry_run": True,
                       "can_run_here": reason is None, "reason": reason, "plan": steps}
            if push:
                from quantkit.publish import plan_publish

                summary["publish"] = plan_publish(ws, backend_name, repo=repo, private=private, planned=steps)
        show_plan(summary, json_output)
        return summary
    record_model(ws, ckpt)
    artifacts: list[Artifact] = backend.run(ctx, options)
    summary: dict[str, Any] = {"model": ckpt.name, "format": backend_name, "workspace": str(ws.root),
                               "artifacts": [a.to_manifest(ws) | {"path": ws.rel(a.path)} for a in artifacts]}
    gate_failed = False
    if evaluate:
        from quantkit.evaluate import evaluate_workspace

        report = evaluate_workspace(ws, only=[a.path for a in artifacts], **(eval_options or {}))
        summary["eval"] = report
        if not report.get("passed", True):
            gate_failed = True
    if push:
        from quantkit.publish import publish_format

        summary["publish"] = publish_format(ws, backend_name, repo=repo, private=private, force=force)
    show_summary(summary, json_output)
    if gate_failed:
        raise GateFailed("one or more artifacts failed the quality gate (see the table above)",
                         "choose a larger type; `quantkit eval` takes other bounds (--max-kld, "
                         "--max-ppl-increase)")
    return summary


def estimated_plan(backend_name: str, model: str, options: BaseModel, *, reason: str | None,
                   workspace: Path | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The plan of a Hub model that is not in the local cache: the download, then the backend's steps named as
    it would name them, with sizes from the known parameter count (an alias) or unknown."""
    from quantkit.demo import demo_folder
    from quantkit.models import find_known
    from quantkit.recipe import ESTIMATED, default_name, estimated_steps

    known = find_known(model)
    n_params = round(known.params_b * 1e9) if known else None
    name = default_name(model)
    hub_id = known.hub_id if known else model
    first = ({"step": "build the demo model", "output": str(demo_folder()), "estimated_size": None, "done": False}
             if model == DEMO_ALIAS else
             {"step": f"download {hub_id}", "output": hub_id, "estimated_size": 2 * n_params if n_params else None,
              "done": False})
    steps = [first, *estimated_steps(backend_name, options, n_params, settings, name)]
    why = ("the demo model is built on the first run" if model == DEMO_ALIAS
           else "not in the local Hub cache: downloaded on the first run")
    note = f"{why}; sizes " + (f"{ESTIMATED} ({known.params_b:g} B)" if known else "unknown")
    return {"model": name, "format": backend_name, "workspace": str(Workspace.for_model(name, workspace,
                                                                                       read_only=True).root),
            "dry_run": True, "estimated": True, "note": note, "can_run_here": reason is None, "reason": reason,
            "plan": steps}


def show_plan(summary: dict[str, Any], json_output: bool) -> None:
    if json_output:
        console.emit_json(summary)
        return
    table = Table(title=f"Plan for {summary['model']} → {summary['format']} (nothing was run)")
    for col in ("step", "output", "estimated size", "status"):
        table.add_column(col)
    for step in summary["plan"]:
        size = step.get("estimated_size")
        table.add_row(str(step.get("step", "")), str(step.get("output", "")),
                      human_size(size) if isinstance(size, int | float) else "",
                      "done" if step.get("done") else "to do")
    out = console.table_console()
    out.print(table)
    if summary.get("note"):
        out.print(summary["note"])
    if not summary["can_run_here"]:
        out.print(f"[yellow]cannot run here:[/] {summary['reason']}")
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
