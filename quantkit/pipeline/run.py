"""Running one job: the single place where check → resolve → calibrate → backend steps → evaluate → card → publish
happens, for `quantkit gguf|gptq|exl2 ...` and for every model of a recipe alike.

Backends that cannot run here (missing engine, no CUDA, an architecture the engine cannot take) are refused before
the source is resolved, so nothing is downloaded for nothing. The workspace lock is held from the first write to
the last; a rerun skips every finished step (the workspace decides, by fingerprint and intact outputs).
"""

from __future__ import annotations

import json
from typing import Any

from quantkit import console
from quantkit.errors import QuantkitError
from quantkit.pipeline.job import FormatJob, FormatResult, Job, JobResult, row
from quantkit.workspace import fingerprint


def refusal(fmt: str, arch: Any = None) -> tuple[Any, str | None, str]:
    """The backend, why it cannot run (None when it can) and what to do about it."""
    from quantkit.backends import base

    try:
        backend = base.get_backend(fmt)
    except getattr(base, "BackendLoadError", ()) as exc:  # a broken plugin: reported, not a crash
        return None, exc.message, exc.hint or f"reinstall the package that provides {fmt}"
    except QuantkitError:
        raise  # an unknown format
    except Exception as exc:  # noqa: BLE001 - a broken plugin is reported as such, not as a crash
        return None, f"cannot load the {fmt} backend: {exc}", f"reinstall the package that provides {fmt}"
    supports = getattr(backend, "supports", None)
    if arch is not None and supports is not None and (why := supports(arch)):
        return backend, why, "quantkit models lists which formats each architecture supports"
    return backend, backend.check(), f"quantkit {fmt} --dry-run shows the plan"


def run_job(job: Job, *, keep_going: bool = False, strict: bool = False) -> JobResult:
    """Run one job. With `strict` (a one-model command) the first error is raised as it is; otherwise each
    format's failure becomes a row and, with `keep_going`, the other formats still run."""
    from quantkit.calibration import check as check_calibration
    from quantkit.lock import holding
    from quantkit.source import architecture_of, resolve
    from quantkit.threads import set_threads
    from quantkit.workspace import Workspace, record_model

    shown_name = job.name or _default_name(job.source)
    out = JobResult(model=shown_name)
    results: dict[str, FormatResult] = {f.format: FormatResult(f.format) for f in job.formats}
    check_calibration(job.settings.calibration)  # a bad file is refused now, not after conversion
    arch = architecture_of(job.source)  # an alias or a local folder: known without a download
    backends: dict[str, tuple[Any, FormatJob]] = {}
    for fj in job.formats:
        backend, reason, hint = refusal(fj.format, arch)
        if reason is None:
            backends[fj.format] = (backend, fj)
            continue
        if strict:
            raise QuantkitError(reason, hint)
        if fj.required:
            msg = f"required by the recipe but cannot run here: {reason}"
            console.console.print(f"[red]{shown_name} {fj.format} failed:[/] {msg}", highlight=False)
            results[fj.format].rows = [row(shown_name, fj.format, status="failed", note=msg)]
            out.failed = True
        else:
            console.warn(f"{shown_name}: skipping {fj.format}: {reason}")
            results[fj.format].rows = [row(shown_name, fj.format, status="skipped", note=reason)]

    def finish() -> JobResult:
        for fmt, res in results.items():
            if not res.rows:
                res.rows = [row(out.model, fmt, status="not run", note="an earlier step failed")]
        out.formats = list(results.values())
        return out

    if not backends or (out.failed and not keep_going):
        return finish()
    set_threads(job.settings.threads)  # torch, llama.cpp and the child processes
    try:
        ckpt = resolve(job.source, require=_requirement(backends))
        ckpt.tensors  # noqa: B018 - headers and the shard index are checked now, before any work
    except QuantkitError as exc:
        if strict:
            raise
        console.console.print(f"[red]{shown_name}: cannot resolve {job.source}:[/] {exc}", highlight=False)
        for fmt in backends:
            results[fmt].rows = [row(shown_name, fmt, status="failed", note=f"resolve: {exc}")]
        out.failed = True
        return finish()
    if job.name:
        ckpt.name = job.name
    out.model = ckpt.name
    ws = Workspace(job.workspace_for(ckpt.name))
    out.workspace = str(ws.root)
    with holding(ws.root, clean=True):  # one writer: another run on this workspace makes this refuse
        before = _steps_snapshot(ws)
        record_model(ws, ckpt)
        from quantkit.backends.base import JobContext

        s = job.settings
        ctx = JobContext(checkpoint=ckpt, workspace=ws, calibration=s.calibration, calib_samples=s.calib_samples,
                         calib_seq_len=s.calib_seq_len, seed=s.seed, threads=s.threads,
                         evaluation=(s.eval, s.ctx) if s.eval else None, command=job.command)
        for fmt, (backend, fj) in backends.items():
            if out.failed and not keep_going:
                break
            try:
                run_format(job, fj, backend, ctx, results[fmt])
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one format's failure is reported, the rest may go on
                if strict:
                    raise
                msg = str(exc) if isinstance(exc, QuantkitError) else f"{type(exc).__name__}: {exc}"
                console.console.print(f"[red]{out.model} {fmt} failed:[/] {msg}", highlight=False)
                results[fmt].rows = [row(out.model, fmt, status="failed",
                                         note=msg.splitlines()[0][:300] if msg else "")]
                results[fmt].error = exc
                out.failed = True
        out.work = out.work or _steps_snapshot(ws) != before
    return finish()


