"""What a run is asked to do (`Job`), what it is planned into (`Step`) and what came out (`JobResult`).

A `Job` is one model and the formats to make of it, with every setting already decided: `quantkit gguf MODEL ...`
builds one from its flags, a recipe builds one per model. Jobs are frozen and picklable, so an executor can hand
them to another process or machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantkit.calibration import DEFAULT_CALIBRATION, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN

DEFAULT_CTX = 512
DEFAULT_MAX_PPL_INCREASE = 0.05
DEFAULT_MAX_KLD = 0.05
DEFAULT_MAX_DRIFT = 0.1

# step kinds, in the order a model's steps run
KINDS = ("resolve", "calibrate", "convert", "imatrix", "measure", "quantize", "target", "verify", "evaluate",
         "publish")


@dataclass(frozen=True)
class Settings:
    """Everything about a run that is not a backend option: calibration, evaluation and gates, publishing."""

    calibration: str = DEFAULT_CALIBRATION
    calib_samples: int = DEFAULT_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    threads: int = 0  # 0 = every core
    eval: str | None = None  # evaluation text spec; None = no evaluation and no gate
    ctx: int = DEFAULT_CTX
    chunks: int | None = None
    max_ppl_increase: float = DEFAULT_MAX_PPL_INCREASE
    max_kld: float = DEFAULT_MAX_KLD
    drift: bool = False
    max_drift: float = DEFAULT_MAX_DRIFT
    publish: bool = False
    private: bool = False
    force: bool = False  # publish artifacts that failed the gate too

    def gate_text(self) -> str:
        text = f"gate ΔPPL ≤ {self.max_ppl_increase:.0%}, KLD ≤ {self.max_kld:g}"
        return text + (f"; drift check, ≤ {self.max_drift:.0%} of answers leaving Russian" if self.drift else "")


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


@dataclass(frozen=True)
class Resources:
    """What a step asks of the machine that runs it (executors that schedule use it; the local one ignores it)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int = 0  # bytes; 0 = unknown

    def as_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "gpus": self.gpus, "memory": self.memory}


@dataclass(frozen=True)
class Step:
    """One planned step: a stable key, what kind of work it is, what it reads and writes, and whether it is done."""

    key: str  # "<model>/<format>/<kind>/<output>", unique within a plan
    kind: str  # one of KINDS (a plugin may add its own)
    model: str
    format: str | None
    title: str  # what a person reads in the plan
    outputs: tuple[str, ...] = ()  # workspace-relative paths (or a Hub id for a download)
    inputs: tuple[str, ...] = ()  # keys of the steps whose outputs it reads
    estimated_size: int | None = None  # bytes it writes, when known
    done: bool | None = False  # None: not known until the run (calibration rows)
    status: str = "to do"  # done | to do | skip | fails | fails: required
    resources: Resources = field(default_factory=Resources)
    repo: str | None = None  # publish steps: the target repo
    extra: tuple[tuple[str, Any], ...] = ()  # backend facts for the plan view (tokens_needed, ...)

    def to_dict(self) -> dict[str, Any]:
        """The plan row as `--dry-run --json` prints it."""
        return {"key": self.key, "kind": self.kind, "model": self.model, "format": self.format, "step": self.title,
                "output": self.outputs[0] if self.outputs else None, "outputs": list(self.outputs),
                "inputs": list(self.inputs), "estimated_size": self.estimated_size, "done": self.done,
                "status": self.status, "repo": self.repo, "resources": self.resources.as_dict(), **dict(self.extra)}


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
