"""What a run is asked to do (`Job`) and what came out (`JobResult`); its steps are `quantkit.steps`.

A `Job` is one model and the formats to make of it, with every setting already decided: `quantkit gguf MODEL ...`
builds one from its flags, a recipe builds one per model. Jobs are frozen and picklable, so an executor can hand
them to another process or machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantkit.settings import Settings
from quantkit.steps import Resources, Step


@dataclass(frozen=True)
class FormatJob:
    """One format of a model: the backend, its option variants, whether it must run, and where it goes."""

    format: str
    options: tuple[BaseModel, ...]
    required: bool = True  # False: a backend that cannot run here is skipped, not failed
    repo: str | None = None  # Hub repo to publish to (NAME or NAMESPACE/NAME); None = the default name


@dataclass(frozen=True)
class Job:
    """One model and the formats to make of it."""

    source: str  # alias, Hub id, local folder or demo, as `quantkit.source.resolve` takes it
    formats: tuple[FormatJob, ...]
    settings: Settings = field(default_factory=Settings)
    name: str | None = None  # file and workspace name (default: from the source)
    workspace: Path | None = None  # the model's workspace folder (default ./quants/<name>)
    workspace_root: Path | None = None  # or: the folder that holds one workspace per model (recipes)
    command: str = ""  # the command line, for the card
    label: str = ""  # where the job came from ("quantkit gguf", a recipe file), for messages

    def workspace_for(self, name: str) -> Path:
        """The model's workspace folder once its name is known."""
        from quantkit.workspace import Workspace, safe_dir_name

        if self.workspace is not None:
            return Path(self.workspace).expanduser()
        if self.workspace_root is not None:
            return Path(self.workspace_root) / safe_dir_name(name)
        return Workspace.for_model(name, None, read_only=True).root


@dataclass
class FormatResult:
    """What one format of a job produced: rows for the summary, and the artifacts, report and publish result."""

    format: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # manifest entries with "path"
    eval: dict[str, Any] | None = None
    publish: dict[str, Any] | None = None
    error: BaseException | None = None  # the exception that stopped it (re-raised by a one-model command)


@dataclass
class JobResult:
    """The outcome of one job: per format, and whether anything was computed or published."""

    model: str
    workspace: str | None = None
    formats: list[FormatResult] = field(default_factory=list)
    work: bool = False
    failed: bool = False

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [r for f in self.formats for r in f.rows]


def row(model: str, fmt: str, *, quant: str = "-", status: str, note: str = "", **extra: Any) -> dict[str, Any]:
    """One summary row (an artifact, or a format that was skipped, failed or not run)."""
    return {"model": model, "format": fmt, "quant": quant, "status": status, "note": note, "size": None,
            "bpw": None, "ppl": None, "delta_ppl": None, "kld": None, "artifact": None, "repo": None, "url": None,
            **extra}


def not_run(job: Job, why: str) -> JobResult:
    """The result of a job that did not start."""
    from quantkit.models import default_name

    name = job.name or default_name(job.source)
    return JobResult(model=name, formats=[FormatResult(f.format, rows=[row(name, f.format, status="not run",
                                                                            note=why)]) for f in job.formats])


__all__ = ["FormatJob", "FormatResult", "Job", "JobResult", "Resources", "Settings", "Step", "not_run", "row"]
