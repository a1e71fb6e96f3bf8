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
from quantkit.errors import QuantkitError

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
            how = "repeatable" if extra.get("split") is False else "comma list or repeated"
            annotation: Any = Annotated[list[str] | None, typer.Option(
                *flags, metavar="A,B,..." if extra.get("split") is not False else "VALUE",
                help=f"{help_text} ({how}{shown})")]
            default = None
        elif scalar is bool:
            flag = flags[0]
            pair = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
            annotation = Annotated[bool, typer.Option(pair, *flags[1:], help=help_text)]
            default = bool(field.default) if field.default is not PydanticUndefined else False
        else:
            default = None if field.default is PydanticUndefined or optional else field.default
            hint = scalar | None if default is None else scalar
            annotation = Annotated[hint, typer.Option(*flags, help=help_text)]
        out.append((name, annotation, default))
    return out


def _flags(options_model: type[BaseModel]) -> dict[str, str]:
    """Field → its command-line flag, where it is not ``--<field>`` (for error messages)."""
    out = {}
    for name, field in options_model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cli"):
            out[name] = str(extra["cli"][0]).split("/")[0]
    return out


def _values(options_model: type[BaseModel], given: dict[str, Any]) -> dict[str, Any]:
    """Command-line values → field values (comma lists split; unset lists left to the model's default)."""
    out: dict[str, Any] = {}
    for name, field in options_model.model_fields.items():
        value = given.get(name)
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if isinstance(value, list):
            parts = [str(item) for item in value] if extra.get("split") is False else \
                [part for item in value for part in str(item).split(",")]
            value = [part.strip() for part in parts if part.strip()]
        if value is not None:
            out[name] = value
    return out


def format_command(name: str, options_model: type[BaseModel], doc: str,
                   extra_args: Callable[..., dict[str, Any]] | None = None) -> Callable[..., None]:
    """The `quantkit <name> MODEL [options]` command of a backend, built from its options model. `extra_args`
    (a backend's ``cli_extra``) takes what the options do not name (GGUF's ``--q4_k_m`` flags): it gets those
    arguments, the field values, the command's option names and the values as given, and returns the values."""
    from quantkit.cli.common import run_format

    fields = option_params(options_model)
    clash = {f for f, _, _ in fields} & ({"model", "ctx"} | {s for s, _, _ in SHARED})
    if clash:
        raise TypeError(f"backend {name}: option(s) {', '.join(sorted(clash))} clash with the shared options")

    def command(ctx: typer.Context, **kwargs: Any) -> None:
        setup_output(kwargs["quiet"], kwargs["json_output"])
        values = _values(options_model, kwargs)
        if extra_args is not None:
            names = [o for p in ctx.command.params for o in getattr(p, "opts", []) if o.startswith("--")]
            values = extra_args(list(ctx.args), values, names, kwargs)
        elif ctx.args:
            raise QuantkitError(f"unexpected argument '{ctx.args[0]}'", f"see quantkit {name} --help")
        options = build_options(options_model, f"see quantkit {name} --help", flags=_flags(options_model),
                                **values)
        run_format(name, kwargs["model"], options, calibration=kwargs["calibration"],
                   calib_samples=kwargs["calib_samples"], calib_seq_len=kwargs["calib_seq_len"],
                   workspace=kwargs["workspace"], json_output=kwargs["json_output"], evaluate=kwargs["evaluate"],
                   push=kwargs["push"], repo=kwargs["repo"], private=kwargs["private"], dry_run=kwargs["dry_run"],
                   force=kwargs["force"], threads=kwargs["threads"])

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
              inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Model)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
               for n, a, d in [*fields, *SHARED]]
    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    command.__doc__ = doc
    command.__name__ = f"{name}_command"
    return handle_errors(command)
