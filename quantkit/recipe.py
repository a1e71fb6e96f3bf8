"""Recipes: one YAML file that says which models to quantize into which formats, how to check them, where to publish.

::

    defaults:                       # every key is optional
      calibration: builtin:ru-mix   # or a .txt/.jsonl/.parquet file (relative to the recipe), or hf:DATASET
      calib_samples: 64
      calib_seq_len: 512
      eval: builtin:ru-eval         # false: no evaluation (and no quality gate)
      ctx: 512                      # evaluation context
      gates: {max_ppl_increase: 0.05, max_kld: 0.05}   # with drift: also max_drift: 0.1
      drift: false                  # true: check that greedy answers to Russian prompts stay in Russian
      workspace: quants             # one folder per model under it (relative to the recipe; default ./quants)
      namespace: my-org             # Hub namespace (default: the token's user)
      private: false
      publish: false
    models:
      - source: T-lite-0.1          # alias, Hub id, local folder (relative to the recipe) or demo
        name: T-lite-0.1            # optional: file and workspace name
        gguf: {types: [Q4_K_M, Q8_0], imatrix: true}      # GGUFOptions
        exl2: {bits: [4.0, 6.5], required: false}          # EXL2Options; required: a failed check() is an error
        gptq: [{bits: 4, group_size: 128}]                 # GPTQOptions, one mapping or a list of variants
        publish: {enabled: true, repos: {gguf: T-lite-0.1-GGUF}}

Each format section is validated by that backend's own options model (plus ``required``), so the options are
defined once. `load_recipe` reports every problem with its file and line; `plan` says what would run (with sizes
estimated from the known parameter count when a model cannot be reached); `run_recipe` runs it: backend steps
are fingerprinted in each workspace, so a rerun skips what is finished.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic import model_validator as _model_validator

from quantkit import console
from quantkit.calibration import DEFAULT_CALIBRATION, DEFAULT_EVAL, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, CalibrationSpec
from quantkit.errors import GateFailed, QuantkitError
from quantkit.models import DEMO_ALIAS, find_known
from quantkit.workspace import fingerprint, safe_dir_name

DEFAULT_WORKSPACE = "quants"
DEFAULT_CTX = 512
ESTIMATED = "estimated from known parameter count"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$", re.ASCII)
_REPO = re.compile(r"^([A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$", re.ASCII)  # the Hub takes ASCII only
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
            if not _REPO.match(repo):
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

    if source == DEMO_ALIAS:
        return source
    local = Path(source).expanduser()
    if local.is_absolute():
        return str(local)
    candidate = base / local
    if candidate.exists() or looks_like_path(source):
        return str(candidate)
    return source


def default_name(spec: str) -> str:
    """The name `resolve` gives a source, without resolving it."""
    if spec == DEMO_ALIAS:
        return "quantkit-demo-ru"
    known = find_known(spec)
    local = Path(spec).expanduser()
    if local.exists():
        return local.resolve().name
    if known is not None:
        return known.alias
    return spec.rstrip("/").split("/")[-1]


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; every problem is reported with the file and line (`RecipeError`)."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"recipe {path} does not exist", "check the path (examples are in recipes/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"cannot read recipe {path}: {exc}", "a recipe is a UTF-8 YAML file") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise RecipeError([Problem(shown, line, "", f"not valid YAML: {exc.problem or exc}",
                                   "check the indentation and quoting")]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(shown, None, "", f"not valid YAML: {exc}", None)]) from None
    if not isinstance(data, dict):
        raise RecipeError([Problem(shown, 1, "", "a recipe is a mapping with `defaults:` and `models:`",
                                   "see recipes/demo.yaml")])
    problems = _duplicate_keys(root, shown)
    schema = recipe_schema()
    spec = None
    try:
        spec = schema.model_validate(data)
    except ValidationError as exc:
        problems += _problems(exc, root, shown, schema)
    if spec is not None:
        problems += _semantic_problems(spec, root, shown, path.parent.resolve())
    problems += _calibration_problems(data, root, shown, path.parent.resolve())
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: (p.line or 0)))
    return Recipe(path.resolve(), spec)


def _duplicate_keys(node: Any, shown: str, where: str = "") -> list[Problem]:
    out: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            k = str(key.value)
            if k in seen:
                out.append(Problem(shown, key.start_mark.line + 1, where.lstrip("."), f"duplicate key '{k}'",
                                   "keep one of them"))
            seen.add(k)
            out += _duplicate_keys(value, shown, f"{where}.{k}")
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, shown, f"{where}[{i}]")
    return out


def _walk(root: Any, loc: tuple[Any, ...]) -> tuple[Any, Any, str, tuple[Any, ...]]:
    """Follow a pydantic location through the YAML nodes: (deepest node, its key node, shown path, rest of loc).

    An integer after a mapping node is the index pydantic gave a single section turned into a list: skipped."""
    node, key_node, shown = root, None, ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if isinstance(node, yaml.SequenceNode) and part < len(node.value):
                node, key_node, shown = node.value[part], None, f"{shown}[{part}]"
                continue
            if isinstance(node, yaml.MappingNode):
                continue
            return node, key_node, shown, loc[i:]
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if match is not None:
                key_node, node = match
                shown = f"{shown}.{part}" if shown else str(part)
                continue
        return node, key_node, shown, loc[i:]
    return node, key_node, shown, ()


def _model_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `loc`."""
    current: Any = schema
    for part in loc:
        if isinstance(part, int):
            continue
        model = _find_model(current)
        if model is None or part not in model.model_fields:
            return None
        current = model.model_fields[part].annotation
    return _find_model(current)


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _problems(exc: ValidationError, root: Any, shown: str, schema: type[BaseModel]) -> list[Problem]:
    out: list[Problem] = []
    seen: dict[tuple[int | None, str], Problem] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        kind = err["type"]
        msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
        hint = None
        if kind == "extra_forbidden":
            node, key_node, where, _ = _walk(root, loc)
            line_node = key_node or node
            parent = _model_at(schema, loc[:-1])
            allowed = [k for k in (parent.model_fields if parent else {})]
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            where = where.rsplit(".", 1)[0] if "." in where else ""
            msg = f"unknown key '{loc[-1]}'"
            hint = (f"did you mean '{close[0]}'? " if close else "") + ("allowed: " + ", ".join(allowed)
                                                                        if allowed else "")
        else:
            node, key_node, where, rest = _walk(root, loc)
            line_node = node
            if kind == "missing":
                msg = f"'{loc[-1]}' is required"
                where = where or "top level"
                hint = _field_description(schema, loc) or None
            else:
                if isinstance(node, yaml.ScalarNode) and (kind.endswith("_type") or kind.endswith("_parsing")):
                    msg = f"{msg}, got {node.value!r}"
                elif kind.endswith("_type") and isinstance(node, yaml.MappingNode | yaml.SequenceNode):
                    msg = f"{msg}, got a {'mapping' if isinstance(node, yaml.MappingNode) else 'list'}"
                if not rest:
                    hint = _field_description(schema, loc)
        line = line_node.start_mark.line + 1 if line_node is not None else None
        key = (line, where)
        if key in seen and kind != "extra_forbidden":  # the branches of a union: one problem, both messages
            if msg not in seen[key].message:
                seen[key].message += f"; or {msg[0].lower() + msg[1:]}"
            continue
        problem = Problem(shown, line, where, msg, hint)
        seen[key] = problem
        out.append(problem)
    return out


