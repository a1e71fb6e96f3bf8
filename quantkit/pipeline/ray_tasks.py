"""The Ray executor's tasks, planned without Ray: one task per step, with what it asks of the node that runs it,
fitted to a cluster's nodes, and the work a task does on its worker. `task_plan` is what
``quantkit run --dry-run --executor ray`` shows.

A step's task runs on a worker as the local executor would run it, except that it never touches the manifest:
the worker plans the job again (the same steps: planning is deterministic), checks that its step has the
fingerprint the driver planned, runs the action into the staging folder the driver named (on storage every node
sees), takes the outputs' checks there, and returns the result. The driver commits it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quantkit.pipeline.job import Job
from quantkit.steps import Resources, Step

GPU_RESOURCE_ENV = "QUANTKIT_RAY_GPU_RESOURCE"  # a custom resource that stands in for GPUs (tests: fake_gpu)
DRIVER_KINDS = ("resolve", "publish")  # steps the driver runs itself: bookkeeping, and what needs the Hub token
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class Secret:
    """A value that travels to a worker as a task argument (not in Ray's runtime environment, which Ray writes to
    its logs and shows on worker command lines) and never shows itself in a repr, a log or an error."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = dict(values)

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def apply(self) -> None:
        """Put the values into this (worker) process's environment."""
        os.environ.update(self._values)

    @classmethod
    def from_environment(cls) -> Secret:
        return cls({k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)})


def job_name(job: Job) -> str:
    from quantkit.models import default_name

    return job.name or default_name(job.source)


def absolute(job: Job) -> Job:
    """The job with its local paths made absolute: a worker's working directory is not the driver's."""
    source = Path(job.source).expanduser()
    changes: dict[str, Any] = {}
    if source.exists():  # absolute, symlinks kept: the manifest records the source as it was given
        changes["source"] = os.path.abspath(source)
    if job.workspace is not None:
        changes["workspace"] = Path(os.path.abspath(Path(job.workspace).expanduser()))
    if job.workspace_root is not None:
        changes["workspace_root"] = Path(os.path.abspath(Path(job.workspace_root).expanduser()))
    elif job.workspace is None:  # the default, ./quants/<model>, is the driver's
        changes["workspace_root"] = Path(os.path.abspath("quants"))
    return replace(job, **changes) if changes else job


def with_threads(job: Job, steps: Sequence[Step]) -> Job:
    """The job with the thread count its tasks use, fixed before planning (GPTQ's fingerprint holds it): the job's
    own ``threads`` when set, else the most CPUs any of its steps asks for."""
    if job.settings.threads > 0:
        return job
    n = max([1, *(int(s.resources.cpus) for s in steps)])
    return replace(job, settings=replace(job.settings, threads=n))


def step_resources(job: Job, step: Step) -> Resources:
    """What a step's task asks for: its own resources, with at least as many CPUs as the job's threads."""
    return Resources(cpus=max(float(job.settings.threads), step.resources.cpus), gpus=step.resources.gpus,
                     memory=step.resources.memory)


