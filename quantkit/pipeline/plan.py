"""Planning: a `Job` → its `Step`s, exactly the list the executor then runs, without running, downloading or
writing anything.

A model that is here (a local folder, the Hub cache, the built demo) is planned against its workspace, so each step
knows its fingerprint and whether it is done. A model that is not here is planned from its known parameter count
(`ESTIMATED`): the same steps, without fingerprints. Steps come from three places: the model's own (resolve, and
calibrate when a format reads the shared token rows), each format's backend (`Backend.steps`), and per format the
evaluation and publishing that follow it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.models import default_name, find_known
from quantkit.pipeline.job import FormatJob, Job
from quantkit.steps import CALIBRATE, RESOLVE, Resources, Step, StepResult, StepRun, step_key
from quantkit.workspace import fingerprint

ESTIMATED = "estimated from known parameter count"
EVAL_VERSION = 1  # bump when evaluation changes what it records


def resolve_for_plan(spec: str) -> tuple[Any, str | None]:
    """The checkpoint when it is here (local folder, Hub cache, a built model), else None and why not: a Hub model
    not downloaded yet, or a built-in one not built yet. What the run would refuse (an unknown alias, a folder that
    is not there or is no checkpoint) is refused by the plan too, with the run's own error."""
    from quantkit.source import resolve

    known = find_known(spec)
    if known is not None and known.built_here and not (known.folder() / "config.json").exists():
        return None, f"the {known.alias} model is built on the first run"
    try:
        return resolve(spec, allow_download=False), None
    except QuantkitError as exc:
        if "not in the cache" in exc.message or "unreachable" in exc.message:
            return None, "not in the local Hub cache: downloaded on the first run"
        raise


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


def resources_for(backend: Any, kind: str) -> Resources:
    """What a step of `backend` asks for when it does not say: its ``resources`` mapping (kind or ``"*"``)."""
    table = getattr(backend, "resources", None) or {}
    spec = table.get(kind, table.get("*"))
    return Resources(**spec) if spec else Resources()


@dataclass
class FormatPlan:
    """One format of a plan: whether it can run here, the error its run would stop with, and its steps' keys."""

    format: str
    backend: Any
    job: FormatJob
    reason: str | None = None  # why it cannot run here
    hint: str = ""
    problem: str | None = None  # the error its run would stop with
    keys: list[str] = field(default_factory=list)  # its steps, evaluate and publish included
    artifact_keys: list[str] = field(default_factory=list)
    repo: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "can_run": self.reason is None, "reason": self.reason,
                "required": self.job.required, "problem": self.problem, "repo": self.repo}


@dataclass
class Plan:
    """A model's steps in the order they run, and per format what the plan found."""

    model: str
    source: str
    workspace: Path
    ctx: Any  # the backends' JobContext
    steps: list[Step]
    formats: list[FormatPlan]
    here: bool
    params: int | None
    note: str | None = None

    def step(self, key: str) -> Step:
        return next(s for s in self.steps if s.key == key)

    def to_dict(self) -> dict[str, Any]:
        """What ``--dry-run --json`` and `quantkit.recipe.plan` show."""
        return {"model": self.model, "source": self.source, "workspace": str(self.workspace.resolve()),
                "resolved": self.here, "estimated": not self.here, "params": self.params, "note": self.note,
                "formats": [f.to_dict() for f in self.formats], "steps": self.steps}


def plan_job(job: Job, *, resolve_models: bool = True, check: bool = True) -> dict[str, Any]:
    """What running `job` would do: the model's steps, per format whether it can run here and the error its run
    would stop with. With ``resolve_models=False`` nothing is looked up (for `validate`). Nothing is written:
    the workspace is opened read-only and weight hashes are not cached."""
    from quantkit.fingerprint import reading_only
    from quantkit.workspace import Workspace

    with reading_only():
        ckpt, why = resolve_for_plan(job.source) if resolve_models else (None, "not resolved")
        name = job.name or (ckpt.name if ckpt is not None else default_name(job.source))
        ws = Workspace(job.workspace_for(name), read_only=True) if ckpt is not None else None
        plan = plan_model(job, ckpt, ws, check=check, why=why if resolve_models else None)
        out = plan.to_dict()
        if job.settings.publish and ws is not None:
            for fp, fmt in zip(plan.formats, out["formats"], strict=True):
                fmt["publish"] = _publish_plan(ws, fp, job, plan)
        return out


