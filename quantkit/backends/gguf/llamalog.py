"""llama.cpp's own log, routed through quantkit: kept quiet, remembered, shown with QUANTKIT_DEBUG=1.

llama.cpp logs every tensor while quantizing (fallback types, overrides) and warns about control-looking tokens while
loading a vocabulary. llama-cpp-python's callback maps an older numbering of the levels and prints warnings as
errors (the lines reached the terminal), so quantkit registers its own: nothing is printed unless
``QUANTKIT_DEBUG=1``; the last lines are kept so that an error can say what llama.cpp said.
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
from typing import Any

from quantkit.interrupts import NATIVE_CALLBACK_MODULES

NATIVE_CALLBACK_MODULES.add(__name__)  # its callback runs inside llama.cpp: Ctrl-C waits until it returns

# ggml_log_level in the llama.cpp llama-cpp-python 0.3.36 vendors (llama-cpp-python's own mapping is older and
# wrong: it reads WARN as ERROR, which is why the per-tensor warnings reached the terminal)
DEBUG, INFO, WARN, ERROR, CONT = 1, 2, 3, 4, 5
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
        level = _last_level if level == CONT else level
        _last_level = level
        line = text.decode("utf-8", errors="replace")
        _recent.append((level, line))
        if verbose:
            sys.stderr.write(line)

    _callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def last_error() -> str | None:
    """The last error (or warning) line llama.cpp logged, for a one-line message (prefix up to ': ' dropped)."""
    for wanted in (ERROR, WARN):
        for level, line in reversed(_recent):
            if level == wanted and line.strip() and "failed to load model" not in line:
                return line.strip().split("error loading model: ", 1)[-1]
    return None


def recent(n: int = 20) -> list[str]:
    return [line.rstrip("\n") for _, line in list(_recent)[-n:]]
