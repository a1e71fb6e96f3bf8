"""Planning: a `Job` → its typed `Step`s, without running, downloading or writing anything.

A model that is here (a local folder, the Hub cache, the built demo) is planned by its backends against its
workspace, so each step says whether it is done. A model that is not here is planned from its known parameter
count (`ESTIMATED`). Workspaces are opened read-only and weight hashes are not cached: a plan changes nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.models import DEMO_ALIAS, find_known
from quantkit.pipeline.job import FormatJob, Job, Resources, Step

ESTIMATED = "estimated from known parameter count"
_PRODUCERS = ("resolve", "calibrate", "convert", "imatrix", "measure")  # steps whose outputs later steps read
_KIND_BY_TITLE = (("convert", "convert"), ("imatrix", "imatrix"), ("measure", "measure"),
                  ("calibration", "calibrate"), ("quantize → best mix", "target"), ("quantize", "quantize"))


def default_name(spec: str) -> str:
    """The name `resolve` gives a source, without resolving it."""
    if spec == DEMO_ALIAS:
        return "quantkit-demo-ru"
    known = find_known(spec)
    local = Path(spec).expanduser()
    if local.exists():
        return local.resolve().name
    if known is not None:
        return known.alias
    return spec.rstrip("/").split("/")[-1]


def demo_ready() -> bool:
    """Whether the demo model is built already (resolving it would build it, which a plan must not do)."""
    from quantkit.demo import demo_folder

    return (demo_folder() / "config.json").exists()


def resolve_for_plan(spec: str) -> tuple[Any, str | None]:
    """The checkpoint when it is here (local folder, Hub cache, built demo), else None and why not."""
    from quantkit.source import resolve

    if spec == DEMO_ALIAS and not demo_ready():
        return None, "the demo model is built on the first run"
    try:
        return resolve(spec, allow_download=False), None
    except QuantkitError as exc:
        if "not in the cache" in exc.message or "unreachable" in exc.message:
            return None, "not in the local Hub cache: downloaded on the first run"
        return None, exc.message


def kind_of(step: dict[str, Any]) -> str:
    """A backend's plan row → its step kind (a backend may say it with ``kind``)."""
    if step.get("kind"):
        return str(step["kind"])
    title = str(step.get("step", "")).lower()
    return next((kind for prefix, kind in _KIND_BY_TITLE if title.startswith(prefix)), "quantize")


def resources_for(backend: Any, kind: str) -> Resources:
    """What a step of `backend` asks for: its ``resources`` mapping (kind or ``"*"`` → cpus/gpus/memory)."""
    table = getattr(backend, "resources", None) or {}
    spec = table.get(kind, table.get("*"))
    return Resources(**spec) if spec else Resources()


def step_key(model: str, fmt: str | None, kind: str, output: str | None) -> str:
    return "/".join([model, fmt or "-", kind, *([output.rstrip("/")] if output else [])])