def plan_model(job: Job, ckpt: Any, ws: Any, *, check: bool = True, why: str | None = None) -> Plan:
    """The steps of `job` for checkpoint `ckpt` (None: not here, planned from the known size) in workspace `ws`."""
    from quantkit.backends.base import JobContext

    s = job.settings
    name = job.name or (ckpt.name if ckpt is not None else default_name(job.source))
    known = find_known(job.source)
    n_params = ckpt.n_params if ckpt is not None else (round(known.params_b * 1e9) if known else None)
    note = None
    if ckpt is None and why is not None:
        note = f"{why}; sizes {ESTIMATED} ({known.params_b:g} B)" if known else f"{why}; sizes unknown"
    if ckpt is not None:
        ckpt.name = name
        if ws is not None and ws.read_only:
            from quantkit.workspace import record_model

            record_model(ws, ckpt)  # in memory only
    ctx = JobContext(checkpoint=ckpt, workspace=ws, settings=s, command=job.command, name=name, n_params=n_params)
    steps: dict[str, Step] = {}
    steps[RESOLVE] = _resolve_step(job, ckpt, n_params)
    formats = [_plan_format(job, fj, ctx, steps, check=check) for fj in job.formats]
    ordered = _order(steps, formats)
    done = {k: ws is not None and ws.done(st) for k, st in ordered.items()}
    status = {}
    for f in formats:
        bad = None if f.reason is None else ("fails: required" if f.job.required else "skip")
        bad = "fails" if f.problem is not None else bad
        for k in f.keys:
            status[k] = bad
    needed = _needed(list(ordered.values()), done)
    out = []
    for k, st in ordered.items():
        own = "done" if done[k] else ("to do" if k in needed else "not needed")
        out.append(replace(st, model=name, done=done[k], status=status.get(k) or own))
    plan = Plan(model=name, source=job.source, workspace=job.workspace_for(name), ctx=ctx, steps=out,
                formats=formats, here=ckpt is not None, params=n_params, note=note)
    return plan


def _resolve_step(job: Job, ckpt: Any, n_params: int | None) -> Step:
    if ckpt is not None:
        return Step(RESOLVE, "resolve", f"resolve {job.source}", outputs=(str(ckpt.path),),
                    fingerprint=ckpt.fingerprint, action=noop)
    known = find_known(job.source)
    if known is not None and known.built_here:
        return Step(RESOLVE, "resolve", f"build the {known.alias} model", outputs=(str(known.folder()),))
    hub_id = known.hub_id if known else job.source
    return Step(RESOLVE, "resolve", f"download {hub_id}", outputs=(hub_id,),
                estimated_size=2 * n_params if n_params else None)


