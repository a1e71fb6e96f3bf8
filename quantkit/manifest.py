"""The workspace manifest's schema: what `manifest.json` may hold, checked whenever it is read or written.

Modules read and write the manifest through `quantkit.workspace.Workspace`; these models are the contract between
them, so a manifest damaged by hand (or a module writing the wrong shape) is caught at the boundary, in one line,
instead of as a KeyError three steps later. Entries allow extra keys: each format records its own facts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quantkit.errors import QuantkitError

VERSION = 1


class OutputCheck(BaseModel):
    """How a recorded output is recognised as intact: its size and content hash."""

    model_config = ConfigDict(extra="allow")

    size: int | None = None
    sha256: str | None = None


class StepRecord(BaseModel):
    """A finished step: its fingerprint, its outputs (workspace-relative) and their checks, the artifacts it made,
    its title (for the card's "how it was made") and what its action reported."""

    model_config = ConfigDict(extra="allow")

    fingerprint: str
    outputs: list[str] = Field(default_factory=list)
    checks: dict[str, OutputCheck | None] = Field(default_factory=dict)
    finished: str = ""
    title: str = ""
    artifacts: list[str] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict)


class ArtifactEntry(BaseModel):
    """A quantized model in the workspace, with what the card, eval and publishing need."""

    model_config = ConfigDict(extra="allow")

    format: str = ""
    quant: str = ""
    files: list[str] = Field(default_factory=list)
    size: int = 0
    bpw: float | None = None
    fingerprint: str | None = None
    eval: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None


class Manifest(BaseModel):
    """The whole manifest."""

    model_config = ConfigDict(extra="allow")

    version: int = VERSION
    model: dict[str, Any] = Field(default_factory=dict)
    steps: dict[str, StepRecord] = Field(default_factory=dict)
    artifacts: dict[str, ArtifactEntry] = Field(default_factory=dict)
    published: dict[str, dict[str, Any]] = Field(default_factory=dict)


def checked(data: Any, where: str) -> dict[str, Any]:
    """`data` when it is a valid manifest; a `QuantkitError` naming the first bad field otherwise."""
    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        at = ".".join(str(p) for p in err.get("loc", ())) or "the top level"
        raise QuantkitError(f"the workspace manifest {where} is corrupt: {at}: {err.get('msg')}",
                            "delete it to start this workspace afresh") from None
    if data.get("version", VERSION) > VERSION:
        raise QuantkitError(f"the workspace manifest {where} was written by a newer quantkit "
                            f"(version {data['version']})", "upgrade quantkit to use this workspace")
    return data
