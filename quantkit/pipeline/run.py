"""Running one job: check → resolve → plan → execute → results, for `quantkit gguf|gptq|exl2 ...` and for every
model of a recipe alike.

Backends that cannot run here (missing engine, no CUDA, an architecture the engine cannot take) are refused before
the source is resolved, so nothing is downloaded for nothing. The workspace lock is held from the first write to
the last; the plan's steps are run by the executor loop (`quantkit.pipeline.execute`), which skips every finished
step (the workspace decides, by fingerprint and intact outputs). The summary rows are read back from what the
steps recorded, so a run that made everything and a rerun that skipped everything report the same.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quantkit import console
from quantkit.errors import QuantkitError
from quantkit.pipeline.job import FormatJob, FormatResult, Job, JobResult, row
from quantkit.steps import Step


@dataclass
class Opened:
    """A job whose checks passed and whose model is resolved, locked and planned (`plan` None: nothing to run;
    `result` says why); `close` turns its steps' outcomes into the job's result."""

    job: Job
    result: JobResult
    formats: dict[str, FormatResult]
    plan: Any = None

    def finish(self) -> JobResult:
        for fmt, res in self.formats.items():
            if not res.rows:
                res.rows = [row(self.result.model, fmt, status="not run", note="an earlier step failed")]
        self.result.formats = list(self.formats.values())
        return self.result

    def close(self, outcomes: dict[str, Any]) -> JobResult:
        out = self.result
        out.work = any(o.state == "ran" for k, o in outcomes.items() if not k.endswith("/publish"))
        for fplan in self.plan.formats:
            if fplan.problem is None:
                collect(self.plan, fplan, outcomes, self.formats[fplan.format], out)
        return self.finish()


def open_job(job: Job, stack: ExitStack, *, keep_going: bool = False, strict: bool = False) -> Opened:
    """Check the job's formats, resolve its model, take its workspace's lock (held until `stack` closes) and plan
    it. Formats that cannot run here are refused (or, in a recipe, skipped) before anything is downloaded."""
    from quantkit.calibration import check as check_calibration
    from quantkit.lock import holding
    from quantkit.pipeline.plan import default_name, plan_model, refusal
    from quantkit.source import architecture_of, resolve
    from quantkit.threads import set_threads
    from quantkit.workspace import Workspace, record_model

    shown_name = job.name or default_name(job.source)
    opened = Opened(job, JobResult(model=shown_name), {f.format: FormatResult(f.format) for f in job.formats})
    out, results = opened.result, opened.formats
    check_calibration(job.settings.calibration)  # a bad file is refused now, not after conversion
    arch = architecture_of(job.source)  # an alias or a local folder: known without a download
    usable: list[FormatJob] = []
    for fj in job.formats:
        backend, reason, hint = refusal(fj.format, arch)
        if reason is None:
            usable.append(fj)
            continue
        if strict:
            raise QuantkitError(reason, hint)
        if fj.required:
            msg = f"required by the recipe but cannot run here: {reason}"
            console.console.print(f"[red]{console.escape(shown_name)} {fj.format} failed:[/] {console.escape(msg)}",
                                  highlight=False)
            results[fj.format].rows = [row(shown_name, fj.format, status="failed", note=msg)]
            out.failed = True
        else:
            console.warn(console.escape(f"{shown_name}: skipping {fj.format}: {reason}"))
            results[fj.format].rows = [row(shown_name, fj.format, status="skipped", note=reason)]
    if not usable or (out.failed and not keep_going):
        return opened
    set_threads(job.settings.threads)  # torch, llama.cpp and the child processes
    try:
        ckpt = resolve(job.source, require=_requirement(usable))
        ckpt.tensors  # noqa: B018 - headers and the shard index are checked now, before any work
    except QuantkitError as exc:
        if strict:
            raise
        console.console.print(f"[red]{console.escape(shown_name)}: cannot resolve {console.escape(job.source)}:[/] "
                              f"{console.escape(str(exc))}", highlight=False)
        for fj in usable:
            results[fj.format].rows = [row(shown_name, fj.format, status="failed", note=f"resolve: {exc}")]
        out.failed = True
        return opened
    if job.name:
        ckpt.name = job.name
    out.model = ckpt.name
    ws = Workspace(job.workspace_for(ckpt.name))
    out.workspace = str(ws.root)
    stack.enter_context(holding(ws.root, clean=True))  # one writer: another run on this workspace refuses
    record_model(ws, ckpt)
    plan = plan_model(replace(job, formats=tuple(usable)), ckpt, ws, check=False)
    for fplan in plan.formats:
        if fplan.problem is not None:
            if strict:
                raise QuantkitError(fplan.problem, f"quantkit {fplan.format} --help")
            _failed(out, results[fplan.format], fplan.format, QuantkitError(fplan.problem))
    if out.failed and not keep_going:
        return opened
    for fj in usable:
        console.info(console.escape(f"{out.model}: {fj.format} " + "; ".join(_describe(o) for o in fj.options)))
    opened.plan = plan
    return opened


def run_job(job: Job, *, keep_going: bool = False, strict: bool = False) -> JobResult:
    """Run one job here. With `strict` (a one-model command) the first error is raised as it is; otherwise each
    format's failure becomes a row and, with `keep_going`, the other formats still run."""
    from quantkit.pipeline.execute import execute

    with ExitStack() as stack:
        opened = open_job(job, stack, keep_going=keep_going, strict=strict)
        if opened.plan is None:
            return opened.finish()
        return opened.close(execute(opened.plan, keep_going=keep_going, strict=strict))