def _plan_format(job: Job, fj: FormatJob, ctx: Any, steps: dict[str, Step], *, check: bool) -> FormatPlan:
    """Add one format's steps (its backend's, its evaluation and publishing) to `steps`."""
    backend = reason = None
    hint = ""
    if check:
        from quantkit.source import architecture_of

        backend, reason, hint = refusal(fj.format, architecture_of(job.source))
    else:
        backend = _quiet_backend(fj.format)
    fplan = FormatPlan(fj.format, backend, fj, reason=reason, hint=hint)
    mine: list[Step] = []
    if backend is not None:
        for opts in fj.options:
            try:
                mine += backend.steps(ctx, opts)
            except QuantkitError as exc:
                fplan.problem = fplan.problem or str(exc)
            except ImportError as exc:  # the backend's packages are missing here
                fplan.reason = fplan.reason or f"cannot plan {fj.format}: {exc}"
    else:
        mine = [Step(step_key(fj.format, "quantize"), "quantize", f"{fj.format} quantization",
                     format=fj.format, outputs=(f"{fj.format}/",))]
    mine = [replace(st, format=fj.format) if st.format is None else st for st in mine]
    if backend is not None and mine and getattr(backend, "generic_verify", True) \
            and not any(st.kind == "verify" for st in mine):
        mine += _verify_steps(mine)  # every artifact is loaded and checked before anything can publish it
    for st in mine:
        fplan.problem = fplan.problem or dict(st.extra).get("problem")  # a step that says its run would fail
        if st.resources == Resources() and backend is not None:
            st = replace(st, resources=resources_for(backend, st.kind))
        _add(steps, st, fj.format)
        fplan.keys.append(st.key)
        if st.artifact is not None:
            fplan.artifact_keys.append(st.key)
    if any(CALIBRATE in st.inputs for st in mine) and CALIBRATE not in steps:
        from quantkit.calibration.rows import calibrate_step

        steps[CALIBRATE] = calibrate_step(ctx)
    own = [steps[k] for k in dict.fromkeys(fplan.keys)]
    fplan.keys = list(dict.fromkeys(fplan.keys))
    fplan.artifact_keys = list(dict.fromkeys(fplan.artifact_keys))
    s = job.settings
    evaluate = None
    if s.eval:
        evaluate = _evaluate_step(fj.format, own, fplan.artifact_keys, s)
        steps[evaluate.key] = evaluate
        fplan.keys.append(evaluate.key)
    if s.publish:
        pub = _publish_step(ctx, fj, own, evaluate, s)
        steps[pub.key] = pub
        fplan.keys.append(pub.key)
        fplan.repo = dict(pub.extra)["repo_name"]
    return fplan


def _verify_steps(mine: list[Step]) -> list[Step]:
    """One verification per artifact (`quantkit.quality.verify`) for a format that declares none of its own."""
    from quantkit.quality.verify import VERSION, verify_action

    out = []
    for st in mine:
        if st.artifact is None:
            continue
        fp = fingerprint("verify", VERSION, st.fingerprint) if st.fingerprint else ""
        name = Path(st.outputs[0].rstrip("/")).name if st.outputs else st.artifact
        out.append(Step(step_key(str(st.format), "verify", st.artifact), "verify", f"verify {name}",
                        format=st.format, inputs=(st.key,), fingerprint=fp, resources=st.resources,
                        action=verify_action))
    return out


def _quiet_backend(fmt: str) -> Any:
    from quantkit.backends.base import get_backend

    try:
        return get_backend(fmt)
    except Exception:  # noqa: BLE001 - a backend that cannot load is planned generically
        return None


def _add(steps: dict[str, Step], st: Step, fmt: str) -> None:
    """Add `st`; the same step twice (two variants that share a conversion) is kept once, but two variants that
    would write one key differently are refused."""
    have = steps.get(st.key)
    if have is None:
        steps[st.key] = st
    elif have.fingerprint != st.fingerprint or have.outputs != st.outputs:
        raise QuantkitError(f"two {fmt} variants both make {st.key}, differently",
                            "give the variants options that do not collide (or merge them into one)")


def _order(steps: dict[str, Step], formats: list[FormatPlan]) -> dict[str, Step]:
    """Every step after its inputs, otherwise in the order they were planned (resolve, calibrate first)."""
    out: dict[str, Step] = {}
    pending = list(steps)
    pending.sort(key=lambda k: (k != RESOLVE, k != CALIBRATE))

    def visit(key: str, trail: tuple[str, ...] = ()) -> None:
        if key in out:
            return
        if key in trail:
            raise QuantkitError(f"the plan has a cycle through {key}", "report this: it is a bug in a backend")
        st = steps[key]
        for dep in st.inputs:
            if dep in steps:
                visit(dep, (*trail, key))
        out[key] = st

    for key in pending:
        visit(key)
    return out


