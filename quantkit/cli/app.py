"""The Typer app: registers one module per command."""

from __future__ import annotations

import importlib

import typer

from quantkit import __version__

app = typer.Typer(
    name="quantkit",
    help="Quantize Russian-language LLMs (GGUF, EXL2, GPTQ), check them on Russian text, publish them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# command name → module under quantkit.cli (each defines `command`, or `app` for a group); every format's command
# is generated from its backend (`_format_commands`)
COMMANDS = {
    "eval": "eval_cmd",
    "run": "run",
    "recipe": "recipe",
    "card": "card",
    "push": "push",
    "calib": "calib",
    "models": "models",
    "backends": "backends",
}


def _version(value: bool) -> None:
    if value:
        print(f"quantkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """quantkit: Russian-first quantization toolkit."""


for _name, _module in COMMANDS.items():
    try:
        mod = importlib.import_module(f"quantkit.cli.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name == f"quantkit.cli.{_module}":
            continue  # not built yet
        raise
    if hasattr(mod, "app"):
        app.add_typer(mod.app, name=_name)
    else:
        app.command(_name, help=mod.command.__doc__, context_settings=getattr(mod, "CONTEXT", None))(mod.command)


def _format_commands() -> None:
    """A command for every registered backend, built-in or third-party, generated from its options model (and its
    ``cli_extra`` hook for arguments the options do not name). A backend that fails to load gets no command;
    `quantkit backends` says why."""
    from quantkit.backends.base import get_backend, list_backends
    from quantkit.cli.generated import format_command

    for name in list_backends():
        if name in COMMANDS:
            continue
        try:
            backend = get_backend(name)
            extra = getattr(backend, "cli_extra", None)
            doc = getattr(backend, "command_help", None) or backend.description
            command = format_command(name, backend.options_model, doc, extra_args=extra)
        except Exception:  # noqa: BLE001 - one broken plugin must not take the CLI down
            continue
        context = {"allow_extra_args": True, "ignore_unknown_options": extra is not None}
        app.command(name, help=doc, context_settings=context)(command)


_format_commands()


def main() -> None:
    """Run the app; usage errors (an unknown option, a missing argument) are one line too, not a box."""
    import sys

    from quantkit import interrupts

    interrupts.install()
    try:
        rv = app(standalone_mode=False, prog_name="quantkit")
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:  # before a command's own handling began (typer building the command line)
        code = interrupts.exit_code(exc)
        print(interrupts.message(code - 128), file=sys.stderr)
        sys.exit(code)
    except Exception as exc:
        if not (hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `quantkit` alone: the help, as before
            print(exc.format_message())
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = getattr(ctx, "command_path", None) or "quantkit"
        message = " ".join(str(exc.format_message()).split())
        print(f"error: {message} (see {where} --help)", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
