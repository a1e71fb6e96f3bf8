"""llama.cpp's own log, routed through quantkit: kept quiet, remembered, shown with QUANTKIT_DEBUG=1.

llama.cpp logs every tensor while quantizing (fallback types, overrides) and warns about control-looking tokens while
loading a vocabulary. llama-cpp-python's callback is not the one in effect after ``llama_backend_init`` here (the
lines reached the terminal), so quantkit registers its own: nothing is printed unless ``QUANTKIT_DEBUG=1``; the last
lines are kept so that an error can say what llama.cpp said.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
from typing import Any

_LEVELS = {1: "info", 2: "warn", 3: "error", 4: "debug"}
_recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=200)
_callback: Any = None  # the ctypes callback object must outlive every call into llama.cpp
_last_level = 1


def install(llama_cpp: Any) -> None:
    """Register quantkit's log callback with llama.cpp (once per process)."""
    global _callback
    if _callback is not None:
        return
    verbose = os.environ.get("QUANTKIT_DEBUG") == "1"

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        global _last_level
        level = _last_level if level == 5 else level  # 5: continuation of the previous line
        _last_level = level
        line = text.decode("utf-8", errors="replace")
        _recent.append((level, line))
        if verbose:
            sys.stderr.write(line)

    _callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def last_error() -> str | None:
    """The last error (or warning) line llama.cpp logged, for a one-line message."""
    for wanted in (3, 2):
        for level, line in reversed(_recent):
            if level == wanted and line.strip():
                return line.strip()
    return None


def recent(n: int = 20) -> list[str]:
    return [line.rstrip("\n") for _, line in list(_recent)[-n:]]
