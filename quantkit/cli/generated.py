"""Format commands generated from a backend's options model (mergekit's options pattern): every field becomes a
flag with its description as help, so a format declares its options once and a plugin backend gets
`quantkit <format> MODEL ...` without a line in quantkit.

A field may name its flag(s) with ``json_schema_extra={"cli": ["--bits", "-b"]}``; booleans become
``--flag/--no-flag``; a list takes a comma list or repeats (``--bits 4.0,5.0`` or ``--bits 4.0 --bits 5.0``).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from quantkit.cli.options import (
    DEFAULTS,
    Calibration,
    CalibSamples,
    CalibSeqLen,
    DryRunOpt,
    EvalOpt,
    ForceOpt,
    JsonOpt,
    PrivateOpt,
    PushOpt,
    QuietOpt,
    RepoOpt,
    ThreadsOpt,
    WorkspaceOpt,
    build_options,
    handle_errors,
    setup_output,
)

Model = Annotated[str, typer.Argument(metavar="MODEL",
                                      help="Alias (quantkit models), Hub id, local folder, or 'demo'.")]
# the options every format command shares: (name, annotation, default)
SHARED: list[tuple[str, Any, Any]] = [
    ("evaluate", EvalOpt, False), ("calibration", Calibration, DEFAULTS["calibration"]),
    ("calib_samples", CalibSamples, DEFAULTS["calib_samples"]), ("calib_seq_len", CalibSeqLen,
                                                                 DEFAULTS["calib_seq_len"]),
    ("workspace", WorkspaceOpt, None), ("threads", ThreadsOpt, 0), ("push", PushOpt, False), ("repo", RepoOpt, None),
    ("private", PrivateOpt, False), ("dry_run", DryRunOpt, False), ("force", ForceOpt, False),
    ("json_output", JsonOpt, False), ("quiet", QuietOpt, False),
]
_SCALARS = (str, int, float, bool, Path)


def _unwrap(annotation: Any) -> tuple[Any, bool, bool]:
    """(scalar type, is a list, may be None) of a field's annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
        origin = typing.get_origin(annotation)
    if origin in (list, tuple, set):
        inner = (typing.get_args(annotation) or (str,))[0]
        return (inner if inner in _SCALARS else str), True, optional
    if typing.get_origin(annotation) is typing.Literal:
        return str, False, optional
    return (annotation if annotation in _SCALARS else str), False, optional


def option_params(options_model: type[BaseModel]) -> list[tuple[str, Any, Any]]:
    """One typer option per field of `options_model`: (parameter name, annotation, default)."""
    out = []
    for name, field in options_model.model_fields.items():
        scalar, is_list, optional = _unwrap(field.annotation)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flags = list(extra.get("cli") or ["--" + name.replace("_", "-")])
        help_text = field.description or name.replace("_", " ")
        if is_list:
            start = field.get_default(call_default_factory=True)
            shown = f"; default: {','.join(str(v) for v in start)}" if start else ""
            annotation: Any = Annotated[list[str] | None, typer.Option(
                *flags, metavar="A,B,...", help=f"{help_text} (comma list or repeated{shown})")]
            default = None
        elif scalar is bool:
            flag = flags[0]
            annotation = Annotated[bool, typer.Option(f"{flag}/--no-{flag[2:]}", *flags[1:], help=help_text)]
            default = bool(field.default) if field.default is not PydanticUndefined else False
        else:
            default = None if field.default is PydanticUndefined or optional else field.default
            hint = scalar | None if default is None else scalar
            annotation = Annotated[hint, typer.Option(*flags, help=help_text)]
        out.append((name, annotation, default))
    return out


def _values(options_model: type[BaseModel], given: dict[str, Any]) -> dict[str, Any]:
    """Command-line values → field values (comma lists split; unset lists left to the model's default)."""
    out: dict[str, Any] = {}
    for name in options_model.model_fields:
        value = given.get(name)
        if isinstance(value, list):
            value = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        if value is not None:
            out[name] = value
    return out


def format_command(name: str, options_model: type[BaseModel], doc: str) -> Callable[..., None]:
    """The `quantkit <name> MODEL [options]` command of a backend, built from its options model."""
    from quantkit.cli.common import run_format

    fields = option_params(options_model)
    clash = {f for f, _, _ in fields} & ({"model"} | {s for s, _, _ in SHARED})
    if clash:
        raise TypeError(f"backend {name}: option(s) {', '.join(sorted(clash))} clash with the shared options")

    def command(**kwargs: Any) -> None:
        setup_output(kwargs["quiet"], kwargs["json_output"])
        options = build_options(options_model, f"see quantkit {name} --help", **_values(options_model, kwargs))
        run_format(name, kwargs["model"], options, calibration=kwargs["calibration"],
                   calib_samples=kwargs["calib_samples"], calib_seq_len=kwargs["calib_seq_len"],
                   workspace=kwargs["workspace"], json_output=kwargs["json_output"], evaluate=kwargs["evaluate"],
                   push=kwargs["push"], repo=kwargs["repo"], private=kwargs["private"], dry_run=kwargs["dry_run"],
                   force=kwargs["force"], threads=kwargs["threads"])

    params = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Model)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
               for n, a, d in [*fields, *SHARED]]
    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    command.__doc__ = doc
    command.__name__ = f"{name}_command"
    return handle_errors(command)