class _Chain:
    """Builds a model's steps in order, wiring each step's inputs to the producers before it."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.steps: list[Step] = []

    def add(self, kind: str, fmt: str | None, title: str, *, outputs: tuple[str, ...] = (), size: int | None = None,
            done: bool | None = False, status: str | None = None, resources: Resources | None = None,
            repo: str | None = None, inputs: tuple[str, ...] | None = None, extra: dict[str, Any] | None = None
            ) -> Step:
        if inputs is None:
            inputs = tuple(s.key for s in self.steps if s.kind in _PRODUCERS and s.format in (None, fmt))
        key = step_key(self.model, fmt, kind, outputs[0] if outputs and fmt else None)
        n = sum(s.key == key or s.key.startswith(key + "#") for s in self.steps)
        step = Step(key=key if n == 0 else f"{key}#{n}", kind=kind, model=self.model, format=fmt, title=title,
                    outputs=outputs, inputs=inputs, estimated_size=size, done=done,
                    status=status or ("done" if done else "to do"), resources=resources or Resources(), repo=repo,
                    extra=tuple(sorted((extra or {}).items())))
        self.steps.append(step)
        return step


def plan_job(job: Job, *, resolve_models: bool = True, check: bool = True) -> dict[str, Any]:
    """What running `job` would do: the model's steps (typed, as `Step`), per format whether it can run here and
    the error its run would stop with. With ``resolve_models=False`` nothing is looked up (for `validate`)."""
    from quantkit.fingerprint import reading_only

    with reading_only():
        return _plan_job(job, resolve_models=resolve_models, check=check)


def _plan_job(job: Job, *, resolve_models: bool, check: bool) -> dict[str, Any]:
    from quantkit.backends.base import JobContext
    from quantkit.workspace import Workspace

    s = job.settings
    ckpt, why = resolve_for_plan(job.source) if resolve_models else (None, "not resolved")
    name = job.name or (ckpt.name if ckpt is not None else default_name(job.source))
    known = find_known(job.source)
    n_params = ckpt.n_params if ckpt is not None else (round(known.params_b * 1e9) if known else None)
    note = None
    if ckpt is None and resolve_models:
        note = f"{why}; sizes {ESTIMATED} ({known.params_b:g} B)" if known else f"{why}; sizes unknown"
    here = ckpt is not None
    chain = _Chain(name)
    if here:
        chain.add("resolve", None, f"resolve {job.source}", outputs=(str(ckpt.path),), done=True)
    elif job.source == DEMO_ALIAS:
        from quantkit.demo import demo_folder

        chain.add("resolve", None, "build the demo model", outputs=(str(demo_folder()),))
    else:
        hub_id = known.hub_id if known else job.source
        chain.add("resolve", None, f"download {hub_id}", outputs=(hub_id,),
                  size=2 * n_params if n_params else None)
    ws = Workspace(job.workspace_for(name), read_only=True) if here else None
    ctx = None
    if here:
        ckpt.name = name
        from quantkit.workspace import record_model

        record_model(ws, ckpt)  # in memory only: the workspace is read-only
        ctx = JobContext(checkpoint=ckpt, workspace=ws, calibration=s.calibration, calib_samples=s.calib_samples,
                         calib_seq_len=s.calib_seq_len, seed=s.seed, threads=s.threads,
                         evaluation=(s.eval, s.ctx) if s.eval else None, command=job.command)
    calibrate = chain.add("calibrate", None, f"calibrate: {s.calibration} → {s.calib_samples}×{s.calib_seq_len} "
                          "token rows" + (" (chat template)" if here and ckpt.instruct else ""), done=None)
    formats = []
    for fj in job.formats:
        formats.append(_plan_format(chain, job, fj, ctx, ws, n_params, name, check=check))
    runnable = [st for st in chain.steps if st.format and st.status not in ("skip", "fails", "fails: required")]
    cal_done = here and bool(runnable) and all(st.done for st in runnable)
    chain.steps[chain.steps.index(calibrate)] = replace(calibrate, done=cal_done,
                                                         status="done" if cal_done else "to do")
    return {"model": name, "source": job.source,
            "workspace": str(job.workspace_for(name).resolve()), "resolved": here, "estimated": not here,
            "params": n_params, "note": note, "formats": formats, "steps": chain.steps}


def _plan_format(chain: _Chain, job: Job, fj: FormatJob, ctx: Any, ws: Any, n_params: int | None, name: str, *,
                 check: bool) -> dict[str, Any]:
    """Add one format's steps to `chain`; return whether it can run here and the error its run would stop with."""
    from quantkit.pipeline.run import publish_fingerprint, publish_step_key, refusal

    s = job.settings
    reason = problem = None
    backend = None
    if check:
        from quantkit.source import architecture_of

        backend, reason, _ = refusal(fj.format, architecture_of(job.source))
    status = None if reason is None else ("fails: required" if fj.required else "skip")
    rows: list[dict[str, Any]] = []
    for opts in fj.options:
        planned = None
        if ctx is not None and backend is not None:
            try:
                planned = backend.plan(ctx, opts)
            except ImportError:
                planned = None  # the backend's packages are missing here: plan from the parameter count
            except QuantkitError as exc:
                problem = str(exc)
            else:
                for r in planned:  # a step is done only while its output exists
                    out = r.get("output")
                    if r.get("done") and out and not Path(out).is_absolute() and not (ws.root / out).exists():
                        r["done"] = False
        rows += planned if planned is not None else estimated_steps(backend, fj.format, opts, n_params, s, name)
    if problem is not None:
        status = "fails"
    made = []
    for r in rows:
        kind = kind_of(r)
        extra = {k: v for k, v in r.items() if k not in ("step", "output", "estimated_size", "done", "kind")}
        made.append(chain.add(kind, fj.format, str(r.get("step", "")),
                              outputs=(str(r["output"]),) if r.get("output") else (),
                              size=r.get("estimated_size"), done=bool(r.get("done")), status=status,
                              resources=resources_for(backend, kind), extra=extra))
    backend_done = bool(made) and all(st.done for st in made)
    evaluate = None
    if s.eval:
        evaluate = chain.add("evaluate", fj.format, f"evaluate on {s.eval} (ctx {s.ctx}); {s.gate_text()}",
                             outputs=("manifest.json",), inputs=tuple(st.key for st in made),
                             done=backend_done and ws is not None and _evaluated(ws, made), status=status)
    repo = None
    if s.publish:
        from quantkit.card import default_repo_name

        repo = fj.repo or (default_repo_name(ws, fj.format) if ws is not None else f"{name}-{fj.format.upper()}")
        shown = repo if "/" in repo else f"<your-username>/{repo}"
        done = backend_done and ws is not None and ws.is_done(
            publish_step_key(fj.format), publish_fingerprint(ws, fj.format, repo, s.private))
        chain.add("publish", fj.format, "publish" + (" (private)" if s.private else ""), repo=shown,
                  inputs=(evaluate.key,) if evaluate else tuple(st.key for st in made), done=done, status=status)
    out = {"format": fj.format, "can_run": reason is None, "reason": reason, "required": fj.required,
           "problem": problem, "repo": repo}
    if s.publish and ws is not None:
        out["publish"] = _publish_plan(ws, fj, s, rows)
    return out


