"""The recipe file's schema: defaults, per-model entries, and one section per registered backend (validated by
that backend's own options model), plus `Recipe`, the validated file with its folder."""


from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    create_model,
    field_validator,
)
from pydantic import model_validator as _model_validator

from quantkit.calibration import DEFAULT_CALIBRATION, DEFAULT_EVAL, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, CalibrationSpec
from quantkit.errors import QuantkitError
from quantkit.hubname import HUB_ID, REPO_NAME
from quantkit.models import default_name, find_known

DEFAULT_WORKSPACE = "quants"
DEFAULT_CTX = 512
ESTIMATED = "estimated from known parameter count"
_RECIPE_KEYS = ("required",)  # keys a format section adds to the backend's options


# -- schema ---------------------------------------------------------------------------------------------------------
def _eval_spec(value: Any) -> Any:
    """``true`` → the default eval set, ``false``/null → no evaluation, a string → a checked spec."""
    if value is True:
        return DEFAULT_EVAL
    if value is False or value is None:
        return None
    if isinstance(value, str):
        return _calibration_spec(value)
    raise ValueError("eval must be a text spec like builtin:ru-eval, or false to skip evaluation")


def _calibration_spec(value: str) -> str:
    try:
        CalibrationSpec.parse(value)
    except QuantkitError as exc:
        raise ValueError(str(exc)) from None
    return value


EvalSpec = Annotated[str | None, BeforeValidator(_eval_spec)]


class Gates(BaseModel):
    """The quality gate: an artifact past either bound is not published."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_ppl_increase: float = Field(0.05, ge=0, description="largest relative PPL increase over bf16 (0.05 = 5%)")
    max_kld: float = Field(0.05, ge=0, description="largest mean KL-divergence from bf16")
    max_drift: float = Field(0.1, ge=0, le=1, description="with drift: largest share of answers that left Russian")


class Defaults(BaseModel):
    """Settings for every model of the recipe."""

    model_config = ConfigDict(extra="forbid", strict=True)

    calibration: str = Field(DEFAULT_CALIBRATION, description="builtin:ru-mix, a .txt/.jsonl/.parquet file or "
                                                              "hf:DATASET[:SPLIT[:COLUMN]]")
    calib_samples: int = Field(DEFAULT_SAMPLES, ge=1, description="calibration rows")
    calib_seq_len: int = Field(DEFAULT_SEQ_LEN, ge=16, description="tokens per calibration row")
    seed: int = Field(0, description="seed of the calibration shuffle")
    threads: int = Field(0, ge=0, description="CPU threads (0 = every core)")
    eval: EvalSpec = Field(DEFAULT_EVAL, description="evaluation text (builtin:ru-eval), or false")
    ctx: int = Field(DEFAULT_CTX, ge=16, description="evaluation context in tokens")
    chunks: int | None = Field(None, ge=1, description="evaluate only this many chunks")
    drift: bool = Field(False, description="also check that greedy answers to Russian prompts stay in Russian")
    gates: Gates = Field(default_factory=Gates, description="max_ppl_increase and max_kld")
    workspace: str | None = Field(None, description="folder that holds one workspace per model")
    namespace: str | None = Field(None, description="Hub user or organisation to publish under")
    private: bool = Field(False, description="create Hub repos as private")
    publish: bool = Field(False, description="publish every format after evaluation")

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, value: str) -> str:
        return _calibration_spec(value)

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", value):
            raise ValueError(f"'{value}' is not a Hub user or organisation name")
        return value


class PublishOverride(BaseModel):
    """Per-model publishing: on or off, private or not, and repo names per format."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool | None = Field(None, description="publish this model (default: defaults.publish)")
    private: bool | None = Field(None, description="create its repos as private (default: defaults.private)")
    repos: dict[str, str] = Field(default_factory=dict, description="format → repo name or NAMESPACE/NAME")

    @field_validator("repos")
    @classmethod
    def _repos(cls, value: dict[str, str]) -> dict[str, str]:
        formats = backend_sections()
        for fmt, repo in value.items():
            if fmt not in formats:
                raise ValueError(f"'{fmt}' is not a format (formats: {', '.join(formats)})")
            if not (HUB_ID.match(repo) or REPO_NAME.match(repo)):  # the Hub takes ASCII only
                raise ValueError(f"'{repo}' is not a Hub repo name (NAME or NAMESPACE/NAME)")
        return value


