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


# modules whose functions run as ctypes callbacks inside native code (an engine's log callback adds itself)
NATIVE_CALLBACK_MODULES: set[str] = {"llama_cpp"}


def _in_native_callback(frame: FrameType | None) -> bool:
    """True when `frame` runs inside a ctypes callback called from native code (llama-cpp-python's, or a log
    callback registered in `NATIVE_CALLBACK_MODULES`)."""
    depth = 0
    while frame is not None and depth < 40:
        if str(frame.f_globals.get("__name__", "")).startswith(tuple(NATIVE_CALLBACK_MODULES)):
            return True
        frame = frame.f_back
        depth += 1
    return False


def _in_finalizer(frame: FrameType | None) -> bool:
    """True inside an object's ``__del__``: Python prints an exception raised there as "Exception ignored" and goes
    on, so the interrupt would be lost (and the run end with exit 0)."""
    depth = 0
    while frame is not None and depth < 40:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
        depth += 1
    return False


def _handler(signum: int, frame: FrameType | None) -> None:
    if _in_finalizer(frame):  # deliver it again once the finalizer has returned
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    if _in_native_callback(frame):
        for path in reversed(_work):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # a step's staging folder leaves no empty `.staging` behind
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


PARENT_ENV = "QUANTKIT_PARENT_PID"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a worker process that calls `die_with_parent` first: it names this process."""
    return {**(env if env is not None else os.environ), PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """Called first thing in a worker process that quantkit starts: the worker is killed when the process that
    started it dies, even by SIGKILL (Linux's parent-death signal), so no worker of a dead run goes on writing into
    its staging folder. Elsewhere (no prctl) it does nothing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit() and os.getppid() != int(parent):  # it died before the signal was armed
        os._exit(1)
