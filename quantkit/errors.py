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