def _publish_shorthand(value: Any) -> Any:
    return {"enabled": value} if isinstance(value, bool) else value


def _variants(value: Any) -> Any:
    """A format section is one mapping or a list of them; an empty section means the backend's defaults."""
    if value is None:
        return [{}]
    if isinstance(value, dict):
        return [value]
    return value


class ModelBase(BaseModel):
    """One model of a recipe; the format sections are added per registered backend (`recipe_schema`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    source: str = Field(description="alias (quantkit models), Hub id, local folder or demo")
    name: str | None = Field(None, description="name for files and the workspace (default: from the source)")
    calibration: str | None = Field(None, description="overrides defaults.calibration")
    calib_samples: int | None = Field(None, ge=1, description="overrides defaults.calib_samples")
    calib_seq_len: int | None = Field(None, ge=16, description="overrides defaults.calib_seq_len")
    publish: Annotated[PublishOverride, BeforeValidator(_publish_shorthand)] = Field(
        default_factory=PublishOverride, description="true/false, or {enabled, private, repos: {FORMAT: REPO}}")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("source is empty")
        return value.strip()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", value):
            raise ValueError(f"'{value}' is not a usable name (letters, digits, '.', '-', '_')")
        return value

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, value: str | None) -> str | None:
        return None if value is None else _calibration_spec(value)

    _order: list[str] = PrivateAttr(default_factory=list)

    @_model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Callable[[Any], ModelBase]) -> ModelBase:
        entry = handler(data)
        if isinstance(data, dict):
            entry._order = [k for k in data if k in backend_sections()]
        return entry

    def formats(self) -> dict[str, list[BaseModel]]:
        """Format → its option variants, in the order the recipe lists them."""
        order = self._order + [f for f in backend_sections() if f not in self._order]
        return {fmt: list(getattr(self, fmt)) for fmt in order if getattr(self, fmt, None)}

    @_model_validator(mode="after")
    def _some_format(self) -> ModelBase:
        if not self.formats():
            raise ValueError(f"no format to make: add one of {', '.join(f + ':' for f in backend_sections())}")
        unused = [f for f in self.publish.repos if f not in self.formats()]
        if unused:
            raise ValueError(f"publish.repos names {', '.join(unused)}, which this model does not make")
        return self


def backend_options(section: BaseModel) -> BaseModel:
    """A recipe format section → the backend's own options object (without the recipe's keys)."""
    base = type(section).__mro__[1]
    return base.model_validate(section.model_dump(exclude=set(_RECIPE_KEYS)))


@functools.cache
def backend_sections() -> dict[str, type[BaseModel]]:
    """Format name → the options model of its recipe section (the backend's options + ``required``)."""
    from quantkit.backends.base import get_backend, list_backends

    out: dict[str, type[BaseModel]] = {}
    for name in list_backends():
        try:
            options = get_backend(name).options_model
        except Exception:  # noqa: BLE001 - a broken third-party backend must not break recipes for the others
            continue
        out[name] = create_model(
            f"Recipe{options.__name__}", __base__=options,
            required=(bool, Field(False, description="fail (not skip) when this backend cannot run here")),
        )
    return out


@functools.cache
def recipe_schema() -> type[BaseModel]:
    """The pydantic model of a whole recipe file."""
    fields: dict[str, Any] = {
        fmt: (Annotated[list[section], BeforeValidator(_variants)], Field(  # type: ignore[valid-type]
            default_factory=list, description=f"{fmt} options ({section.__mro__[1].__name__})"))
        for fmt, section in backend_sections().items()
    }
    model_entry = create_model("ModelEntry", __base__=ModelBase, **fields)
    return create_model(
        "RecipeSpec", __config__=ConfigDict(extra="forbid", strict=True),
        description=(str | None, Field(None, description="free text")),
        defaults=(Defaults, Field(default_factory=Defaults, description="settings for every model")),
        models=(list[model_entry], Field(min_length=1, description="the models to quantize")),  # type: ignore
    )


# -- loading, with problems pointing at lines -----------------------------------------------------------------------
@dataclass
class Problem:
    """One thing wrong with a recipe, at a line."""

    file: str
    line: int | None
    where: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        at = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{at}: {self.where + ': ' if self.where else ''}{self.message}"
        return text + (f" ({self.hint})" if self.hint else "")


class RecipeError(QuantkitError):
    """A recipe that does not validate; `problems` lists each one with its line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = [str(p) for p in problems]
        message = lines[0] if len(lines) == 1 else f"{len(lines)} problems in the recipe:\n  " + "\n  ".join(lines)
        super().__init__(message, None)


@dataclass
class Recipe:
    """A validated recipe and where it came from (relative paths in it are relative to its folder)."""

    path: Path
    spec: Any  # the `recipe_schema()` instance

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def defaults(self) -> Defaults:
        return self.spec.defaults

    @property
    def models(self) -> list[Any]:
        return list(self.spec.models)

    def workspace_root(self) -> Path:
        ws = self.defaults.workspace
        return self.base_dir / Path(ws).expanduser() if ws else Path(DEFAULT_WORKSPACE)

    def source_spec(self, entry: Any) -> str:
        """What to hand to `quantkit.source.resolve`: relative local paths are taken from the recipe's folder."""
        return _source_spec(entry.source, self.base_dir)

    def model_name(self, entry: Any) -> str:
        return entry.name or default_name(self.source_spec(entry))

    def settings(self, entry: Any) -> dict[str, Any]:
        """The effective settings of one model (defaults with its overrides; file paths made absolute)."""
        d = self.defaults
        publish = entry.publish
        return {
            "calibration": self._file_spec(entry.calibration or d.calibration),
            "calib_samples": entry.calib_samples or d.calib_samples,
            "calib_seq_len": entry.calib_seq_len or d.calib_seq_len,
            "seed": d.seed, "threads": d.threads,
            "eval": self._file_spec(d.eval) if d.eval else None,
            "ctx": d.ctx, "chunks": d.chunks,
            "max_ppl_increase": d.gates.max_ppl_increase, "max_kld": d.gates.max_kld,
            "drift": d.drift, "max_drift": d.gates.max_drift,
            "publish": d.publish if publish.enabled is None else publish.enabled,
            "private": d.private if publish.private is None else publish.private,
            "namespace": d.namespace,
        }

    def _file_spec(self, spec: str) -> str:
        parsed = CalibrationSpec.parse(spec)
        if parsed.kind == "file" and not Path(parsed.name).is_absolute():
            return str(self.base_dir / parsed.name)
        return spec

    def repo_for(self, entry: Any, fmt: str, name: str) -> str:
        """The repo to publish `fmt` of this model to: NAMESPACE/NAME, or a bare NAME (the token's user)."""
        from quantkit.card import format_info
        from quantkit.hubname import hub_safe_name

        repo = entry.publish.repos.get(fmt) or f"{hub_safe_name(name)}-{format_info(fmt)[2]}"
        if "/" in repo or not self.defaults.namespace:
            return repo
        return f"{self.defaults.namespace}/{repo}"

    def options(self, entry: Any, fmt: str) -> list[BaseModel]:
        """The backend options of each variant, with relative file paths (imatrix_file) made absolute."""
        out = []
        for section in getattr(entry, fmt):
            opts = backend_options(section)
            path = getattr(opts, "imatrix_file", None)
            if path and not Path(path).expanduser().is_absolute():
                opts = opts.model_copy(update={"imatrix_file": str(self.base_dir / path)})
            out.append(opts)
        return out

    def required(self, entry: Any, fmt: str) -> bool:
        return any(getattr(s, "required", False) for s in getattr(entry, fmt))


def _source_spec(source: str, base: Path) -> str:
    from quantkit.source import looks_like_path

    known = find_known(source)
    if known is not None and known.built_here:
        return source
    local = Path(source).expanduser()
    if local.is_absolute():
        return str(local)
    candidate = base / local
    if candidate.exists() or looks_like_path(source):
        return str(candidate)
    return source


