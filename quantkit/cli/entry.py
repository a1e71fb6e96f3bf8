"""The `quantkit` console script. SIGINT and SIGTERM are one line from the first instant: importing the commands
(and every backend's options) takes a second, and an interrupt then would otherwise print Python's traceback."""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _before_start(signum: int, frame: FrameType | None) -> None:
    what = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
    sys.stderr.write(f"{what} before anything started; nothing was written\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    """Guard the start, then run the app (which routes signals through `quantkit.interrupts`)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _before_start)
    from quantkit.cli.app import main as run

    run()


if __name__ == "__main__":
    main()