def _needed(steps: list[Step], done: dict[str, bool]) -> set[str]:
    """The steps still to do that something needs: resolve (the record of which weights the run used), each step
    that makes an artifact or that nothing reads, and every input of one of those that is not done. An
    intermediate whose readers are all done (a measurement whose bitrates are finished, calibration rows whose
    matrix is made) is not made again."""
    readers: dict[str, list[str]] = {s.key: [] for s in steps}
    for s in steps:
        for i in s.inputs:
            readers.setdefault(i, []).append(s.key)
    needed: set[str] = set()
    for s in reversed(steps):
        if done[s.key]:
            continue
        if s.key == RESOLVE or s.artifact is not None or not readers[s.key] \
                or any(r in needed for r in readers[s.key]):
            needed.add(s.key)
    return needed


def _evaluate_step(fmt: str, own: list[Step], artifact_keys: list[str], s: Any) -> Step:
    from quantkit.pipeline.actions import evaluate_action

    arts = [st for st in own if st.key in artifact_keys]
    fps = [st.fingerprint for st in arts]
    fp = fingerprint("evaluate", EVAL_VERSION, fps, s.eval, s.ctx, s.chunks, s.max_ppl_increase, s.max_kld,
                     s.drift, s.max_drift) if fps and all(fps) else ""
    return Step(step_key(fmt, "evaluate"), "evaluate", f"evaluate on {s.eval} (ctx {s.ctx}); {s.gate_text()}",
                format=fmt, inputs=_final(own, artifact_keys), fingerprint=fp, action=evaluate_action)


def _final(own: list[Step], artifact_keys: list[str]) -> tuple[str, ...]:
    """What follows a format's steps reads: its artifacts, and the steps nothing else of the format reads (their
    checks), so that evaluation and publishing come after every verification."""
    read = {i for st in own for i in st.inputs}
    return tuple(st.key for st in own if st.key in artifact_keys or st.key not in read)


def _publish_step(ctx: Any, fj: FormatJob, own: list[Step], evaluate: Step | None, s: Any) -> Step:
    from quantkit.pipeline.actions import publish_action

    name = fj.repo
    if name is None:
        if ctx.workspace is not None:
            from quantkit.card import default_repo_name

            name = default_repo_name(ctx.workspace, fj.format)
        else:
            name = f"{ctx.name}-{fj.format.upper()}"
    shown = name if "/" in name else f"<your-username>/{name}"
    final = [st for st in own if st.key in _final(own, [st.key for st in own if st.artifact is not None])]
    inputs = (evaluate.key,) if evaluate else tuple(st.key for st in final)
    upstream = [evaluate.fingerprint] if evaluate else [st.fingerprint for st in final]
    fp = fingerprint("publish", name, s.private, s.force, upstream) if upstream and all(upstream) else ""
    return Step(step_key(fj.format, "publish"), "publish", "publish" + (" (private)" if s.private else ""),
                format=fj.format, inputs=inputs, fingerprint=fp, repo=shown, action=publish_action,
                extra=(("repo_name", name),))


def _publish_plan(ws: Any, fplan: FormatPlan, job: Job, plan: Plan) -> dict[str, Any]:
    """What publishing would upload where (existing and planned files), or why it cannot be planned yet."""
    from quantkit.publish import plan_publish

    planned = [{"step": st.title, "output": st.outputs[0] if st.outputs else None, "done": st.done,
                "estimated_size": st.estimated_size}
               for st in plan.steps if st.key in fplan.artifact_keys]
    try:
        return plan_publish(ws, fplan.format, repo=fplan.job.repo, private=job.settings.private, planned=planned,
                            force=job.settings.force)
    except QuantkitError as exc:
        return {"repo": fplan.job.repo, "note": exc.message}


def noop(run: StepRun) -> StepResult:
    """The resolve step's action: the checkpoint was resolved before planning; its record says from where."""
    ckpt = run.ctx.checkpoint
    return StepResult(outputs=[], info={"source": ckpt.source, "hub_id": ckpt.hub_id})
