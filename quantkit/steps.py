"""A `Step`: one unit of work that a backend (or the pipeline itself) declares once, and that the dry run, the size
estimate, the card, the local executor and the Ray scheduler all read.

A step has a key (``<scope>/<kind>[/<name>]``: ``model/calibrate``, ``gguf/quantize/Q4_K_M``,
``gptq/quantize/4bit-g128``), the keys of the steps whose outputs it reads, the workspace-relative paths it writes,
a fingerprint of everything its outputs depend on, what it asks of the machine, and an `action` that makes the
outputs. The action writes into a staging folder (`StepRun.path`) and returns a `StepResult`; the executor moves
the outputs to their final names and the workspace records them. Actions never touch the manifest.

A step may make some later steps' outputs in the same pass (``fuses``: GGUF converts and quantizes every pending
type while it reads each tensor once); the executor hands it the pending ones (`StepRun.fused`) and records each
of them as finished with its own key and fingerprint. A step whose output names depend on its work (a size-targeted
GGUF is named by the size it reached) returns them in `StepResult.outputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.backends.base import JobContext

MODEL = "model"  # the scope of the steps every format shares
RESOLVE = "model/resolve"
CALIBRATE = "model/calibrate"


def step_key(scope: str, kind: str, name: str | None = None) -> str:
    """The one key scheme: ``<scope>/<kind>`` or ``<scope>/<kind>/<name>``."""
    return f"{scope}/{kind}" + (f"/{name}" if name else "")


@dataclass(frozen=True)
class Resources:
    """What a step asks of the machine that runs it (the Ray scheduler uses it; the local executor ignores it)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int = 0  # bytes; 0 = unknown

    def as_dict(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "gpus": self.gpus, "memory": self.memory}


@dataclass
class StepResult:
    """What an action made.

    - `info`: facts recorded with the step (and returned for a step skipped later, from its record);
    - `outputs`: the workspace-relative paths it wrote, when they differ from the declared ones (split files, a
      name known only after the work);
    - `artifacts`: artifact entries to record (workspace-relative key → entry);
    - `updates`: fields to set on existing artifact entries (a verification report, an evaluation and its gate);
    - `fused`: the results of the later steps made in the same pass, by key.
    """

    info: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    fused: dict[str, StepResult] = field(default_factory=dict)
    checks: dict[str, Any] | None = None  # filled where the action ran: size and sha256 of each output


Action = Callable[["StepRun"], StepResult]


class StepFailure(QuantkitError):
    """A step failed, and what it found is still worth recording on its artifacts (a failed verification)."""

    def __init__(self, message: str, hint: str | None = None, *, updates: dict[str, dict[str, Any]] | None = None
                 ) -> None:
        super().__init__(message, hint)
        self.updates = updates or {}


@dataclass(frozen=True)
class Step:
    """One planned step (see the module docstring). Frozen: the plan is what runs."""

    key: str
    kind: str
    title: str  # what a person reads in the plan and the card
    format: str | None = None  # None: a step every format shares
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # workspace-relative; a folder ends with "/"; "<...>" marks a name known later
    fingerprint: str = ""  # "" when it cannot be known yet (a model not here): never done
    estimated_size: int | None = None  # bytes it writes, when known
    resources: Resources = field(default_factory=Resources)
    action: Action | None = field(default=None, compare=False, repr=False)
    fuses: tuple[str, ...] = ()  # later steps it can make in the same pass
    artifact: str | None = None  # the quant name when its output is an artifact (planned publishing, the card)
    repo: str | None = None  # a publish step's repo
    extra: tuple[tuple[str, Any], ...] = ()  # backend facts for the plan view (tokens_needed, problem, ...)
    # set by the planner:
    done: bool = False
    status: str = "to do"  # done | to do | skip | fails | fails: required
    model: str = ""

    @property
    def dynamic(self) -> bool:
        """Its output names are known only once it has run."""
        return any("<" in o for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """The plan row as ``--dry-run --json`` prints it."""
        return {"key": self.key, "kind": self.kind, "model": self.model, "format": self.format, "step": self.title,
                "output": self.outputs[0] if self.outputs else None, "outputs": list(self.outputs),
                "inputs": list(self.inputs), "fingerprint": self.fingerprint or None,
                "estimated_size": self.estimated_size, "done": self.done, "status": self.status,
                "repo": self.repo, "resources": self.resources.as_dict(), **dict(self.extra)}


@dataclass
class Recorded:
    """A finished step as the workspace recorded it: its outputs (absolute paths) and info."""

    key: str
    fingerprint: str
    outputs: list[Path]
    info: dict[str, Any]
    artifacts: list[str] = field(default_factory=list)  # the artifact keys it made
    checks: dict[str, Any] = field(default_factory=dict)  # workspace-relative output → {size, sha256}

    @property
    def path(self) -> Path:
        """Its first output."""
        return self.outputs[0]


@dataclass
class StepRun:
    """What an action gets: the job's context, where to write, and the steps around it."""

    step: Step
    ctx: JobContext
    staging: Path  # write outputs here, at their workspace-relative paths
    fused: tuple[Step, ...] = ()  # later steps to make in the same pass
    pending: frozenset[str] = frozenset()  # every step this run still has to make (this one included)
    shared: dict[str, Any] = field(default_factory=dict)  # objects steps of one run share in one process
    bar: Any = None  # the progress display (`quantkit.console.progress`)
    inputs: dict[str, Recorded] = field(default_factory=dict)  # the finished steps it reads, by key

    def path(self, rel: str) -> Path:
        """Where to write the output `rel` (workspace-relative); its folder is created."""
        out = self.staging / rel.rstrip("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def input(self, key: str) -> Recorded:
        """A finished input step's record."""
        try:
            return self.inputs[key]
        except KeyError:
            raise KeyError(f"{self.step.key} reads {key}, which is not among its finished inputs") from None

    def final(self, rel: str) -> Path:
        """The final path of the workspace-relative `rel` (for names written into files, never for writing)."""
        return self.ctx.workspace.root / rel.rstrip("/")

    def rel(self, path: Path) -> str:
        """The workspace-relative name of a file written in the staging folder."""
        return Path(path).relative_to(self.staging).as_posix()

    def artifact(self, quant: str, path: Path, *, files: list[Path] | None = None, bpw: float | None = None,
                 step: Step | None = None, **info: Any) -> dict[str, dict[str, Any]]:
        """The manifest entry of an artifact written in the staging folder (a file, or a folder and every visible
        file in it), keyed by its workspace-relative name; `step` when a fused step made it."""
        made = step or self.step
        if files is None:
            files = [path] if path.is_file() else sorted(
                f for f in path.rglob("*") if f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts))
        from quantkit.files import file_sha256

        entry = {"format": made.format, "quant": quant, "files": [self.rel(f) for f in files],
                 "size": sum(f.stat().st_size for f in files), "bpw": bpw, "fingerprint": made.fingerprint,
                 "command": self.ctx.command, **info}
        # what publishing checks each file against: the bytes this step made
        entry["sha256"] = {self.rel(f): file_sha256(f) for f in _expand(files)}
        return {self.rel(path): entry}


def _expand(paths: list[Path]) -> list[Path]:
    """Files, and every visible file in folders."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file()
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            out.append(p)
    return out