def _field_description(schema: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    names = [p for p in loc if not isinstance(p, int)]
    if not names:
        return None
    parent = _model_at(schema, loc[:-1]) if not isinstance(loc[-1], int) else _model_at(schema, loc[:-2])
    info = parent.model_fields.get(str(names[-1])) if parent else None
    return f"{names[-1]}: {info.description}" if info is not None and info.description else None


def _semantic_problems(spec: Any, root: Any, shown: str, base: Path) -> list[Problem]:
    """What the schema cannot see: local folders that do not exist, unknown aliases, two models with one name."""
    from quantkit.source import looks_like_path

    out: list[Problem] = []
    names: dict[str, int] = {}
    for i, entry in enumerate(spec.models):
        node, _, where, _ = _walk(root, ("models", i, "source"))
        line = node.start_mark.line + 1
        src = _source_spec(entry.source, base)
        if src != DEMO_ALIAS and find_known(src) is None:
            local = Path(src)
            if looks_like_path(entry.source) or local.is_absolute():
                if not local.exists():
                    out.append(Problem(shown, line, where, f"no such folder: {src}",
                                       "local paths are relative to the recipe's folder"))
            elif not _HUB_ID.match(src):
                out.append(Problem(shown, line, where, f"unknown model or alias '{entry.source}'",
                                   "use an alias from `quantkit models`, a Hub id (org/name), a folder or demo"))
        name = entry.name or default_name(src)
        if name in names:
            node, _, where, _ = _walk(root, ("models", i))
            out.append(Problem(shown, node.start_mark.line + 1, where,
                               f"two models are named '{name}' (also models[{names[name]}]): they would share a "
                               "workspace", "give one of them a different `name:`"))
        names.setdefault(name, i)
    return out


def _calibration_problems(data: dict[str, Any], root: Any, shown: str, base: Path) -> list[Problem]:
    """Calibration files that are missing or unreadable, at the line that names them (from the raw YAML, so they
    are reported together with schema problems)."""
    from quantkit.calibration import check

    defaults = data.get("defaults") if isinstance(data.get("defaults"), dict) else {}
    places = [(("defaults", "calibration"), defaults.get("calibration"))]
    models = data.get("models") if isinstance(data.get("models"), list) else []
    places += [(("models", i, "calibration"), m.get("calibration"))
               for i, m in enumerate(models) if isinstance(m, dict)]
    out: list[Problem] = []
    for loc, value in places:
        if not isinstance(value, str):
            continue
        try:
            parsed = CalibrationSpec.parse(value)
        except QuantkitError:
            continue  # the schema reports it
        if parsed.kind != "file":
            continue
        relative = not Path(parsed.name).is_absolute()
        try:
            check(str(base / parsed.name if relative else parsed.name))
        except QuantkitError as exc:
            node, _, where, _ = _walk(root, loc)
            out.append(Problem(shown, node.start_mark.line + 1 if node is not None else None, where, exc.message,
                               "calibration files are relative to the recipe's folder" if relative else exc.hint))
    return out


# -- planning -------------------------------------------------------------------------------------------------------
def _demo_ready() -> bool:
    """Whether the demo model is built already (resolving it would build it, which a plan must not do)."""
    from quantkit.demo import demo_folder

    return (demo_folder() / "config.json").exists()


def _gguf_bpw() -> dict[str, float]:
    from quantkit.backends.gguf.backend import APPROX_BPW

    return APPROX_BPW


def estimated_steps(fmt: str, options: BaseModel, n_params: int | None, settings: dict[str, Any],
                    model: str) -> list[dict[str, Any]]:
    """Backend steps without a checkpoint: names and outputs as the backends plan them, sizes from `n_params`."""
    def size(bits: float) -> int | None:
        return int(n_params * bits / 8) if n_params else None

    calib = f"{settings['calibration']} ({settings['calib_samples']}×{settings['calib_seq_len']} tokens)"
    steps: list[dict[str, Any]] = []
    if fmt == "gguf":
        bpw = _gguf_bpw()
        outtype = str(options.outtype).upper()  # type: ignore[attr-defined]
        steps.append({"step": f"convert → {outtype}", "output": f"gguf/{model}-{outtype}.gguf",
                      "estimated_size": size(bpw.get(outtype, 16.0))})
        if options.imatrix and not options.imatrix_file:  # type: ignore[attr-defined]
            steps.append({"step": f"imatrix on {calib}", "output": "gguf/imatrix.gguf", "estimated_size": None})
        for q in options.types:  # type: ignore[attr-defined]
            if q != outtype:
                steps.append({"step": f"quantize → {q}", "output": f"gguf/{model}-{q}.gguf",
                              "estimated_size": size(bpw.get(q, 8.5))})
    elif fmt == "exl2":
        from quantkit.backends.exl2 import bits_name

        steps.append({"step": f"calibration parquet from {calib}", "output": "exl2/calibration.parquet",
                      "estimated_size": None})
        steps.append({"step": "measurement, reused by every bitrate", "output": "exl2/measurement.json",
                      "estimated_size": None})
        for b in options.bits:  # type: ignore[attr-defined]
            steps.append({"step": f"quantize {bits_name(b)[:-3]} bpw (head {options.head_bits} bits)",  # type: ignore
                          "output": f"exl2/{bits_name(b)}/", "estimated_size": size(b + 0.1)})
    elif fmt == "gptq":
        quant = getattr(options, "quant", "gptq")
        bits, group = options.bits, options.group_size  # type: ignore[attr-defined]
        per_weight = bits + (0 if group == -1 else (16 + bits) / group)
        # decoder Linear layers are ~87% of a Llama-style model's parameters; the rest stays 16-bit
        est = int(n_params * (0.87 * per_weight + 0.13 * 16) / 8) if n_params else None
        steps.append({"step": f"gptq:{quant}", "output": f"gptq/{quant}", "estimated_size": est})
    else:
        steps.append({"step": f"{fmt} quantization", "output": f"{fmt}/", "estimated_size": None})
    for s in steps:
        s["done"] = False
    return steps


def _resolve_for_plan(spec: str) -> tuple[Any, str | None]:
    """The checkpoint when it is here (local folder, Hub cache, built demo), else None and why not."""
    from quantkit.source import resolve

    if spec == DEMO_ALIAS and not _demo_ready():
        return None, "the demo model is built on the first run"
    try:
        return resolve(spec, allow_download=False), None
    except QuantkitError as exc:
        if "not in the cache" in exc.message or "unreachable" in exc.message:
            return None, "not in the local Hub cache: downloaded on the first run"
        return None, exc.message


def _workspace_for_plan(root: Path, name: str) -> Any:
    """The model's workspace, opened read-only: a plan reads what is done and creates or writes nothing."""
    from quantkit.workspace import Workspace

    return Workspace(root / safe_dir_name(name), read_only=True)


def _select(recipe: Recipe, only: list[str] | None, models: list[str] | None) -> list[tuple[Any, list[str]]]:
    """(model entry, formats to make) for the models and formats asked for."""
    wanted = [f.strip().lower() for item in only or [] for f in item.split(",") if f.strip()]
    known = backend_sections()
    for f in wanted:
        if f not in known:
            raise QuantkitError(f"--only {f}: not a format", f"formats: {', '.join(known)}")
    chosen = []
    for entry in recipe.models:
        names = {recipe.model_name(entry).lower(), entry.source.lower(), recipe.source_spec(entry).lower()}
        if models and not any(m.lower() in names for m in models):
            continue
        fmts = [f for f in entry.formats() if not wanted or f in wanted]
        if fmts:
            chosen.append((entry, fmts))
    if models:
        all_names = [recipe.model_name(e) for e in recipe.models]
        missing = [m for m in models if not any(m.lower() in {recipe.model_name(e).lower(), e.source.lower()}
                                                for e in recipe.models)]
        if missing:
            raise QuantkitError(f"--model {missing[0]}: no such model in {recipe.path.name}",
                                f"models: {', '.join(all_names)}")
    if not chosen:
        raise QuantkitError("nothing selected: no model of the recipe makes " + ", ".join(wanted or ["any format"]),
                            "check --only and --model")
    return chosen


def plan(recipe: Recipe, *, only: list[str] | None = None, models: list[str] | None = None,
         resolve_models: bool = True) -> dict[str, Any]:
    """What `run_recipe` would do, without doing anything: per model and format, the steps with their outputs,
    estimated sizes, target repos and whether they are done. Models that cannot be reached offline are planned
    from their known parameter count. With ``resolve_models=False`` nothing is looked up (for `validate`).
    Nothing is written: workspaces are opened read-only, and weight hashes are not cached."""
    from quantkit.fingerprint import reading_only

    with reading_only():
        return _plan(recipe, only=only, models=models, resolve_models=resolve_models)


def _plan(recipe: Recipe, *, only: list[str] | None, models: list[str] | None, resolve_models: bool
          ) -> dict[str, Any]:
    from quantkit.backends.base import JobContext, get_backend

    out_models: list[dict[str, Any]] = []
    root = recipe.workspace_root()
    for entry, fmts in _select(recipe, only, models):
        spec = recipe.source_spec(entry)
        st = recipe.settings(entry)
        ckpt, why = _resolve_for_plan(spec) if resolve_models else (None, "not resolved")
        name = entry.name or (ckpt.name if ckpt is not None else default_name(spec))
        known = find_known(spec)
        n_params = ckpt.n_params if ckpt is not None else (round(known.params_b * 1e9) if known else None)
        note = None
        if ckpt is None and resolve_models:
            note = f"{why}; sizes {ESTIMATED} ({known.params_b:g} B)" if known else f"{why}; sizes unknown"
        model_plan: dict[str, Any] = {
            "model": name, "source": entry.source, "workspace": str((root / safe_dir_name(name)).resolve()),
            "resolved": ckpt is not None, "estimated": ckpt is None, "params": n_params, "note": note,
            "formats": [], "steps": [],
        }
        steps = model_plan["steps"]
        here = ckpt is not None
        steps.append({"format": None, "step": f"resolve {entry.source}",
                      "output": str(ckpt.path) if here else (known.hub_id if known else spec),
                      "estimated_size": None if here else (2 * n_params if n_params else None), "done": here})
        ws = _workspace_for_plan(root, name) if here else None
        if here:
            ckpt.name = name
        ctx = JobContext(checkpoint=ckpt, workspace=ws, calibration=st["calibration"],
                         calib_samples=st["calib_samples"], calib_seq_len=st["calib_seq_len"], seed=st["seed"],
                         threads=st["threads"]) if here else None
        steps.append({"format": None, "step": f"calibrate: {st['calibration']} → {st['calib_samples']}×"
                      f"{st['calib_seq_len']} token rows" + (" (chat template)" if here and ckpt.instruct
                                                             else ""),
                      "output": None, "estimated_size": None, "done": None})
        for fmt in fmts:
            fmt_steps, reason, problem = _plan_format(recipe, entry, fmt, ctx, n_params, st, name, get_backend,
                                                      check=resolve_models)
            required = recipe.required(entry, fmt)
            status = None if reason is None else ("fails: required" if required else "skip")
            if problem is not None:
                status = "fails"
            repo = recipe.repo_for(entry, fmt, name) if st["publish"] else None
            backend_done = bool(fmt_steps) and all(s.get("done") for s in fmt_steps)
            for s in fmt_steps:
                s["format"] = fmt
                if status:
                    s["status"] = status
            steps += fmt_steps
            if st["eval"]:
                steps.append({"format": fmt, "step": f"evaluate on {st['eval']} (ctx {st['ctx']}); gate "
                              f"ΔPPL ≤ {st['max_ppl_increase']:.0%}, KLD ≤ {st['max_kld']:g}"
                              + (f"; drift check, ≤ {st['max_drift']:.0%} of answers leaving Russian"
                                 if st.get("drift") else ""),
                              "output": "manifest.json (eval, gate)", "estimated_size": None,
                              "done": backend_done and ws is not None and _evaluated(ws, fmt_steps),
                              **({"status": status} if status else {})})
            if repo:
                shown = repo if "/" in repo else f"<your-username>/{repo}"
                steps.append({"format": fmt, "step": "publish" + (" (private)" if st["private"] else ""),
                              "output": None, "estimated_size": None, "repo": shown,
                              "done": backend_done and ws is not None and ws.is_done(
                                  f"recipe.publish.{fmt}", publish_fingerprint(ws, fmt, repo, st["private"])),
                              **({"status": status} if status else {})})
            model_plan["formats"].append({"format": fmt, "can_run": reason is None, "reason": reason,
                                          "required": required, "problem": problem, "repo": repo})
        calib_step = steps[1]
        runnable = [s for s in steps[2:] if s.get("format") and "status" not in s]
        calib_step["done"] = here and bool(runnable) and all(s.get("done") for s in runnable)
        for s in steps:
            s["model"] = name
            s.setdefault("status", "done" if s.get("done") else "to do")
            s.setdefault("repo", None)
        out_models.append(model_plan)
    all_steps = [s for m in out_models for s in m["steps"]]
    todo = [s for s in all_steps if s["status"] == "to do"]
    return {"recipe": str(recipe.path), "dry_run": True, "models": out_models,
            "steps": len(all_steps), "to_do": len(todo), "done": sum(s["status"] == "done" for s in all_steps),
            "estimated_size": sum(s["estimated_size"] or 0 for s in todo
                                  if s["step"].startswith(("convert", "quantize", "gptq", "resolve"))),
            "estimated": any(m["estimated"] for m in out_models)}


def _plan_format(recipe: Recipe, entry: Any, fmt: str, ctx: Any, n_params: int | None, st: dict[str, Any],
                 name: str, get_backend: Callable[[str], Any], *, check: bool
                 ) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """A format's steps, why it cannot run here (or None), and the error its run would stop with (or None)."""
    reason = problem = None
    backend = None
    if check:
        try:
            backend = get_backend(fmt)
            reason = backend.check()
        except ImportError as exc:
            reason = f"cannot load the {fmt} backend: {exc}"
    steps: list[dict[str, Any]] = []
    for opts in recipe.options(entry, fmt):
        planned = None
        if ctx is not None and backend is not None:
            try:
                planned = backend.plan(ctx, opts)
            except ImportError:
                planned = None  # the backend's packages are missing here: plan from the parameter count
            except QuantkitError as exc:
                problem = str(exc)
            else:
                for s in planned:  # a step is done only while its output exists
                    out = s.get("output")
                    if s.get("done") and out and not Path(out).is_absolute() and not (ctx.workspace.root /
                                                                                      out).exists():
                        s["done"] = False
        steps += planned if planned is not None else estimated_steps(fmt, opts, n_params, st, name)
    return steps, reason, problem


def _evaluated(ws: Any, steps: list[dict[str, Any]]) -> bool:
    keys = [str(s["output"]).rstrip("/") for s in steps if s.get("output")]
    arts = [ws.artifacts.get(k) for k in keys if k in ws.artifacts]
    return bool(arts) and all("eval" in a for a in arts)


def count_steps(recipe: Recipe) -> int:
    """How many steps the recipe has, without looking any model up (for `quantkit recipe validate`)."""
    return plan(recipe, resolve_models=False)["steps"]


# -- running --------------------------------------------------------------------------------------------------------
@dataclass
class _Outcome:
    rows: list[dict[str, Any]] = field(default_factory=list)
    work: bool = False  # something was computed or published
    failed: bool = False


def run_recipe(recipe: Recipe, *, only: list[str] | None = None, models: list[str] | None = None,
               continue_on_error: bool = False) -> dict[str, Any]:
    """Run every selected model × format: backend run (resumable), evaluation with the recipe's gates, publishing.

    Returns the summary: one row per artifact (or per skipped / failed format) and whether anything was done.
    A failure stops the run unless `continue_on_error`; gate failures never stop it (they block publishing)."""
    selected = _select(recipe, only, models)
    rows: list[dict[str, Any]] = []
    work = False
    stopped = False
    for i, (entry, fmts) in enumerate(selected, 1):
        name = recipe.model_name(entry)
        if stopped:
            rows += [_row(name, f, status="not run", note="an earlier step failed") for f in fmts]
            continue
        console.info(f"[bold]── {name}[/] ({i}/{len(selected)}): {', '.join(fmts)}")
        outcome = _run_model(recipe, entry, fmts, continue_on_error)
        rows += outcome.rows
        work = work or outcome.work
        if outcome.failed and not continue_on_error:
            stopped = True
    failed = [r for r in rows if r["status"] in ("failed", "failed gate", "not run")]
    summary = {"recipe": str(recipe.path), "rows": rows, "nothing_to_do": not work and not failed,
               "failed": bool(failed), "gate_only": bool(failed) and all(r["status"] == "failed gate"
                                                                         for r in failed)}
    return summary


def _row(model: str, fmt: str, *, quant: str = "-", status: str, note: str = "", **extra: Any) -> dict[str, Any]:
    return {"model": model, "format": fmt, "quant": quant, "status": status, "note": note, "size": None,
            "bpw": None, "ppl": None, "delta_ppl": None, "kld": None, "artifact": None, "repo": None, "url": None,
            **extra}


def _unavailable(fmt: str, arch: Any = None) -> tuple[Any, str | None]:
    """The backend and why it cannot run here or on this architecture (None when it can)."""
    from quantkit.backends.base import get_backend

    try:
        backend = get_backend(fmt)
    except ImportError as exc:
        return None, f"cannot load the {fmt} backend: {exc}"
    supports = getattr(backend, "supports", None)
    return backend, (supports(arch) if arch is not None and supports else None) or backend.check()


def _run_model(recipe: Recipe, entry: Any, fmts: list[str], keep_going: bool) -> _Outcome:
    """One model: backends that cannot run here are skipped (or fail, when required) before anything is fetched;
    then resolve, and each format in turn."""
    from quantkit.backends.base import JobContext
    from quantkit.lock import holding
    from quantkit.source import architecture_of, resolve
    from quantkit.threads import set_threads
    from quantkit.workspace import Workspace, record_model

    out = _Outcome()
    name = recipe.model_name(entry)
    by_fmt: dict[str, list[dict[str, Any]]] = {}
    backends: dict[str, Any] = {}
    arch = architecture_of(recipe.source_spec(entry))
    for fmt in fmts:
        backend, reason = _unavailable(fmt, arch)
        if reason is None:
            backends[fmt] = backend
        elif recipe.required(entry, fmt):
            msg = f"required by the recipe but cannot run here: {reason}"
            console.console.print(f"[red]{name} {fmt} failed:[/] {msg}", highlight=False)
            by_fmt[fmt] = [_row(name, fmt, status="failed", note=msg)]
            out.failed = True
        else:
            console.warn(f"{name}: skipping {fmt}: {reason}")
            by_fmt[fmt] = [_row(name, fmt, status="skipped", note=reason)]

    def rows() -> list[dict[str, Any]]:
        return [r for f in fmts for r in by_fmt.get(f, [])]

    def not_run(why: str) -> None:
        for f in fmts:
            by_fmt.setdefault(f, [_row(name, f, status="not run", note=why)])

    if not backends or (out.failed and not keep_going):
        not_run("an earlier step failed")
        out.rows = rows()
        return out
    try:
        ckpt = resolve(recipe.source_spec(entry))
        ckpt.tensors  # noqa: B018 - headers and the shard index are checked now, before any work
    except QuantkitError as exc:
        console.console.print(f"[red]{name}: cannot resolve {entry.source}:[/] {exc}", highlight=False)
        for f in backends:
            by_fmt[f] = [_row(name, f, status="failed", note=f"resolve: {exc}")]
        out.failed = True
        out.rows = rows()
        return out
    if entry.name:
        ckpt.name = entry.name
    name = ckpt.name
    st = recipe.settings(entry)
    ws = Workspace(recipe.workspace_root() / safe_dir_name(name))
    set_threads(st["threads"])  # torch, llama.cpp and the child processes
    with holding(ws.root, clean=True):  # one writer: another run on this workspace makes this refuse
        before = _steps_snapshot(ws)
        record_model(ws, ckpt)
        ctx = JobContext(checkpoint=ckpt, workspace=ws, calibration=st["calibration"],
                         calib_samples=st["calib_samples"], calib_seq_len=st["calib_seq_len"], seed=st["seed"],
                         threads=st["threads"],
                         command=f"quantkit run {recipe.path.name}")
        for fmt, backend in backends.items():
            if out.failed and not keep_going:
                break
            try:
                made, published = _run_format(recipe, entry, fmt, backend, ctx, st)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one format's failure is reported, the rest may go on
                msg = str(exc) if isinstance(exc, QuantkitError) else f"{type(exc).__name__}: {exc}"
                console.console.print(f"[red]{name} {fmt} failed:[/] {msg}", highlight=False)
                by_fmt[fmt] = [_row(name, fmt, status="failed", note=msg.splitlines()[0][:300] if msg else "")]
                out.failed = True
                continue
            by_fmt[fmt] = made
            out.work = out.work or published
        not_run("an earlier step failed")
        out.rows = rows()
        out.work = out.work or _steps_snapshot(ws) != before
        return out


def _steps_snapshot(ws: Any) -> str:
    from quantkit.workspace import Workspace

    fresh = Workspace(ws.root)
    return json.dumps({k: (v.get("fingerprint"), v.get("finished")) for k, v in fresh.steps.items()
                       if not k.startswith("recipe.")}, sort_keys=True)


def _run_format(recipe: Recipe, entry: Any, fmt: str, backend: Any, ctx: Any, st: dict[str, Any]
                ) -> tuple[list[dict[str, Any]], bool]:
    """One format of one model: run, evaluate and gate, publish; returns its rows and whether it published."""
    name, ws = ctx.checkpoint.name, ctx.workspace
    artifacts = []
    for opts in recipe.options(entry, fmt):
        console.info(f"{name}: {fmt} {_describe(opts)}")
        artifacts += backend.run(ctx, opts)
    rows = {ws.rel(a.path): _row(name, fmt, quant=a.quant, status="ok", size=a.size, bpw=a.bpw,
                                 artifact=ws.rel(a.path)) for a in artifacts}
    if st["eval"]:
        from quantkit.evaluate import evaluate_workspace

        report = evaluate_workspace(ws, only=[a.path for a in artifacts], eval_spec=st["eval"], n_ctx=st["ctx"],
                                    chunks=st["chunks"], max_ppl_increase=st["max_ppl_increase"],
                                    max_kld=st["max_kld"], drift=_drift_settings(st))
        for r in report.get("rows", []):
            row = rows.get(r.get("artifact"))
            if row is None:
                continue
            if r.get("skipped"):
                row["note"] = f"not evaluated: {r['skipped']}"
                continue
            row.update(ppl=r.get("ppl"), delta_ppl=r.get("delta_ppl"), kld=r.get("kld_mean"))
            if not r.get("passed", True):
                row["status"] = "failed gate"
                row["note"] = "; ".join(r.get("reasons") or [])
        _reload(ws)
    published = False
    if st["publish"]:
        published = _publish(recipe, entry, fmt, ws, st, list(rows.values()))
    return list(rows.values()), published


def _drift_settings(st: dict[str, Any]) -> Any:
    """``drift: true`` in the recipe: the built-in prompts and defaults, gated by ``gates.max_drift``."""
    if not st.get("drift"):
        return None
    from quantkit.generate import DriftSettings

    return DriftSettings(max_drift=st["max_drift"])


def _describe(opts: BaseModel) -> str:
    data = opts.model_dump(exclude_defaults=True)
    return ", ".join(f"{k}={v}" for k, v in data.items()) or "defaults"


def _reload(ws: Any) -> None:
    """Re-read the manifest (another module may have written it through its own Workspace)."""
    from quantkit.workspace import Workspace

    ws.data = Workspace(ws.root).data


def publish_fingerprint(ws: Any, fmt: str, repo: str, private: bool) -> str:
    """What publishing `fmt` depends on: the repo, its visibility, and each artifact's size, fingerprint and gate.
    The run skips publishing, and the plan says it is done, only while this is unchanged."""
    state = sorted((k, e.get("size"), e.get("fingerprint"), (e.get("gate") or {}).get("passed"))
                   for k, e in ws.artifacts.items() if e.get("format") == fmt)
    return fingerprint("publish", repo, private, state)


def _publish(recipe: Recipe, entry: Any, fmt: str, ws: Any, st: dict[str, Any], rows: list[dict[str, Any]]) -> bool:
    """Publish `fmt` unless the same artifacts went to the same repo already; gate failures stay home."""
    from quantkit.publish import publish_format

    repo = recipe.repo_for(entry, fmt, ws.model.get("name") or ws.root.name)
    passing = [r for r in rows if r["status"] != "failed gate"]
    for r in rows:
        if r["status"] == "failed gate":
            r["repo"] = "not published (failed the gate)"
    if not passing:
        console.warn(f"{fmt}: every artifact failed the quality gate; nothing is published")
        return False
    fp = publish_fingerprint(ws, fmt, repo, st["private"])
    step = f"recipe.publish.{fmt}"
    if ws.is_done(step, fp):
        info = ws.step_info(step)
        console.info(f"[dim]skip[/] publishing {fmt}: already on {info.get('url')}")
        for r in passing:
            r.update(repo=info.get("repo"), url=info.get("url"))
        return False
    result = publish_format(ws, fmt, repo=repo, private=st["private"])
    _reload(ws)
    refused = {x.get("artifact") for x in result.get("refused", [])}
    for r in rows:
        if r["artifact"] in refused:
            r["repo"] = "not published (failed the gate)"
            if r["status"] == "ok":
                r["status"] = "failed gate"
        elif r["status"] != "failed gate":
            r.update(repo=result.get("repo"), url=result.get("url"))
    for ref in result.get("refused", []):
        console.warn(f"not published: {ref.get('quant')} failed the quality gate "
                     f"({', '.join(ref.get('reasons') or []) or 'see the eval table'})")
    ws.record_step(step, fp, [], repo=result.get("repo"), url=result.get("url"))
    return True


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
