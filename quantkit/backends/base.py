"""The backend protocol, the artifacts backends produce, and the registry.

A backend turns a bf16 `Checkpoint` into one or more artifacts in the workspace (`run`), says whether it can
run on this machine (`check`), recognises its artifacts (`owns`) and scores them for `quantkit eval`
(`scorer`). Built-ins are listed in `BUILTIN`; a third-party package adds a format by declaring an entry point
in the ``quantkit.backends`` group that points at a `Backend` class.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from quantkit.calibration import DEFAULT_CALIBRATION, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from quantkit.errors import QuantkitError
from quantkit.source import Checkpoint
from quantkit.workspace import Workspace


@dataclass
class Artifact:
    """One quantized model: a file (GGUF) or a folder (GPTQ, EXL2), with what the card and eval need."""

    format: str  # gguf | gptq | exl2 | ...
    quant: str  # Q4_K_M, 4bit-g128, 4.0bpw
    path: Path  # the main file, or the folder
    files: list[Path] = field(default_factory=list)  # every file that belongs to it (split parts, shards)
    size: int = 0  # bytes on disk
    bpw: float | None = None  # bits per weight over the quantized tensors
    info: dict[str, Any] = field(default_factory=dict)

    def to_manifest(self, ws: Workspace) -> dict[str, Any]:
        return {
            "format": self.format,
            "quant": self.quant,
            "files": [ws.rel(p) for p in self.files or [self.path]],
            "size": self.size,
            "bpw": self.bpw,
            **self.info,
        }


@dataclass
class JobContext:
    """Everything a backend run needs besides its own options."""

    checkpoint: Checkpoint
    workspace: Workspace
    calibration: str = DEFAULT_CALIBRATION
    calib_samples: int = DEFAULT_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    threads: int = 0  # 0 = every core
    command: str = ""  # the command line, for the card


@runtime_checkable
class Scorer(Protocol):
    """Gives next-token logits for one chunk of token ids; used by `quantkit eval` for every format."""

    name: str
    n_vocab: int

    def chunk_logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 ``[len(tokens) - first, n_vocab]``: logits at positions ``first .. len(tokens) - 1``."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """What every format implements."""

    name: str  # gguf, gptq, exl2: also the CLI command and the workspace folder
    description: str
    options_model: type[BaseModel]

    def check(self) -> str | None:
        """None when this backend can run here; otherwise the reason (missing package, no CUDA)."""
        ...

    def plan(self, ctx: JobContext, options: BaseModel) -> list[dict[str, Any]]:
        """What `run` would do, without doing it: one dict per step or file
        (``{"step", "output", "estimated_size", "done"}``), for ``--dry-run`` and recipe plans."""
        ...

    def run(self, ctx: JobContext, options: BaseModel) -> list[Artifact]:
        """Produce the artifacts (skipping finished steps) and record them in the workspace manifest."""
        ...

    def owns(self, path: Path) -> bool:
        """True when `path` is an artifact of this format."""
        ...

    def scorer(self, path: Path, *, n_ctx: int) -> Scorer:
        """A scorer for one artifact."""
        ...


BUILTIN: dict[str, str] = {
    "gguf": "quantkit.backends.gguf.backend:GGUFBackend",
    "gptq": "quantkit.backends.gptq:GPTQBackend",
    "exl2": "quantkit.backends.exl2:EXL2Backend",
}


def _load(target: str) -> Backend:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls()


def _registry() -> dict[str, str | Any]:
    found: dict[str, str | Any] = dict(BUILTIN)
    for ep in entry_points(group="quantkit.backends"):
        found.setdefault(ep.name, ep)
    return found


def list_backends() -> list[str]:
    return list(_registry())


def get_backend(name: str) -> Backend:
    """A backend by name (built-in or entry point)."""
    reg = _registry()
    if name not in reg:
        raise QuantkitError(f"unknown backend '{name}'", f"available: {', '.join(reg)}")
    target = reg[name]
    if isinstance(target, str):
        return _load(target)
    return target.load()()


def backend_for(path: Path) -> Backend:
    """The backend whose artifact `path` is; a clear error for an unknown format."""
    for name in list_backends():
        try:
            backend = get_backend(name)
        except ImportError:
            continue
        if backend.owns(path):
            return backend
    raise QuantkitError(f"{path} is not an artifact quantkit knows (GGUF file, GPTQ or EXL2 folder)",
                        "pass a workspace, a .gguf file, or a quantized model folder")