def _requirement(backends: dict[str, tuple[Any, FormatJob]]) -> Any:
    """An architecture check for `resolve`: the first format that cannot take the checkpoint refuses it."""
    checks = [b.supports for b, _ in backends.values() if getattr(b, "supports", None)]
    if not checks:
        return None

    def require(arch: Any) -> str | None:
        return next((why for check in checks if (why := check(arch))), None)

    return require


def run_format(job: Job, fj: FormatJob, backend: Any, ctx: Any, res: FormatResult) -> None:
    """One format of one model: backend steps, evaluation and gate, publishing; fills `res`."""
    ws, name, s = ctx.workspace, ctx.checkpoint.name, job.settings
    artifacts = []
    for opts in fj.options:
        console.info(f"{name}: {fj.format} {_describe(opts)}")
        artifacts += backend.run(ctx, opts)
    res.artifacts = [a.to_manifest(ws) | {"path": ws.rel(a.path)} for a in artifacts]
    rows = {ws.rel(a.path): row(name, fj.format, quant=a.quant, status="ok", size=a.size, bpw=a.bpw,
                                artifact=ws.rel(a.path)) for a in artifacts}
    res.rows = list(rows.values())
    if s.eval:
        from quantkit.evaluate import evaluate_workspace

        report = evaluate_workspace(ws, only=[a.path for a in artifacts], eval_spec=s.eval, n_ctx=s.ctx,
                                    chunks=s.chunks, max_ppl_increase=s.max_ppl_increase, max_kld=s.max_kld,
                                    drift=drift_settings(s.drift, s.max_drift))
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
        _reload(ws)
    if s.publish:
        res.publish = publish(job, fj, ws, res.rows)


def drift_settings(enabled: bool, max_drift: float) -> Any:
    """The drift check's settings (built-in prompts and defaults), or None when it is off."""
    if not enabled:
        return None
    from quantkit.generate import DriftSettings

    return DriftSettings(max_drift=max_drift)


def publish_fingerprint(ws: Any, fmt: str, repo: str, private: bool) -> str:
    """What publishing `fmt` depends on: the repo, its visibility, and each artifact's size, fingerprint and gate.
    The run skips publishing, and the plan says it is done, only while this is unchanged."""
    state = sorted((k, e.get("size"), e.get("fingerprint"), (e.get("gate") or {}).get("passed"))
                   for k, e in ws.artifacts.items() if e.get("format") == fmt)
    return fingerprint("publish", repo, private, state)


def publish_step_key(fmt: str) -> str:
    return f"publish.{fmt}"


def publish(job: Job, fj: FormatJob, ws: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Publish one format unless the same artifacts went to the same repo already; gate failures stay home
    (unless the job forces them)."""
    from quantkit.publish import publish_format

    s = job.settings
    passing = [r for r in rows if s.force or r["status"] != "failed gate"]
    for r in rows:
        if r not in passing:
            r["repo"] = "not published (failed the gate)"
    if not passing:
        console.warn(f"{fj.format}: every artifact failed the quality gate; nothing is published")
        return {"published": False, "reason": "every artifact failed the quality gate"}
    target = fj.repo or _default_repo(ws, fj.format)
    fp = publish_fingerprint(ws, fj.format, target, s.private)
    step = publish_step_key(fj.format)
    if ws.is_done(step, fp):
        info = ws.step_info(step)
        console.info(f"[dim]skip[/] publishing {fj.format}: already on {info.get('url')}")
        for r in passing:
            r.update(repo=info.get("repo"), url=info.get("url"))
        return {"repo": info.get("repo"), "url": info.get("url"), "skipped": "already published"}
    result = publish_format(ws, fj.format, repo=fj.repo, private=s.private, force=s.force)
    _reload(ws)
    refused = {x.get("artifact") for x in result.get("refused", [])}
    for r in rows:
        if r["artifact"] in refused:
            r["repo"] = "not published (failed the gate)"
            if r["status"] == "ok":
                r["status"] = "failed gate"
        elif r in passing:
            r.update(repo=result.get("repo"), url=result.get("url"))
    for ref in result.get("refused", []):
        console.warn(f"not published: {ref.get('quant')} failed the quality gate "
                     f"({', '.join(ref.get('reasons') or []) or 'see the eval table'})")
    ws.record_step(step, fp, [], repo=result.get("repo"), url=result.get("url"))
    return result


def _default_repo(ws: Any, fmt: str) -> str:
    """The repo name publishing picks when none is given (the token's user is added by the Hub client)."""
    from quantkit.card import default_repo_name

    return default_repo_name(ws, fmt)


def _default_name(spec: str) -> str:
    from quantkit.pipeline.plan import default_name

    return default_name(spec)


def _describe(opts: Any) -> str:
    data = opts.model_dump(exclude_defaults=True)
    return ", ".join(f"{k}={v}" for k, v in data.items()) or "defaults"


def _reload(ws: Any) -> None:
    """Re-read the manifest (another module may have written it through its own Workspace)."""
    from quantkit.workspace import Workspace

    ws.data = Workspace(ws.root).data


def _steps_snapshot(ws: Any) -> str:
    from quantkit.workspace import Workspace

    fresh = Workspace(ws.root)
    return json.dumps({k: (v.get("fingerprint"), v.get("finished")) for k, v in fresh.steps.items()
                       if not k.startswith(("recipe.", "publish."))}, sort_keys=True)
