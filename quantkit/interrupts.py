"""SIGINT and SIGTERM end a run with one line and exit 130 / 143, wherever they arrive.

In Python code the signal becomes `Interrupted` (a `KeyboardInterrupt`), so ``finally`` blocks and the staging
folders' clean-up run as usual and the CLI prints one line. Inside llama.cpp, a Python exception raised in a ctypes
callback (llama-cpp-python's log callback, called for every tensor while quantizing) is printed as "Exception
ignored" and swallowed, and the C call goes on. So when the signal is handled inside such a callback, the handler
removes the registered work folders itself, prints the same line and ends the process at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
_work: list[Path] = []  # temporary files and folders to remove when the process must end from inside C


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(NAMES.get(signum, str(signum)))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def message(signum: int) -> str:
    what = "interrupted" if signum == signal.SIGINT else f"stopped by {NAMES.get(signum, signum)}"
    return f"{what}: finished steps are kept, unfinished files removed; run the same command to resume"


def exit_code(exc: BaseException) -> int:
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def _in_native_callback(frame: FrameType | None) -> bool:
    """True when `frame` runs inside a ctypes callback called from llama.cpp's C code (llama-cpp-python's, or
    quantkit's log callback)."""
    depth = 0
    while frame is not None and depth < 40:
        if str(frame.f_globals.get("__name__", "")).startswith(("llama_cpp", "quantkit.backends.gguf.llamalog")):
            return True
        frame = frame.f_back
        depth += 1
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    if _in_native_callback(frame):
        for path in reversed(_work):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        err = sys.stderr
        with contextlib.suppress(Exception):
            if err.isatty():
                err.write("\x1b[?25h")  # a progress bar hid the cursor
            err.write(("\n" if err.isatty() else "") + message(signum) + "\n")
            err.flush()
        os._exit(128 + signum)
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM through `_handler` (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, _handler)


@contextlib.contextmanager
def removing_on_kill(path: Path) -> Iterator[None]:
    """While the block runs, a signal that must end the process from inside C removes `path` first."""
    _work.append(path)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _work.remove(path)