def ray_options(res: Resources, gpu_resource: str | None, cluster: dict[str, float] | None = None,
                largest: dict[str, float] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Ray's options for a task asking `res`, fitted to the cluster when its resources are known: a request no
    node could ever meet would wait forever, so it is lowered to what the largest node has (and said so)."""
    notes: list[str] = []
    cpus, gpus, memory = res.cpus, res.gpus, res.memory
    gpu_key = gpu_resource or "GPU"
    if largest is not None:
        if cpus > largest.get("CPU", 0) > 0:
            notes.append(f"asks {cpus:g} CPUs, the largest node has {largest['CPU']:g}")
            cpus = largest["CPU"]
        if gpus and not (cluster or {}).get(gpu_key):
            notes.append(f"asks {gpus:g} GPU, the cluster has none: runs without one")
            gpus = 0.0
        elif gpus > largest.get(gpu_key, 0):
            notes.append(f"asks {gpus:g} GPUs, the largest node has {largest.get(gpu_key, 0):g}")
            gpus = largest.get(gpu_key, 0)
        if memory and memory > largest.get("memory", 0) > 0:
            notes.append(f"asks {memory / 2**30:.1f} GiB, the largest node has {largest['memory'] / 2**30:.1f}")
            memory = 0
    options: dict[str, Any] = {"num_cpus": cpus}
    if gpus:
        if gpu_resource:
            options["resources"] = {gpu_resource: gpus}
        else:
            options["num_gpus"] = gpus
    if memory:
        options["memory"] = int(memory)
    return options, notes


def describe(options: dict[str, Any]) -> str:
    """Ray's options as a person reads them: ``2 CPU, 1 GPU, 8.0 GiB``."""
    parts = [f"{options.get('num_cpus', 1):g} CPU"]
    if options.get("num_gpus"):
        parts.append(f"{options['num_gpus']:g} GPU")
    for key, value in (options.get("resources") or {}).items():
        parts.append(f"{value:g} {key}")
    if options.get("memory"):
        parts.append(f"{options['memory'] / 2**30:.1f} GiB")
    return ", ".join(parts)


def task_plan(jobs: Sequence[Job], *, gpu_resource: str | None = None) -> list[dict[str, Any]]:
    """What `--dry-run --executor ray` shows: one row per step task, the steps it waits for and what it asks of
    the node that gets it (steps the driver runs itself ask nothing of the cluster). Nothing is started or
    written; models that are not here are planned from their known size."""
    from quantkit.pipeline.plan import plan_job

    gpu_resource = gpu_resource or os.environ.get(GPU_RESOURCE_ENV) or None
    rows = []
    for job in jobs:
        job = absolute(job)
        planned = plan_job(job, check=False)  # the cluster, not this machine, has the GPUs a step needs
        steps = planned["steps"]
        job = with_threads(job, steps)
        for st in steps:
            if st.status in ("skip", "fails", "fails: required", "not needed"):
                continue
            res = step_resources(job, st)
            on_driver = st.kind in DRIVER_KINDS
            options = {} if on_driver else ray_options(res, gpu_resource)[0]
            rows.append({"task": f"{planned['model']} {st.key}", "model": planned["model"], "step": st.key,
                         "kind": st.kind, "format": st.format, "after": list(st.inputs), "status": st.status,
                         "resources": res.as_dict(), "ray": options,
                         "asks": "the driver" if on_driver else describe(options)})
    return rows


def workspace_roots(jobs: Sequence[Job]) -> list[Path]:
    """The folders the run writes under (one per job; recipes share one), as absolute paths."""
    roots: list[Path] = []
    for job in jobs:
        job = absolute(job)
        if job.workspace_root is not None:
            root = Path(job.workspace_root)
        else:
            root = job.workspace_for(job_name(job)).resolve().parent
        if root not in roots:
            roots.append(root)
    return roots


@dataclass(frozen=True)
class StepTask:
    """What the driver sends a worker for one step (all of it picklable)."""

    job: Job
    key: str
    fingerprint: str
    fused: tuple[str, ...]
    pending: tuple[str, ...]
    staging: str


def run_step(task: StepTask, secret: Secret, quiet: bool) -> Any:
    """On a worker: plan the job again, run one step's action into its staging folder, check its outputs there."""
    import shutil

    from quantkit import console
    from quantkit.errors import QuantkitError
    from quantkit.pipeline.execute import inputs_of, run_action
    from quantkit.pipeline.plan import plan_model
    from quantkit.source import resolve
    from quantkit.steps import StepRun
    from quantkit.threads import set_threads
    from quantkit.workspace import Workspace, stage_checks

    secret.apply()
    console.configure(quiet=quiet)
    set_threads(task.job.settings.threads)
    ckpt = resolve(task.job.source)
    if task.job.name:
        ckpt.name = task.job.name
    ws = Workspace(task.job.workspace_for(ckpt.name), read_only=True)
    plan = plan_model(task.job, ckpt, ws, check=False)
    by_key = {s.key: s for s in plan.steps}
    step = by_key.get(task.key)
    if step is None or step.fingerprint != task.fingerprint:
        raise QuantkitError(f"{task.key}: this node plans the step differently from the driver",
                            "every node needs the same quantkit, the same checkpoint and the same storage")
    staging = Path(task.staging)
    if not staging.parent.is_dir():  # the run that asked for it is gone and its staging was cleaned up
        raise QuantkitError(f"{task.key}: the staging folder of this run is gone", "run the same command again")
    shutil.rmtree(staging, ignore_errors=True)  # a retried attempt starts afresh
    staging.mkdir()
    fused = tuple(by_key[k] for k in task.fused)
    run = StepRun(step=step, ctx=plan.ctx, staging=staging, fused=fused, pending=frozenset(task.pending),
                  shared={}, bar=console._NullProgress(), inputs=inputs_of(ws, (step, *fused)))
    try:
        result = run_action(run)
        for st in (step, *fused):
            res = result if st is step else result.fused[st.key]
            outputs = list(res.outputs) if res.outputs is not None else [o for o in st.outputs if "<" not in o]
            res.checks = stage_checks(st.key, staging, outputs)
    finally:
        for value in run.shared.values():
            close = getattr(value, "close", None)
            if callable(close):
                close()
    return result