def _publish_plan(ws: Any, fj: FormatJob, s: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What publishing would upload where (existing and planned files), or why it cannot be planned yet."""
    from quantkit.publish import plan_publish

    try:
        return plan_publish(ws, fj.format, repo=fj.repo, private=s.private, planned=rows, force=s.force)
    except QuantkitError as exc:
        return {"repo": fj.repo, "note": exc.message}


def _evaluated(ws: Any, steps: list[Step]) -> bool:
    keys = [st.outputs[0].rstrip("/") for st in steps if st.outputs]
    arts = [ws.artifacts.get(k) for k in keys if k in ws.artifacts]
    return bool(arts) and all("eval" in a for a in arts)


def estimated_steps(backend: Any, fmt: str, options: Any, n_params: int | None, settings: Any,
                    model: str) -> list[dict[str, Any]]:
    """A format's steps without a checkpoint: named as its backend plans them, sizes from `n_params`."""
    if backend is None:
        from quantkit.backends.base import get_backend

        try:
            backend = get_backend(fmt)
        except Exception:  # noqa: BLE001 - a backend that cannot load is planned generically
            backend = None
    hook = getattr(backend, "estimate_steps", None)
    if hook is not None:
        calib = {"calibration": settings.calibration, "calib_samples": settings.calib_samples,
                 "calib_seq_len": settings.calib_seq_len}
        rows = hook(options, n_params, calib, model)
    else:
        rows = [{"step": f"{fmt} quantization", "output": f"{fmt}/", "estimated_size": None}]
    return [{**r, "done": False} for r in rows]
