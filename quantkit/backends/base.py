"""The backend protocol, the context backends plan against, and the registry.

A backend declares the steps that turn a bf16 `Checkpoint` into its artifacts (`steps`, run by the pipeline's
executor), says whether it can run on this machine (`check`), recognises its artifacts (`owns`) and scores them for
`quantkit eval` (`scorer`). It also owns everything else about its format: the card's content and the publish
layout (the hooks of `BackendBase`, whose generic defaults any backend gets; `sections_for` supplies them to a plugin
that does not subclass it). Built-ins are listed in `BUILTIN`; a third-party
package adds a format by declaring an entry point in the ``quantkit.backends`` group that points at a `Backend`
class. A backend that cannot be imported or constructed is reported (`describe_backends`) and skipped, never a
crash for the others.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from quantkit.errors import QuantkitError
from quantkit.settings import Settings
from quantkit.source import Checkpoint
from quantkit.workspace import Workspace

if TYPE_CHECKING:
    from quantkit.steps import Step


@dataclass
class JobContext:
    """What a backend plans and runs against: the checkpoint (None when it is not here yet: a plan from the known
    size), the workspace (None likewise), the run's settings and the command line, for the card."""

    checkpoint: Checkpoint | None
    workspace: Workspace | None
    settings: Settings = field(default_factory=Settings)
    command: str = ""
    name: str = ""  # the model's name (files, workspace): the checkpoint's when it is here
    n_params: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            self.name = self.name or self.checkpoint.name
            if self.n_params is None:
                self.n_params = self.checkpoint.n_params

    @classmethod
    def of(cls, checkpoint: Checkpoint, workspace: Workspace, *, command: str = "", **settings: Any) -> JobContext:
        """A context for `checkpoint` in `workspace` with these settings (the rest default)."""
        return cls(checkpoint=checkpoint, workspace=workspace, settings=Settings(**settings), command=command)

    @property
    def here(self) -> bool:
        """The checkpoint is here: steps have fingerprints and can run."""
        return self.checkpoint is not None and self.workspace is not None

    @property
    def calibration(self) -> str:
        return self.settings.calibration

    @property
    def calib_samples(self) -> int:
        return self.settings.calib_samples

    @property
    def calib_seq_len(self) -> int:
        return self.settings.calib_seq_len

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def threads(self) -> int:
        return self.settings.threads

    @property
    def evaluation(self) -> tuple[str, int] | None:
        """(eval text, chunk length) when this run evaluates after the backend: checks can share its first chunk."""
        return (self.settings.eval, self.settings.ctx) if self.settings.eval else None


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

    def steps(self, ctx: JobContext, options: BaseModel) -> list[Step]:
        """The steps that make this variant's artifacts, in the order they run (`quantkit.steps`): each
        with its key, inputs, outputs, fingerprint, estimated size and action. Called once per run; the same list
        serves the dry run, the card and the executors. With ``ctx.checkpoint`` None (a model not here yet) the
        steps have no fingerprint and sizes are estimated from ``ctx.n_params``."""
        ...

    def owns(self, path: Path) -> bool:
        """True when `path` is an artifact of this format."""
        ...

    def scorer(self, path: Path, *, n_ctx: int) -> Scorer:
        """A scorer for one artifact."""
        ...

    # Format knowledge: optional for a plugin (`BackendBase` has the defaults and documents each hook).
    publish_skip: frozenset[str]

    def format_info(self) -> FormatInfo: ...
    def advice(self, quant: str, bpw: float | None) -> str: ...
    def recommended(self, arts: Entries) -> tuple[str, dict[str, Any]]: ...
    def branches(self, arts: Entries) -> dict[str, str]: ...
    def card_tags(self, ws: Workspace, arts: Entries) -> list[str]: ...
    def card_label(self, repo: str, key: str, entry: dict[str, Any], branch: str) -> str: ...
    def card_usage(self, ctx: CardContext) -> str: ...
    def card_provenance(self, ws: Workspace, arts: Entries) -> list[str]: ...
    def file_texts(self, path: Path) -> list[tuple[str, str, bool]] | None:
        """The text in one of its files that publishing scans for the Hub token and machine paths: (where, text,
        whether a path there matters); None to read it the generic way (text whole, safetensors metadata)."""
        return None

    def shared_files(self, ws: Workspace) -> dict[str, str]: ...
    def repo_path(self, ws: Workspace, key: str, file: Path | None) -> str: ...
    def planned_quant(self, name: str, model: str) -> str | None: ...