def collect(plan: Any, fplan: Any, outcomes: dict[str, Any], res: FormatResult, out: JobResult) -> None:
    """A format's result from its steps' outcomes and records: artifact rows, the evaluation, publishing."""
    ws = plan.ctx.workspace
    name, fmt = out.model, fplan.format
    failed = next((outcomes[k] for k in [*_shared_inputs(plan, fplan), *fplan.keys]
                   if k in outcomes and outcomes[k].state == "failed"), None)
    if failed is not None:
        _failed(out, res, fmt, failed.error)
        return
    keys: list[str] = []
    for k in fplan.artifact_keys:
        outcome = outcomes.get(k)
        if outcome is not None and outcome.finished:
            rec = ws.recorded(k)
            keys += [a for a in (rec.artifacts if rec else []) if a in ws.artifacts and a not in keys]
    res.artifacts = [ws.artifacts[k] | {"path": k} for k in keys]
    rows = {k: row(name, fmt, quant=e["quant"], status="ok", size=e.get("size"), bpw=e.get("bpw"), artifact=k)
            for k, e in ((a["path"], a) for a in res.artifacts)}
    res.rows = list(rows.values())
    evaluated = outcomes.get(f"{fmt}/evaluate")
    if evaluated is not None and evaluated.finished:
        report = evaluated.info.get("report") or {}
        res.eval = report
        for r in report.get("rows", []):
            found = rows.get(r.get("artifact"))
            if found is None:
                continue
            if r.get("skipped"):
                found["note"] = f"not evaluated: {r['skipped']}"
                continue
            found.update(ppl=r.get("ppl"), delta_ppl=r.get("delta_ppl"), kld=r.get("kld_mean"))
            if not r.get("passed", True):
                found["status"] = "failed gate"
                found["note"] = "; ".join(r.get("reasons") or [])
    published = outcomes.get(f"{fmt}/publish")
    if published is not None and published.finished:
        info = dict(published.info)
        if published.state == "done":
            console.info(f"skip publishing {fmt}: already on {info.get('url')}")
            info["skipped"] = "already published"
        res.publish = info
        refused = {r.get("artifact") for r in info.get("refused", [])}
        for r in res.rows:
            if r["status"] == "failed gate" and not plan.ctx.settings.force or r["artifact"] in refused:
                r["repo"] = "not published (failed the gate)"
                if r["status"] == "ok":
                    r["status"] = "failed gate"
            elif info.get("published"):
                r.update(repo=info.get("repo"), url=info.get("url"))
    elif published is not None and published.state == "not run" and not res.rows:
        res.rows = [row(name, fmt, status="not run", note="an earlier step failed")]


def _shared_inputs(plan: Any, fplan: Any) -> list[str]:
    """The model's own steps a format's steps read (resolve, calibrate)."""
    mine = set(fplan.keys)
    return [s.key for s in plan.steps if s.format is None and any(s.key in t.inputs for t in plan.steps
                                                                   if t.key in mine)]


