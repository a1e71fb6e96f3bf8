"""The Ray executor: the steps of a run fanned out over a Ray cluster, one task per step, each as soon as the
steps it reads are finished, so one model's independent steps (its quantizations, its GPTQ variants, its EXL2
bitrates, its verifications) spread over the cluster as well as different models do.

::

    driver (quantkit run ... --executor ray)                 workers (any node of the cluster)
    ─ probe: a file in each workspace root ────────────────▶ every node reads it back (shared storage, or refuse)
    ─ per model: resolve, lock the workspace, plan
    ─ per step, when its inputs are finished: one task ────▶ plan again, run the step's action into its staging
      (resources: what the step asks; fused steps with it)    folder, check the outputs there, return the result
    ◀ the result ──────────────────────────────────────────
    ─ commit: rename the outputs, record the step (the one writer of every manifest); publish (the token stays here)

- **One writer.** The driver holds each workspace's lock for the whole run and is the only process that renames
  outputs into place and writes the manifest; workers write only inside their step's staging folder. Two steps of
  one model can then run side by side without any lock between them, and a retried or orphaned attempt can never
  leave a file under a final name. The cost is that a step finished by a worker whose driver died is not recorded:
  the rerun makes it again (chosen over per-step locks, which would let two writers race on the manifest).
- **Fused steps.** A step that makes later steps in its pass (GGUF's one pass) is started once the other inputs of
  those steps are finished, so that the pass can make them.
- **GPUs** map onto Ray's ``num_gpus``, or onto a custom resource (``gpu_resource``, or ``QUANTKIT_RAY_GPU_RESOURCE``)
  that stands in for them. A cluster without any runs the task without the request: the backend then refuses on
  the worker exactly as it would locally (EXL2: no CUDA), or runs on the CPU (GPTQ).
- **Storage.** Tasks read checkpoints and write into staging folders at the same absolute paths as the driver:
  the workspace (and a local source folder) must be on storage every node sees (NFS, a cluster file system). A
  probe file written by the driver in each workspace root must be readable by a task on every node, or the run
  refuses before work.
- **Failures.** A task whose worker or node dies is retried (`max_retries`, default 2); an exception is a real
  failure and is not retried. A rerun, after any failure or after the driver died, skips every finished step.
- **Secrets.** The Hub token goes to a task as an argument (`ray_tasks.Secret`), never through Ray's runtime
  environment, whose variables Ray writes to its session logs and shows on worker command lines; publishing runs
  in the driver.
- **Threads.** A job's tasks use its ``threads`` when set, else as many threads as the most CPUs a step asks for.
- **Output.** Ray starts quietly (no dashboard, worker output stays in Ray's log files); the driver prints one line
  as each step's task starts and finishes (hidden under --quiet). A local cluster started for the run is shut
  down at the end; an address that does not answer within `connect_timeout` seconds is one line.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from quantkit import console
from quantkit.errors import QuantkitError
from quantkit.pipeline.job import Job, JobResult, not_run
from quantkit.pipeline.ray_cluster import (  # noqa: F401 - re-exported
    CONNECT_TIMEOUT,
    PROBE_PREFIX,
    ClusterConnection,
    parse_address,
    wait_for,
)
from quantkit.pipeline.ray_tasks import (
    DRIVER_KINDS,
    GPU_RESOURCE_ENV,
    Secret,
    StepTask,
    absolute,
    describe,
    job_name,
    ray_options,
    run_step,
    step_resources,
    task_plan,
    with_threads,
)
from quantkit.steps import Step

MAX_RETRIES = 2


@dataclass
class _Job:
    """One job of the run on the driver: its plan, its steps' outcomes, and the result being put together."""

    job: Job
    opened: Any
    steps: dict[str, Step] = field(default_factory=dict)
    outcomes: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False
    failed: JobResult | None = None  # a job that could not start


