"""Executors run jobs. The local one runs them here, one after another; another (a cluster) may run independent
jobs elsewhere, as long as each job's steps run in order and the workspace stays the one record of what is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from quantkit import console
from quantkit.errors import GateFailed, QuantkitError
from quantkit.pipeline.job import Job, JobResult, not_run

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs planned jobs and returns one `JobResult` per job, in the order given."""

    name: str

    def run(self, jobs: Sequence[Job], *, keep_going: bool = False, strict: bool = False) -> list[JobResult]:
        """Run `jobs`; a failed job stops the rest (they come back as "not run") unless `keep_going`.
        With `strict` the first error is raised as it is (a one-model command)."""
        ...

    def plan(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """Where each job's steps would run and what they ask for (``--dry-run``); starts and writes nothing."""
        ...


class LocalExecutor:
    """Runs every job in this process, in order."""

    name = "local"

    def run(self, jobs: Sequence[Job], *, keep_going: bool = False, strict: bool = False) -> list[JobResult]:
        from quantkit.pipeline.run import run_job

        results: list[JobResult] = []
        stopped = False
        for i, job in enumerate(jobs, 1):
            if stopped:
                results.append(not_run(job, "an earlier step failed"))
                continue
            if len(jobs) > 1:
                console.info(f"[bold]── {console.escape(job.name or job.source)}[/] ({i}/{len(jobs)}): "
                             f"{', '.join(f.format for f in job.formats)}", markup=True)
            result = run_job(job, keep_going=keep_going, strict=strict)
            results.append(result)
            stopped = result.failed and not keep_going
        return results

    def plan(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """One task per job, in order, all in this process."""
        from quantkit.models import default_name

        names = [job.name or default_name(job.source) for job in jobs]
        return [{"task": name, "after": names[i - 1] if i else None, "steps": [f.format for f in job.formats],
                 "asks": "this machine"} for i, (name, job) in enumerate(zip(names, jobs, strict=True))]


def get_executor(name: str, **options: Any) -> Executor:
    """An executor by name: ``local`` (default) or ``ray`` (needs the ``ray`` extra)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        try:
            from quantkit.pipeline.ray_executor import RayExecutor
        except ImportError as exc:
            raise QuantkitError(f"the ray executor needs Ray: {exc}",
                                "pip install 'quantkit-ru[ray]' (or pip install ray)") from None
        return RayExecutor(**options)
    raise QuantkitError(f"unknown executor '{name}'", f"executors: {', '.join(EXECUTORS)}")


def summarize(results: Sequence[JobResult], label: str) -> dict[str, Any]:
    """The run's summary: one row per artifact (or skipped / failed / not-run format) and what went wrong."""
    rows = [r for res in results for r in res.rows]
    failed = [r for r in rows if r["status"] in ("failed", "failed gate", "not run")]
    work = any(res.work or any(f.publish and not f.publish.get("skipped") and f.publish.get("published", True)
                               for f in res.formats) for res in results)
    return {"recipe": label, "rows": rows, "nothing_to_do": not work and not failed, "failed": bool(failed),
            "gate_only": bool(failed) and all(r["status"] == "failed gate" for r in failed)}


def failure(summary: dict[str, Any]) -> QuantkitError | None:
    """The error to exit with after a run, or None when everything passed."""
    if not summary["failed"]:
        return None
    bad = [r for r in summary["rows"] if r["status"] in ("failed", "failed gate", "not run")]
    what = ", ".join(f"{r['model']} {r['format']}" + (f" {r['quant']}" if r["quant"] != "-" else "")
                     + f" ({r['status']})" for r in bad[:6]) + (" …" if len(bad) > 6 else "")
    if summary["gate_only"]:
        return GateFailed(f"{len(bad)} artifact(s) failed the quality gate and were not published: {what}",
                          "raise the recipe's gates, or choose larger types")
    return QuantkitError(f"{len(bad)} step(s) did not succeed: {what}",
                         "see the messages above; rerun the same command to resume (--continue-on-error goes on "
                         "past failures)")