def failed_job(job: Job, exc: BaseException) -> JobResult:
    """The result of a job that stopped before its steps: every format failed with the message."""
    name = job.name
    if not name:
        from quantkit.models import default_name

        name = default_name(job.source)
    msg = str(exc) if isinstance(exc, QuantkitError) else f"{type(exc).__name__}: {exc}"
    return JobResult(model=name, failed=True, formats=[
        FormatResult(f.format, rows=[row(name, f.format, status="failed", note=msg.splitlines()[0][:300])],
                     error=exc) for f in job.formats])


def _failed(out: JobResult, res: FormatResult, fmt: str, exc: BaseException | None) -> None:
    msg = (str(exc) if isinstance(exc, QuantkitError) else f"{type(exc).__name__}: {exc}") if exc else "failed"
    console.console.print(f"[red]{console.escape(out.model)} {fmt} failed:[/] {console.escape(msg)}",
                          highlight=False)
    res.rows = [row(out.model, fmt, status="failed", note=msg.splitlines()[0][:300] if msg else "")]
    res.error = exc
    out.failed = True


def _requirement(formats: list[FormatJob]) -> Any:
    """An architecture check for `resolve`: the first format that cannot take the checkpoint refuses it."""
    from quantkit.backends.base import get_backend

    checks = [b.supports for b in (get_backend(f.format) for f in formats) if getattr(b, "supports", None)]
    if not checks:
        return None

    def require(arch: Any) -> str | None:
        return next((why for check in checks if (why := check(arch))), None)

    return require


def _describe(opts: Any) -> str:
    data = opts.model_dump(exclude_defaults=True)
    return ", ".join(f"{k}={v}" for k, v in data.items()) or "defaults"


@dataclass
class Made:
    """An artifact a run made (or found made), as its manifest entry says."""

    key: str  # workspace-relative
    path: Path
    entry: dict[str, Any]

    @property
    def quant(self) -> str:
        return str(self.entry.get("quant"))

    @property
    def size(self) -> int:
        return int(self.entry.get("size") or 0)

    @property
    def bpw(self) -> float | None:
        return self.entry.get("bpw")

    @property
    def info(self) -> dict[str, Any]:
        return self.entry

    @property
    def files(self) -> list[Path]:
        root = self.path.parents[len(Path(self.key).parts) - 1]
        return [root / f for f in self.entry.get("files") or [self.key]]


def plan_for(ctx: Any, fmt: str, *options: Any) -> list[Step]:
    """The steps `make` would run for these options (status and fingerprints included), without running any."""
    from quantkit.pipeline.plan import plan_model

    return plan_model(_job_of(ctx, fmt, options), ctx.checkpoint, ctx.workspace).steps


def _job_of(ctx: Any, fmt: str, options: tuple[Any, ...]) -> Job:
    ckpt, ws = ctx.checkpoint, ctx.workspace
    return Job(source=str(ckpt.path), formats=(FormatJob(fmt, tuple(options)),), settings=ctx.settings,
               name=ckpt.name, workspace=ws.root, command=ctx.command)


def make(ctx: Any, fmt: str, *options: Any, keep_going: bool = False,
         only: Collection[str] | None = None) -> list[Made]:
    """Make one format's artifacts of `ctx.checkpoint` in `ctx.workspace` through the pipeline (plan, execute,
    record), from Python: what `quantkit <fmt>` does without the command line (`only`: just these steps). Returns
    the artifacts in plan order; the first failure is raised."""
    from quantkit.lock import holding
    from quantkit.pipeline.execute import execute
    from quantkit.pipeline.plan import plan_model
    from quantkit.workspace import record_model

    ckpt, ws = ctx.checkpoint, ctx.workspace
    job = _job_of(ctx, fmt, options)
    with holding(ws.root, clean=True):
        record_model(ws, ckpt)
        plan = plan_model(job, ckpt, ws)
        (fplan,) = plan.formats
        if fplan.reason is not None:
            raise QuantkitError(fplan.reason, fplan.hint or None)
        if fplan.problem is not None:
            raise QuantkitError(fplan.problem)
        outcomes = execute(plan, keep_going=keep_going, strict=True, only=only)
    out: list[Made] = []
    for key in fplan.artifact_keys:
        rec = ws.recorded(key) if outcomes.get(key) and outcomes[key].finished else None
        for art in rec.artifacts if rec else []:
            out.append(Made(art, ws.abs(art), dict(ws.artifacts[art])))
    return out
