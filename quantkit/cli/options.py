"""Options shared by every command, and the error handling that turns problems into one clear line."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from quantkit import console
from quantkit.calibration import DEFAULT_CALIBRATION, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from quantkit.errors import QuantkitError

Calibration = Annotated[str, typer.Option(
    "--calibration", help="Calibration: builtin:ru-mix, a .txt/.jsonl/.parquet file, or hf:DATASET[:SPLIT[:COL]].")]
CalibSamples = Annotated[int, typer.Option("--calib-samples", min=1, help="Calibration rows.")]
CalibSeqLen = Annotated[int, typer.Option("--calib-seq-len", min=16, help="Tokens per calibration row.")]
WorkspaceOpt = Annotated[Path | None, typer.Option(
    "--workspace", "-w", help="Workspace folder (default ./quants/<model>).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines.")]
EvalOpt = Annotated[bool, typer.Option("--eval", help="Measure PPL / KLD against bf16 on Russian text when done.")]
PushOpt = Annotated[bool, typer.Option("--push", help="Publish to the Hub when done.")]
RepoOpt = Annotated[str | None, typer.Option("--repo", help="Hub repo (default <user>/<Model>-<FORMAT>).")]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repo as private.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would be done, do nothing.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Publish even artifacts that failed the quality gate.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-t", min=0, help="CPU threads (0 = every core).")]

DEFAULTS = {"calibration": DEFAULT_CALIBRATION, "calib_samples": DEFAULT_SAMPLES, "calib_seq_len": DEFAULT_SEQ_LEN}

F = TypeVar("F", bound=Callable[..., Any])


def _secrets() -> list[str]:
    found = [os.environ.get(k, "") for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        found.append(get_token() or "")
    except Exception:  # noqa: BLE001 - a broken token store must not break error reporting
        pass
    return [s for s in found if len(s) >= 8]


def redact(text: str) -> str:
    """Remove any Hub token from a message before it is shown."""
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def handle_errors(func: F) -> F:
    """Run a command; a `QuantkitError` (or any failure) becomes one line on stderr and a non-zero exit.

    ``QUANTKIT_DEBUG=1`` shows the traceback instead.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from quantkit import interrupts
        from quantkit.workspace import DiskFull, is_disk_full

        debug = os.environ.get("QUANTKIT_DEBUG") == "1"
        interrupts.install()
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except QuantkitError as exc:
            if debug:
                traceback.print_exc()
            console.error(redact(str(exc)))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            if debug:
                traceback.print_exc()
            code = interrupts.exit_code(exc)
            console.console.print(interrupts.message(code - 128), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(code) from None
        except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into one line
            if debug:
                traceback.print_exc()
            if is_disk_full(exc):
                where = Path(getattr(exc, "filename", None) or ".").parent
                console.error(str(DiskFull(where)))
                raise typer.Exit(DiskFull.exit_code) from None
            if isinstance(exc, OSError) and exc.filename:  # a path of the user's: what is wrong with it
                from quantkit.errors import path_error

                err = path_error(exc)
                console.error(redact(str(err)))
                raise typer.Exit(err.exit_code) from None
            msg = redact(f"{type(exc).__name__}: {exc}").splitlines()[0][:300] if str(exc) else type(exc).__name__
            console.error(f"unexpected failure: {msg} (run with QUANTKIT_DEBUG=1 for the traceback, and report it)")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


M = TypeVar("M", bound=BaseModel)


def build_options(model: type[M], hint: str, *, flags: dict[str, str] | None = None, **values: Any) -> M:
    """A backend's options from command-line values; the first invalid one becomes one clear `QuantkitError`.

    `flags` names the command-line option of a field where it is not ``--<field>``."""
    try:
        return model(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else ""
        field = (flags or {}).get(name) or ("--" + name.replace("_", "-") if name else "")
        msg = str(err.get("msg", exc)).removeprefix("Value error, ")
        text = msg if not field or field in msg else f"bad {field}: {msg}"
        raise QuantkitError(text, None if text.endswith(")") else hint) from None


def setup_output(quiet: bool, json_output: bool) -> None:
    console.configure(quiet=quiet or not sys.stderr.isatty(), json_output=json_output)
