"""Loading a recipe: YAML → schema, with every problem reported at its file and line."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from quantkit.calibration import CalibrationSpec
from quantkit.errors import QuantkitError
from quantkit.hubname import HUB_ID
from quantkit.models import default_name, find_known
from quantkit.recipe.schema import Problem, Recipe, RecipeError, _source_spec, recipe_schema
from quantkit.workspace import safe_dir_name


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
    names: dict[str, tuple[int, int]] = {}
    for i, entry in enumerate(spec.models):
        node, _, where, _ = _walk(root, ("models", i, "source"))
        line = node.start_mark.line + 1
        src = _source_spec(entry.source, base)
        if find_known(src) is None:
            local = Path(src)
            if looks_like_path(entry.source) or local.is_absolute():
                if not local.exists():
                    out.append(Problem(shown, line, where, f"no such folder: {src}",
                                       "local paths are relative to the recipe's folder"))
            elif not HUB_ID.match(src):
                out.append(Problem(shown, line, where, f"unknown model or alias '{entry.source}'",
                                   "use an alias from `quantkit models`, a Hub id (org/name), a folder or demo"))
        name = entry.name or default_name(src)
        folder = safe_dir_name(name)  # the workspace folder: names that differ only there still collide
        if folder in names:
            node, _, where, _ = _walk(root, ("models", i))
            j, first_line = names[folder]
            out.append(Problem(shown, node.start_mark.line + 1, where,
                               f"models[{j}] (line {first_line}) and models[{i}] (line {node.start_mark.line + 1}) "
                               f"would share the workspace {folder}/", "give one of them a different `name:`"))
        names.setdefault(folder, (i, _walk(root, ("models", i))[0].start_mark.line + 1))
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