class RayExecutor(ClusterConnection):
    """Runs the steps of jobs as Ray tasks on a cluster (``address``, else ``RAY_ADDRESS``, else a local cluster
    started for the run and shut down after it)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, gpu_resource: str | None = None,
                 max_retries: int = MAX_RETRIES, num_cpus: int | None = None,
                 resources: dict[str, float] | None = None, connect_timeout: float = CONNECT_TIMEOUT,
                 **_: Any) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.gpu_resource = gpu_resource or os.environ.get(GPU_RESOURCE_ENV) or None
        self.max_retries = max_retries
        self.num_cpus = num_cpus  # a local cluster's CPUs (default: every core)
        self.resources = resources  # a local cluster's custom resources (tests: {"fake_gpu": 1})
        self.connect_timeout = connect_timeout
        if self.address:
            parse_address(self.address)  # a malformed address is refused before anything else

    def plan(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """The tasks a run would start and what each asks for (see `task_plan`)."""
        return task_plan(jobs, gpu_resource=self.gpu_resource)

    # ── running ─────────────────────────────────────────────────────────────────────────────────────────
    def run(self, jobs: Sequence[Job], *, keep_going: bool = False, strict: bool = False) -> list[JobResult]:
        if not jobs:
            return []
        jobs = [absolute(j) for j in jobs]
        with self.cluster():
            self.check_storage(jobs)
            with contextlib.ExitStack() as locks:
                return self._run(jobs, locks, keep_going=keep_going, strict=strict)

    def _open(self, jobs: Sequence[Job], locks: contextlib.ExitStack, *, keep_going: bool,
              strict: bool) -> list[_Job]:
        """Resolve, lock and plan every job (in the driver); a job that cannot run is finished right away."""
        from quantkit.pipeline.plan import plan_job
        from quantkit.pipeline.run import failed_job, open_job

        out = []
        stopped = False
        for job in jobs:
            if stopped:
                out.append(_Job(job, None))
                continue
            planned = plan_job(job, check=False)["steps"]  # its steps' resources decide its thread count
            job = with_threads(job, planned)
            try:
                opened = open_job(job, locks, keep_going=keep_going, strict=strict)
            except QuantkitError as exc:  # a job that cannot even start (its calibration file is not there)
                if strict:
                    raise
                console.console.print(f"[red]{console.escape(job_name(job))} failed:[/] {console.escape(str(exc))}",
                                      highlight=False)
                out.append(_Job(job, None, failed=failed_job(job, exc)))
                stopped = not keep_going
                continue
            entry = _Job(job, opened)
            if opened.plan is not None:
                from quantkit.pipeline.execute import runnable

                entry.steps = {s.key: s for s in runnable(opened.plan)}
                for st in entry.steps.values():
                    if st.done:
                        from quantkit.pipeline.execute import Outcome

                        rec = opened.plan.ctx.workspace.recorded(st.key)
                        entry.outcomes[st.key] = Outcome(st.key, "done", rec.info if rec else {})
            else:
                stopped = opened.result.failed and not keep_going
            out.append(entry)
        return out

    def _fit(self, entries: list[_Job]) -> dict[tuple[int, str], dict[str, Any]]:
        """Ray's options per step task, fitted to what the cluster's nodes have."""
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        cluster = ray.cluster_resources()
        keys = {"CPU", "memory", self.gpu_resource or "GPU"}
        largest = {k: max([0.0, *(float(n.get(k, 0)) for n in nodes)]) for k in keys}
        said: dict[str, list[str]] = {}
        options = {}
        for i, entry in enumerate(entries):
            for st in entry.steps.values():
                options[(i, st.key)], notes = ray_options(step_resources(entry.job, st), self.gpu_resource, cluster,
                                                          largest)
                for note in notes:
                    said.setdefault(note, []).append(f"{job_name(entry.job)} {st.key}")
        for note, names in said.items():
            console.warn(f"{', '.join(names[:4])}{' …' if len(names) > 4 else ''}: {note}")
        return options

    def _run(self, jobs: Sequence[Job], locks: contextlib.ExitStack, *, keep_going: bool,
             strict: bool) -> list[JobResult]:
        from quantkit.pipeline.execute import Outcome, fusable

        entries = self._open(jobs, locks, keep_going=keep_going, strict=strict)
        options = self._fit(entries)
        remote = ray.remote(max_calls=1)(run_step)  # a fresh process per task: no state, GPU memory freed
        secret = Secret.from_environment()
        running: dict[Any, tuple[int, Step, tuple[Step, ...], Any, float]] = {}
        total = sum(len(e.steps) - len(e.outcomes) for e in entries)
        finished_count = 0
        any_failed = False

        def settled(entry: _Job, key: str) -> bool:
            o = entry.outcomes.get(key)
            return o is not None and o.state != "running"

        def is_finished(entry: _Job, key: str) -> bool:
            o = entry.outcomes.get(key)
            return o is not None and o.finished

        def ready(entry: _Job, st: Step) -> bool | None:
            """True: start it; False: wait; None: it cannot run (an input failed)."""
            if any(k in entry.outcomes and entry.outcomes[k].state in ("failed", "not run") for k in st.inputs):
                return None
            if not all(is_finished(entry, k) for k in st.inputs if k in entry.steps):
                return False
            for key in st.fuses:  # wait for what a fused step reads, so the pass can make it
                other = entry.steps.get(key)
                if other is not None and key not in entry.outcomes and not all(
                        i == st.key or settled(entry, i) or i not in entry.steps for i in other.inputs):
                    return False
            return True

        try:
            while True:
                started = False
                for i, entry in enumerate(entries):
                    if entry.opened is None or entry.opened.plan is None:
                        continue
                    ws = entry.opened.plan.ctx.workspace
                    for st in entry.steps.values():
                        if st.key in entry.outcomes:
                            continue
                        go = ready(entry, st)
                        if go is None or entry.stopped or (any_failed and not keep_going):
                            entry.outcomes[st.key] = Outcome(st.key, "not run")
                            continue
                        if not go:
                            continue
                        pending = {k for k in entry.steps if k not in entry.outcomes}
                        finished = {k for k in entry.steps if is_finished(entry, k)}
                        fused = fusable(st, entry.steps, pending, finished)
                        for f in (st, *fused):
                            entry.outcomes[f.key] = Outcome(f.key, "running")
                        if st.kind in DRIVER_KINDS:
                            self._here(entry, st, strict=strict)
                            any_failed = any_failed or entry.outcomes[st.key].state == "failed"
                            finished_count += 1
                            started = True
                            continue
                        staging = ws.staging(st.key)
                        task = StepTask(job=entry.job, key=st.key, fingerprint=st.fingerprint,
                                        fused=tuple(f.key for f in fused), pending=tuple(sorted(pending)),
                                        staging=str(staging))
                        opts = options[(i, st.key)]
                        ref = remote.options(**opts, max_retries=self.max_retries, retry_exceptions=False,
                                             name=f"quantkit {job_name(entry.job)} {st.key}").remote(
                            task, secret, console.is_quiet())
                        running[ref] = (i, st, fused, staging, time.monotonic())
                        started = True
                        console.info(f"[dim]→[/] {console.escape(job_name(entry.job))} {st.key}: started "
                                     f"({describe(opts)})", markup=True)
                if not running:
                    if started:
                        continue
                    break
                ready_refs, _ = ray.wait(list(running), num_returns=1)
                for ref in ready_refs:
                    i, st, fused, staging, t0 = running.pop(ref)
                    entry = entries[i]
                    finished_count += 1
                    ok = self._commit(entry, ref, st, fused, staging, strict=strict)
                    if not ok:
                        any_failed = True
                        entry.stopped = not keep_going
                    mark = "[dim]✓[/] {}: [green]done[/]" if ok else "[red]✗[/] {}: [red]failed[/]"
                    console.info(f"{mark.format(console.escape(job_name(entry.job)) + ' ' + st.key)} "
                                 f"({finished_count}/{total}, {time.monotonic() - t0:.1f} s)", markup=True)
        except BaseException:
            for ref in running:  # Ctrl-C or a strict failure: the cluster stops what this run started
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise
        results = []
        for entry in entries:
            if entry.failed is not None:
                results.append(entry.failed)
            elif entry.opened is None:
                results.append(not_run(entry.job, "an earlier step failed"))
            elif entry.opened.plan is None:
                results.append(entry.opened.finish())
            else:
                results.append(entry.opened.close(entry.outcomes))
        return results

    def _here(self, entry: _Job, st: Step, *, strict: bool) -> None:
        """Run a step in the driver (resolve's record, publishing: the token never leaves this process)."""
        from quantkit.pipeline.execute import Outcome, run_action
        from quantkit.steps import StepRun

        plan = entry.opened.plan
        ws = plan.ctx.workspace
        run = StepRun(step=st, ctx=plan.ctx, staging=ws.staging(st.key), bar=console._NullProgress(),
                      inputs={k: r for k in st.inputs if (r := ws.recorded(k)) is not None})
        try:
            result = run_action(run)
            ws.commit(st, result, run.staging)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as the step's failure
            if strict:
                raise
            self._report(entry, st, exc)
            entry.outcomes[st.key] = Outcome(st.key, "failed", error=exc)
            return
        rec = ws.recorded(st.key)
        entry.outcomes[st.key] = Outcome(st.key, "ran", rec.info if rec else {})

    def _commit(self, entry: _Job, ref: Any, st: Step, fused: tuple[Step, ...], staging: Path, *,
                strict: bool) -> bool:
        """A finished task's result committed by the driver; a task that raised, or whose worker kept dying,
        becomes the step's failure (or, with `strict`, the error itself)."""
        import shutil

        from quantkit.pipeline.execute import Outcome

        ws = entry.opened.plan.ctx.workspace
        try:
            result = ray.get(ref)
            ws.commit(st, result, staging, fused)
        except ray.exceptions.RayTaskError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            for key, fields in getattr(cause, "updates", {}).items():
                ws.update_artifact(key, **fields)
            if strict:
                raise cause from None
            self._fail(entry, st, fused, cause)
            return False
        except ray.exceptions.RayError as exc:  # the worker, its node or its memory died, every try
            shutil.rmtree(staging, ignore_errors=True)
            died = isinstance(exc, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError
                              | ray.exceptions.OutOfMemoryError)
            msg = (f"its worker died {self.max_retries + 1} times" if died else "Ray could not run it") + \
                f" ({type(exc).__name__}); finished steps are kept, rerun to resume"
            if strict:
                raise QuantkitError(f"{st.key}: {msg}", "see Ray's worker logs (/tmp/ray/session_latest/logs)") \
                    from None
            self._fail(entry, st, fused, QuantkitError(f"{st.key}: {msg}"))
            return False
        except QuantkitError as exc:  # the outputs did not pass their checks
            if strict:
                raise
            self._fail(entry, st, fused, exc)
            return False
        for done in (st, *fused):
            rec = ws.recorded(done.key)
            entry.outcomes[done.key] = Outcome(done.key, "ran", rec.info if rec else {})
        return True

    def _fail(self, entry: _Job, st: Step, fused: tuple[Step, ...], exc: BaseException) -> None:
        from quantkit.pipeline.execute import Outcome

        self._report(entry, st, exc)
        entry.outcomes[st.key] = Outcome(st.key, "failed", error=_portable(exc))
        for f in fused:
            entry.outcomes[f.key] = Outcome(f.key, "not run")

    @staticmethod
    def _report(entry: _Job, st: Step, exc: BaseException) -> None:
        msg = str(exc) if isinstance(exc, QuantkitError) else f"{type(exc).__name__}: {exc}"
        console.console.print(f"[red]{console.escape(job_name(entry.job))} {st.key} failed:[/] "
                              f"{console.escape(msg)}", highlight=False)


def _portable(exc: BaseException) -> BaseException:
    """An exception that can be kept and re-raised in the driver (one that cannot is kept as its message)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - whatever it is, its message is what matters
        return QuantkitError(f"{type(exc).__name__}: {exc}")
    return exc