Entries = list[tuple[str, dict[str, Any]]]  # (artifact key, manifest entry), best quality first
HUB = "https://huggingface.co"
RECOMMENDED = "✓ рекомендуется"
# what the cards' usage snippets ask an instruct model, and the text a base model continues
PROMPT = "Расскажи в двух предложениях, чем знаменит Байкал."
COMPLETION = "Байкал — самое глубокое озеро на планете. Его вода"


@dataclass(frozen=True)
class FormatInfo:
    """What the card and the publish layout say about a format in words."""

    title: str  # GGUF: headings, the table, the Russian summary
    library: str  # the card's library_name
    tag: str  # the format's Hub tag
    repo_suffix: str  # <Model>-<suffix>, the default repo name
    runtimes: str = "its runtimes"
    calibrated: str = "Calibration used Russian text"
    uses_calibration: bool = True  # False: the card claims no Russian calibration (FP8, MLX round-to-nearest)
    choose_hint: str = ""  # after "Start with **X**."
    item_column: str = "Branch"  # first column of the files table
    too_big_hint: str = "save the model in smaller shards"


@dataclass
class CardContext:
    """What a usage section needs: the repo, the artifacts, their branches and the one to show."""

    ws: Workspace
    repo: str
    arts: Entries
    branches: dict[str, str]  # artifact key → branch
    key: str  # the artifact the snippets show (`recommended`)
    entry: dict[str, Any]

    @property
    def instruct(self) -> bool:
        return bool(self.ws.model.get("instruct"))

    @property
    def model_name(self) -> str:
        return str(self.ws.model.get("name") or self.ws.root.name)

    @property
    def branch(self) -> str:
        return self.branches[self.key]


def calibration_summary(settings: Any) -> str:
    """``builtin:ru-mix (128×512 tokens)`` from run settings: a mapping or an object with ``calibration``,
    ``calib_samples`` and ``calib_seq_len``."""
    def get(key: str) -> Any:
        return settings[key] if isinstance(settings, Mapping) else getattr(settings, key)

    return f"{get('calibration')} ({get('calib_samples')}×{get('calib_seq_len')} tokens)"


def arch_support(arch: Any, flag: str, engine: str) -> str | None:
    """None when the architecture class says it works with this format (its `flag`, e.g. ``gptq``); else its
    `<flag>_note`, or that `engine` does not support it."""
    if getattr(arch, flag, True):
        return None
    return getattr(arch, f"{flag}_note", "") or f"{engine} does not support {'/'.join(arch.hf_names)}"


def relative_path(file: Path, base: Path) -> str:
    """`file` relative to `base` in the repo's notation; its bare name when it lies elsewhere."""
    return file.relative_to(base).as_posix() if file.is_relative_to(base) else file.name


def bits_of(quant: str, bpw: float | None) -> float | None:
    """Bits per weight of an artifact: measured, else the number its name starts with (``4.0bpw``, ``4bit-g128``)."""
    if bpw is not None:
        return bpw
    m = re.match(r"(\d+(?:\.\d+)?)", quant)
    return float(m.group(1)) if m else None


