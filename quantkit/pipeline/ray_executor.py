"""The Ray executor: the jobs of a run fanned out over a Ray cluster, each model's steps still in order.

::

    driver (quantkit run ... --executor ray)             workers (any node of the cluster)
    ─ probe: a file in each workspace root ─────────────▶ every node reads it back (shared storage, or refuse)
    ─ per model, per format: one task, in recipe order ─▶ run_job(the model with that one format)
      (resources: the most any of its planned steps asks)   under the workspace lock, as the local executor does
    ◀ one line per finished task ───────────────────────  the manifest in the shared workspace says what is done

- **One task per model × format.** A model's formats run one after another (they share one workspace and its
  lock); different models run in parallel, as far as the cluster's resources allow. Each task asks for the most
  any of its steps asks (`Step.resources`: CPUs, GPUs, memory), so a GPU is held only by the formats that use one.
- **GPUs** map onto Ray's ``num_gpus``, or onto a custom resource (``gpu_resource``, or ``QUANTKIT_RAY_GPU_RESOURCE``)
  that stands in for them. A cluster without any runs the task without the request: the backend then refuses on
  the worker exactly as it would locally (EXL2: no CUDA), or runs on the CPU (GPTQ).
- **Storage.** Tasks read checkpoints and write artifacts at the same absolute paths as the driver: the workspace
  (and a local source folder) must be on storage every node sees (NFS, a cluster file system). A probe file written
  by the driver in each workspace root must be readable by a task on every node, or the run refuses before work.
- **Failures.** A task whose worker or node dies is retried (`max_retries`, default 2); an exception is a real
  failure and is not retried. The manifest, written under the workspace lock by whichever worker holds it, stays
  the one record of what is done: a retry, or a rerun after the driver died, skips every finished step.
- **Threads.** A task uses as many threads as the CPUs it asked for: the job's ``threads`` when set (which then is
  also its CPU request), else the CPUs its steps ask for.
- **Output.** Ray starts quietly (no dashboard, worker output stays in Ray's log files); the driver prints one line
  as each task starts and finishes (hidden under --quiet). A local cluster started for the run is shut down at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ray

from quantkit import console
from quantkit.errors import QuantkitError
from quantkit.pipeline.executor import not_run
from quantkit.pipeline.job import Job, JobResult
from quantkit.pipeline.ray_tasks import (
    GPU_RESOURCE_ENV,
    Task,
    absolute,
    describe,
    failed,
    job_name,
    merge,
    ray_options,
    task_plan,
    tasks_for,
    with_threads,
    workspace_roots,
)

MAX_RETRIES = 2
PROBE_PREFIX = ".quantkit-probe-"
PROBE_TIMEOUT = 120  # seconds
# the driver's variables that every task gets (Hub access and quantkit's own switches); machine paths stay behind
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET",
                 "QUANTKIT_DEBUG")


def use_token_if_here() -> None:
    """Authenticate to a cluster by address with the token found here (RAY_AUTH_TOKEN, ~/.ray/auth_token), as
    `ray start --address` does; Ray's driver does that only for a cluster it finds by itself."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray version: RAY_AUTH_MODE=token does the same
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _probe(paths: list[str], sources: list[str]) -> dict[str, Any]:
    """On a worker: which probe files it can read (their contents) and which source folders it sees."""
    found: dict[str, str | None] = {}
    for p in paths:
        try:
            found[p] = Path(p).read_text(encoding="utf-8")
        except OSError:
            found[p] = None
    return {"node": ray.util.get_node_ip_address(), "probes": found,
            "sources": {s: Path(s).exists() for s in sources}}


def _run_task(job: Job, keep_going: bool, strict: bool, quiet: bool) -> dict[str, Any]:
    """On a worker: run one model with one format, exactly as the local executor would."""
    from quantkit.pipeline.run import run_job

    console.configure(quiet=quiet)
    started = time.monotonic()
    result = run_job(job, keep_going=keep_going, strict=strict)
    for f in result.formats:  # what comes back must unpickle on the driver
        if f.error is not None:
            try:
                pickle.loads(pickle.dumps(f.error))
            except Exception:  # noqa: BLE001 - an exception that cannot travel is sent as its message
                f.error = QuantkitError(f"{type(f.error).__name__}: {f.error}")
    return {"result": result, "node": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "seconds": time.monotonic() - started}


