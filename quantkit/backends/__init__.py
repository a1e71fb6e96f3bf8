"""Quantization backends (GGUF, GPTQ, EXL2, and any third party's through the ``quantkit.backends`` entry points)."""

from quantkit.backends.base import Backend, JobContext, Scorer, get_backend, list_backends

__all__ = ["Backend", "JobContext", "Scorer", "get_backend", "list_backends"]
