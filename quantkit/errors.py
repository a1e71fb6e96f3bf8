"""The one exception type that the CLI turns into a single clear line."""

from __future__ import annotations

EXIT_ERROR = 2  # bad input, a failed step: every QuantkitError
EXIT_GATE = 3  # an artifact failed the quality gate (eval, --eval, push, run): the one code for it, everywhere


class QuantkitError(Exception):
    """A problem the user can fix: `message` says what is wrong, `hint` what to do."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class MissingDependency(QuantkitError):
    """An optional package (an extra) is not installed."""


class GateFailed(QuantkitError):
    """An artifact is past a quality bound."""

    exit_code = EXIT_GATE


def path_error(exc: OSError, path: object | None = None) -> QuantkitError:
    """One line for an OS error on a path the user gave (a workspace, a calibration file, a model folder): what is
    wrong with the path, and what to do. The one place that words them."""
    import errno

    where = str(path if path is not None else (exc.filename or "the path"))
    code = exc.errno
    if code in (errno.EROFS,):
        return QuantkitError(f"{where} is on a read-only file system", "choose a folder you can write (--workspace)")
    if code in (errno.EACCES, errno.EPERM):
        return QuantkitError(f"no permission to write {where}", "choose a folder you can write (--workspace)")
    if code == errno.EEXIST or (code == errno.ENOTDIR and path is not None):
        return QuantkitError(f"{where} is a file, or lies under one, not a folder",
                             "give a folder path (a new one is created)")
    if code == errno.ENOTDIR:
        return QuantkitError(f"a part of {where} is a file, not a folder", "give a folder path")
    if code == errno.ENOENT:
        return QuantkitError(f"{where} cannot be created there (no such place)",
                             "give a path on a normal, writable file system")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return QuantkitError(f"disk full at {where}", "free some space or pass --workspace on a larger disk")
    why = exc.strerror or type(exc).__name__
    return QuantkitError(f"cannot use {where}: {why}", "give a path on a normal, writable file system")