class BackendBase:
    """Generic format knowledge: a backend that subclasses this gets a sensible card section, usage text, advice,
    publish layout (everything on ``main``) and size estimate, and overrides what its format does differently."""

    name: str = ""
    publish_skip: ClassVar[frozenset[str]] = frozenset()  # file names inside artifact folders never published
    # the pipeline adds a verification per artifact (`quantkit.quality.verify`: it loads in the format's engine,
    # tokenizes like the original, gives finite logits) unless the backend verifies in steps of its own
    generic_verify: ClassVar[bool] = True

    def format_info(self) -> FormatInfo:
        """Names for the card metadata and headings."""
        return FormatInfo(title=self.name.upper(), library=self.name, tag=self.name, repo_suffix=self.name.upper())

    def advice(self, quant: str, bpw: float | None) -> str:
        """A plain one-line recommendation (prefixed with `RECOMMENDED` for the ones to start with)."""
        bits = bits_of(quant, bpw)
        if bits is None:
            return ""
        if bits >= 8:
            return "near-lossless"
        if bits >= 6:
            return "highest quality"
        if bits >= 4:
            if bits > 5.0:
                return "high quality"
            balance = "best balance, quality first" if bits > 4.5 else "best balance of size and quality"
            return f"{RECOMMENDED}: {balance}"
        if bits >= 3.5:
            return "small, some quality loss"
        return "smallest, noticeable quality loss"

    def recommended(self, arts: Entries) -> tuple[str, dict[str, Any]]:
        """The artifact usage snippets show: the smallest recommended one that passed the gate, else the middle."""
        good = [(k, e) for k, e in arts if not gate_failed(e)] or arts
        picked = [(k, e) for k, e in good
                  if self.advice(str(e.get("quant", "")), e.get("bpw")).startswith(RECOMMENDED)]
        return picked[-1] if picked else good[len(good) // 2]

    def branches(self, arts: Entries) -> dict[str, str]:
        """Artifact key → the repo branch it is published to."""
        return {k: "main" for k, _ in arts}

    def card_tags(self, ws: Workspace, arts: Entries) -> list[str]:
        """Hub tags after the format's own tag (``imatrix``)."""
        return []

    def card_label(self, repo: str, key: str, entry: dict[str, Any], branch: str) -> str:
        """The first cell of an artifact's row in the files table: a link to where it is."""
        label = branch if branch != "main" else f"main ({Path(key).name})"
        return f"[{label}]({HUB}/{repo}/tree/{branch})"

    def card_usage(self, ctx: CardContext) -> str:
        """The card's "Usage" section."""
        return f"Download with `hf download {ctx.repo}` and load it with a runtime that reads {self.name}."

    def card_provenance(self, ws: Workspace, arts: Entries) -> list[str]:
        """Format-specific lines of "How these files were made", after the calibration lines."""
        return []

    def file_texts(self, path: Path) -> list[tuple[str, str, bool]] | None:
        """The text in one of its files that publishing scans for the Hub token and machine paths: (where, text,
        whether a path there matters); None to read it the generic way (text whole, safetensors metadata)."""
        return None

    def shared_files(self, ws: Workspace) -> dict[str, str]:
        """Files of the format folder published on ``main`` beside the card: name → path in the repo."""
        return {}

    def repo_path(self, ws: Workspace, key: str, file: Path | None) -> str:
        """Where one file of artifact `key` goes in the repo (`file` None: the placeholder of a planned one).
        Default: as it lies in the format folder, so artifacts that share ``main`` keep apart (``4bit/x.bin``)."""
        if file is None:
            return f"({Path(key).name}, to be made)"
        return relative_path(file, ws.root / self.name)

    def planned_quant(self, name: str, model: str) -> str | None:
        """The quant of an output named `name` in the format folder that a dry-run plan lists, or None when that
        output is not an artifact (a calibration file, a measurement)."""
        if name.endswith((".json", ".parquet", ".dat", ".txt", ".safetensors")):
            return None
        return name


HOOKS = ("publish_skip", "format_info", "advice", "recommended", "branches", "card_tags", "card_label", "card_usage",
         "card_provenance", "file_texts", "shared_files", "repo_path", "planned_quant")


class _Adapted(BackendBase):
    """A backend that does not subclass `BackendBase` (or could not load): its own hooks, the defaults for the rest."""

    def __init__(self, name: str, backend: Any = None) -> None:
        self.name = name
        for hook in HOOKS:
            if backend is not None and hasattr(backend, hook):
                setattr(self, hook, getattr(backend, hook))


def sections_for(name: str) -> BackendBase:
    """The format knowledge of backend `name`; generic when the backend cannot load or leaves hooks out."""
    try:
        backend: Any = get_backend(name)
    except QuantkitError:
        backend = None
    return backend if isinstance(backend, BackendBase) else _Adapted(name, backend)


def gate_failed(entry: dict[str, Any]) -> bool:
    """The artifact was evaluated and failed the quality gate."""
    gate = entry.get("gate")
    return isinstance(gate, dict) and gate.get("passed") is False


BUILTIN: dict[str, str] = {
    "gguf": "quantkit.backends.gguf.backend:GGUFBackend",
    "gptq": "quantkit.backends.gptq:GPTQBackend",
    "exl2": "quantkit.backends.exl2:EXL2Backend",
    "awq": "quantkit.backends.awq:AWQBackend",
    "fp8": "quantkit.backends.fp8.backend:FP8Backend",
    "mlx": "quantkit.backends.mlx.backend:MLXBackend",
}
REQUIRED = ("name", "description", "options_model", "check", "steps", "owns", "scorer")


class BackendLoadError(QuantkitError, ImportError):
    """A registered backend that cannot be imported or constructed (a broken or half-installed plugin)."""


def tool_version(dist: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def tool_versions(*dists: str, missing: bool = True) -> dict[str, str | None]:
    """Versions of `dists` (recorded with every artifact); without `missing`, absent ones are left out."""
    found = {d: tool_version(d) for d in dists}
    return found if missing else {d: v for d, v in found.items() if v is not None}


def _load(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _registry() -> dict[str, str | Any]:
    found: dict[str, str | Any] = dict(BUILTIN)
    try:
        points = list(entry_points(group="quantkit.backends"))
    except Exception:  # noqa: BLE001 - unreadable metadata of some installed package must not hide the built-ins
        points = []
    for ep in points:
        found.setdefault(ep.name, ep)
    return found


def list_backends() -> list[str]:
    """Every registered backend name, loadable or not."""
    return list(_registry())


def get_backend(name: str) -> Backend:
    """A backend by name (built-in or entry point); `BackendLoadError` when it cannot be imported or built."""
    reg = _registry()
    if name not in reg:
        raise QuantkitError(f"unknown backend '{name}'", f"available: {', '.join(reg)}")
    target = reg[name]
    try:
        cls = _load(target) if isinstance(target, str) else target.load()
        backend = cls()
    except Exception as exc:  # noqa: BLE001 - whatever a plugin raises, it is that plugin's problem alone
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise BackendLoadError(f"backend '{name}' cannot load: {reason}",
                               "reinstall or remove the package that provides it") from exc
    lacking = [attr for attr in REQUIRED if not hasattr(backend, attr)]
    if lacking:
        raise BackendLoadError(f"backend '{name}' cannot load: it lacks {', '.join(lacking)}",
                               "the plugin does not implement quantkit's Backend protocol")
    return backend


def describe_backends() -> list[dict[str, Any]]:
    """One row per registered backend: name, description, whether it runs here and why not (``cannot load: ...``
    for a backend that fails to import or construct; the others are listed all the same)."""
    rows = []
    for name in list_backends():
        try:
            backend = get_backend(name)
            desc = str(backend.description)
            reason = backend.check()
        except BackendLoadError as exc:
            desc, reason = "", exc.message.replace(f"backend '{name}' ", "", 1)
        except Exception as exc:  # noqa: BLE001 - a check() that raises is that backend's problem alone
            desc, reason = "", f"cannot check: {type(exc).__name__}: {exc}"
        rows.append({"name": name, "description": desc, "available": reason is None, "reason": reason})
    return rows


def backend_for(path: Path) -> Backend:
    """The backend whose artifact `path` is; a clear error for an unknown format. Broken backends are skipped."""
    for name in list_backends():
        try:
            backend = get_backend(name)
            if backend.owns(path):
                return backend
        except Exception:  # noqa: BLE001 - a broken plugin must not keep the others from recognising their files
            continue
    raise QuantkitError(f"{path} is not an artifact quantkit knows (a file or folder of: {', '.join(list_backends())})",
                        "pass a workspace, a .gguf file, or a quantized model folder")