class RayExecutor:
    """Runs jobs as Ray tasks on a cluster (``address``, else ``RAY_ADDRESS``, else a local cluster started for the
    run and shut down after it)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, gpu_resource: str | None = None,
                 max_retries: int = MAX_RETRIES, num_cpus: int | None = None,
                 resources: dict[str, float] | None = None, **_: Any) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.gpu_resource = gpu_resource or os.environ.get(GPU_RESOURCE_ENV) or None
        self.max_retries = max_retries
        self.num_cpus = num_cpus  # a local cluster's CPUs (default: every core)
        self.resources = resources  # a local cluster's custom resources (tests: {"fake_gpu": 1})

    # ── the cluster ─────────────────────────────────────────────────────────────────────────────────────
    @contextlib.contextmanager
    def cluster(self) -> Iterator[None]:
        """Connected to the cluster for the block; a local cluster started here is shut down after it."""
        if ray.is_initialized():  # a caller (a notebook, a test) is connected already: use it, leave it running
            yield
            return
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False,
                                  "logging_level": "error"}
        # token authentication (Ray's default; a local cluster makes a token in ~/.ray) without Ray's notice
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if self.address:
            kwargs["address"] = self.address
            use_token_if_here()
        else:
            kwargs["address"] = "local"
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
            if self.resources:
                kwargs["resources"] = self.resources
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise QuantkitError(f"cannot reach the Ray cluster at {self.address}: {exc}",
                                "start it with `ray start --head` (workers: `ray start --address HEAD:6379`); a "
                                "cluster with token authentication (Ray's default) needs its token here too "
                                "(~/.ray/auth_token or RAY_AUTH_TOKEN); leave --address and RAY_ADDRESS unset for "
                                "a cluster on this machine") from None
        try:
            yield
        finally:
            ray.shutdown()

    def check_storage(self, jobs: Sequence[Job]) -> None:
        """Refuse before any work unless every node sees the workspace roots (and local source folders): a probe
        file written here must be readable by a task on each node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probes: dict[str, str] = {}
        for root in workspace_roots(jobs):
            root.mkdir(parents=True, exist_ok=True)
            path = root / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
            token = uuid.uuid4().hex
            path.write_text(token, encoding="utf-8")
            probes[str(path)] = token
        sources = sorted({j.source for j in map(absolute, jobs) if Path(j.source).is_absolute()
                          and Path(j.source).exists()})
        probe = ray.remote(num_cpus=0, max_retries=1)(_probe)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(list(probes), sources) for n in nodes]
            answers = ray.get(refs, timeout=PROBE_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise QuantkitError(f"the storage probe got no answer from every node within {PROBE_TIMEOUT} s",
                                "check the cluster with `ray status`") from None
        finally:
            for p in probes:
                with contextlib.suppress(OSError):
                    os.unlink(p)
        for ans in answers:
            unseen = [p for p, token in probes.items() if ans["probes"].get(p) != token]
            if unseen:
                raise QuantkitError(
                    f"node {ans['node']} cannot read {Path(unseen[0]).parent}: the workspace must be on storage "
                    "every node of the cluster sees at the same path",
                    "put the workspace (recipe `workspace:`) on a shared file system (NFS or similar) mounted at "
                    "the same path on every node")
            missing = [s for s, seen in ans["sources"].items() if not seen]
            if missing:
                raise QuantkitError(f"node {ans['node']} does not see the model folder {missing[0]}",
                                    "put local checkpoints on storage every node sees, or use Hub ids")

    def plan(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """The tasks a run would start and what each asks for (see `task_plan`)."""
        return task_plan(jobs, gpu_resource=self.gpu_resource)

    # ── running ─────────────────────────────────────────────────────────────────────────────────────────
    def run(self, jobs: Sequence[Job], *, keep_going: bool = False, strict: bool = False) -> list[JobResult]:
        if not jobs:
            return []
        tasks = tasks_for(jobs)  # planned before connecting: a bad job is refused without a cluster
        with self.cluster():
            self.check_storage(jobs)
            return self._run(jobs, tasks, keep_going=keep_going, strict=strict)

    def _fit(self, tasks: list[Task]) -> None:
        """Ray's options per task, fitted to what the cluster's nodes have."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        cluster = ray.cluster_resources()
        keys = {"CPU", "memory", self.gpu_resource or "GPU"}
        largest = {k: max([0.0, *(float(n.get(k, 0)) for n in nodes)]) for k in keys}
        said: dict[str, list[str]] = {}
        for task in tasks:
            task.options, notes = ray_options(task.resources, self.gpu_resource, cluster, largest)
            for note in notes:
                said.setdefault(note, []).append(task.name)
        for note, names in said.items():
            console.warn(f"{', '.join(names[:4])}{' …' if len(names) > 4 else ''}: {note}")

    def _run(self, jobs: Sequence[Job], tasks: list[Task], *, keep_going: bool, strict: bool) -> list[JobResult]:
        self._fit(tasks)
        remote = ray.remote(max_calls=1)(_run_task)  # a fresh process per task: no state, GPU memory freed
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}  # set before the worker imports anything
        runtime_env = {"runtime_env": {"env_vars": env}} if env else {}
        queues: dict[int, deque[Task]] = {}
        for t in tasks:
            queues.setdefault(t.index, deque()).append(t)
        parts: dict[int, list[tuple[int, JobResult]]] = {i: [] for i in range(len(jobs))}
        running: dict[Any, Task] = {}
        busy_repos: set[str] = set()
        stopped = False
        total, finished = len(tasks), 0
        try:
            while queues or running:
                for index in list(queues):
                    if any(t.lane == queues[index][0].lane for t in running.values()):
                        continue  # the model's previous format (or another job on its workspace) is running
                    queue = queues[index]
                    if stopped:
                        for t in queue:
                            parts[index].append((t.order, not_run(t.job, "an earlier step failed")))
                        del queues[index]
                        continue
                    task = queue[0]
                    if task.repo and task.repo in busy_repos:
                        continue  # one publisher per Hub repo
                    queue.popleft()
                    if not queue:
                        del queues[index]
                    ref = remote.options(**task.options, **runtime_env, max_retries=self.max_retries,
                                         retry_exceptions=False, name=f"quantkit {task.name}").remote(
                        with_threads(task), keep_going, strict, console.is_quiet())
                    task.started = time.monotonic()
                    running[ref] = task
                    if task.repo:
                        busy_repos.add(task.repo)
                    console.info(f"[dim]→[/] {task.name}: started ({describe(task.options)})")
                if not running:
                    continue
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    task = running.pop(ref)
                    busy_repos.discard(task.repo or "")
                    finished += 1
                    result, node = self._collect(ref, task, strict=strict)
                    parts[task.index].append((task.order, result))
                    if result.failed:
                        later = queues.pop(task.index, deque()) if not keep_going else deque()
                        for t in later:
                            parts[task.index].append((t.order, not_run(t.job, "an earlier step failed")))
                        stopped = stopped or not keep_going
                    mark = "[red]✗[/] {}: [red]failed[/]" if result.failed else "[dim]✓[/] {}: [green]done[/]"
                    console.info(f"{mark.format(task.name)} ({finished}/{total}, "
                                 f"{time.monotonic() - task.started:.1f} s" + (f" on {node}" if node else "") + ")")
        except BaseException:
            for ref in running:  # Ctrl-C or a strict failure: the cluster stops what this run started
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        return [merge(jobs[i], [r for _, r in sorted(parts[i], key=lambda p: p[0])]) for i in range(len(jobs))]

    def _collect(self, ref: Any, task: Task, *, strict: bool) -> tuple[JobResult, str | None]:
        """A finished task's result and the node that ran it; a task that raised, or whose worker kept dying,
        becomes a failed row (or, with `strict`, the error itself)."""
        fmt = task.job.formats[0].format
        name = job_name(task.job)
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if strict:
                raise cause from None
            msg = str(cause) if isinstance(cause, QuantkitError) else f"{type(cause).__name__}: {cause}"
            console.console.print(f"[red]{task.name} failed:[/] {msg}", highlight=False)
            return failed(name, fmt, msg.splitlines()[0][:300] if msg else "", cause), None
        except ray.exceptions.RayError as exc:  # the worker, its node or its memory died, every try
            died = isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError
                              | ray.exceptions.OutOfMemoryError)
            msg = (f"its worker died {self.max_retries + 1} times" if died else "Ray could not run it") + \
                f" ({type(exc).__name__}); finished steps are kept, rerun to resume"
            if strict:
                raise QuantkitError(f"{task.name}: {msg}",
                                    "see Ray's worker logs (/tmp/ray/session_latest/logs)") from None
            console.console.print(f"[red]{task.name} failed:[/] {msg}", highlight=False)
            return failed(name, fmt, msg, None), None
        return answer["result"], answer["node"]
