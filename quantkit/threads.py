"""How many CPU threads quantkit's work may use: one setting for torch (imatrix, bf16 reference, verification),
llama.cpp (quantization, scoring, generation) and the child processes (GPTQ), set once by ``--threads`` or a
recipe's ``threads:`` and carried in ``QUANTKIT_THREADS`` so child processes inherit it."""

from __future__ import annotations

import os
import sys

ENV = "QUANTKIT_THREADS"


def cores() -> int:
    """The cores this process may run on."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def set_threads(n: int) -> None:
    """Use `n` threads from now on in this process and its children (0: leave the default, every core)."""
    if n <= 0:
        return
    os.environ[ENV] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:  # already imported: later imports read the variable
        torch.set_num_threads(n)


def threads() -> int:
    """The threads to use: ``QUANTKIT_THREADS`` when set to a positive number, else every core."""
    try:
        n = int(os.environ.get(ENV, "0"))
    except ValueError:
        n = 0
    return n if n > 0 else cores()
