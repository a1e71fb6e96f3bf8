"""Output for humans (rich, quiet when asked or not a TTY) and for machines (--json)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_state: dict[str, Any] = {"quiet": False, "json": False}

__all__ = ["configure", "console", "emit_json", "error", "escape", "info", "is_quiet", "progress", "styled",
           "table_console", "warn"]

console = Console(stderr=True, highlight=False)


def table_console() -> Console:
    """Where result tables go (stdout); wide enough not to squash columns when stdout is not a terminal. Plain text:
    model names, paths and notes are shown as they are, never read as markup (styles come as `styled`)."""
    out = Console(highlight=False, markup=False)
    return out if out.is_terminal else Console(highlight=False, markup=False, width=200)


def styled(text: str, style: str) -> Any:
    """`text` in `style`, for plain-text consoles and table cells."""
    from rich.text import Text

    return Text(str(text), style=style)


def configure(*, quiet: bool = False, json_output: bool = False) -> None:
    """Set global output mode: `quiet` hides progress and info; `json_output` keeps stdout for JSON."""
    _state["quiet"] = quiet or json_output
    _state["json"] = json_output
    quiet_libraries()


def quiet_libraries() -> None:
    """Keep third-party chatter (torchao's optional kernels, torch's pytree notices, transformers' length
    warnings) off the user's terminal; QUANTKIT_DEBUG=1 shows everything."""
    import logging
    import os
    import warnings

    if os.environ.get("QUANTKIT_DEBUG") == "1":
        return
    for name in ("torchao", "torch.utils._pytree", "transformers", "gguf", "gptqmodel", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # huggingface_hub sets its own level when it is imported (after this runs): its HTTP retries ("HTTP Error 500
    # thrown while requesting ...") would reach the terminal beside quantkit's own one line per retry
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    if "huggingface_hub" in sys.modules:  # imported already: its level was set from the environment then
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def is_quiet() -> bool:
    return bool(_state["quiet"])


def info(message: str, *, markup: bool = False) -> None:
    """A status line on stderr, hidden under --quiet/--json. Plain text (a path with ``[...]`` in it stays as it
    is) unless `markup`, whose caller escapes what it puts in (`escape`)."""
    if not _state["quiet"]:
        console.print(message, markup=markup)


def warn(message: str) -> None:
    """A warning on stderr (plain text); always shown."""
    from rich.text import Text

    console.print(Text.assemble(("warning:", "yellow"), " ", message))


def error(message: str) -> None:
    """An error line on stderr (plain text)."""
    from rich.text import Text

    console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


def emit_json(payload: Any) -> None:
    """The machine-readable summary on stdout."""
    sys.stdout.write(json.dumps(payload, ensure_ascii=False, indent=2, default=str) + "\n")
    sys.stdout.flush()


class _NullProgress:
    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        return 0

    def update(self, task_id: int, **_: Any) -> None:
        pass

    def advance(self, task_id: int, advance: float = 1) -> None:
        pass


@contextmanager
def progress() -> Iterator[Any]:
    """A rich progress display, or a silent stand-in under --quiet or when stderr is not a terminal. Inside an
    open one (the executor's, while a step evaluates), the same display is used."""
    if _state.get("bar") is not None:
        yield _state["bar"]
        return
    if _state["quiet"] or not console.is_terminal:
        yield _NullProgress()
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        _state["bar"] = bar
        try:
            yield bar
        finally:
            _state["bar"] = None
