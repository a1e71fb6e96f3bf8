"""The Ray executor's tasks, planned without Ray: one task per model × format, in order, with what each asks of
the node that runs it (the most any of its steps asks), fitted to a cluster's nodes; and the model's result put
back together from its tasks. `task_plan` is what ``quantkit run --dry-run --executor ray`` shows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantkit.pipeline.executor import not_run
from quantkit.pipeline.job import FormatResult, Job, JobResult, Resources, row

GPU_RESOURCE_ENV = "QUANTKIT_RAY_GPU_RESOURCE"  # a custom resource that stands in for GPUs (tests: fake_gpu)


@dataclass
class Task:
    """One Ray task: one model with one of its formats, and what it asks of the node that runs it."""

    index: int  # the job's position in the run
    order: int  # the format's position in the job
    job: Job  # the model with this one format
    resources: Resources
    name: str  # "<model> <format>"
    repo: str | None = None  # the Hub repo it publishes to (at most one task per repo at a time)
    lane: str = ""  # its workspace: one task per workspace at a time (they would refuse each other's lock)
    started: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)  # Ray's options for it


def job_name(job: Job) -> str:
    from quantkit.pipeline.plan import default_name

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


def format_resources(job: Job) -> dict[str, Resources]:
    """Per format of `job`: the most that any of its planned steps asks for (the model's own steps included).
    Planned without resolving anything (a step's resources depend on its backend and kind only)."""
    from quantkit.pipeline.plan import plan_job

    steps = plan_job(job, resolve_models=False)["steps"]
    out: dict[str, Resources] = {}
    for fj in job.formats:
        mine = [s.resources for s in steps if s.format in (None, fj.format)]
        threads = job.settings.threads
        out[fj.format] = Resources(cpus=max([threads, *(r.cpus for r in mine)]),
                                   gpus=max([0.0, *(r.gpus for r in mine)]),
                                   memory=max([0, *(r.memory for r in mine)]))
    return out


def tasks_for(jobs: Sequence[Job]) -> list[Task]:
    """Every task of a run, in order: per job, one per format."""
    out = []
    for i, job in enumerate(jobs):
        job = absolute(job)
        name = job_name(job)
        per_format = format_resources(job)
        for k, fj in enumerate(job.formats):
            out.append(Task(index=i, order=k, job=replace(job, formats=(fj,)), resources=per_format[fj.format],
                            name=f"{name} {fj.format}", repo=fj.repo if job.settings.publish else None,
                            lane=str(job.workspace_for(name))))
    return out


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
    """What `--dry-run --executor ray` shows: one row per task (model × format) with the steps it runs and the
    resources it asks of the node that gets it. Nothing is started or written."""
    from quantkit.pipeline.plan import plan_job

    gpu_resource = gpu_resource or os.environ.get(GPU_RESOURCE_ENV) or None
    rows = []
    for task in tasks_for(jobs):
        options, _ = ray_options(task.resources, gpu_resource)
        steps = plan_job(task.job, resolve_models=False)["steps"]
        rows.append({"task": task.name, "model": job_name(task.job), "format": task.job.formats[0].format,
                     "after": rows[-1]["task"] if rows and rows[-1]["model"] == job_name(task.job) else None,
                     "steps": [s.kind for s in steps if s.format is not None],
                     "resources": task.resources.as_dict(), "ray": options, "asks": describe(options)})
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


def with_threads(task: Task) -> Job:
    """The task's job using as many threads as CPUs it got (at most the job's own ``threads``, when it has some:
    a request lowered to the largest node lowers its threads too)."""
    job = task.job
    n = max(1, int(task.options.get("num_cpus", task.resources.cpus)))
    if job.settings.threads > 0:
        n = min(n, job.settings.threads)
    return job if n == job.settings.threads else replace(job, settings=replace(job.settings, threads=n))


def failed(model: str, fmt: str, note: str, error: BaseException | None) -> JobResult:
    return JobResult(model=model, failed=True,
                     formats=[FormatResult(fmt, rows=[row(model, fmt, status="failed", note=note)], error=error)])


def merge(job: Job, results: list[JobResult]) -> JobResult:
    """One model's result from its formats' tasks, as the local executor returns it."""
    if not results:
        return not_run(job, "an earlier step failed")
    named = next((r for r in results if r.workspace), results[0])
    return JobResult(model=named.model, workspace=named.workspace,
                     formats=[f for r in results for f in r.formats], work=any(r.work for r in results),
                     failed=any(r.failed for r in results))
