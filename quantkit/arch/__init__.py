"""The architecture registry: one class per Hugging Face architecture family (see `quantkit.arch.base`)."""

from quantkit.arch.base import Architecture
from quantkit.arch.registry import for_checkpoint, lookup, register, registered, supported_names, unsupported

__all__ = ["Architecture", "for_checkpoint", "lookup", "register", "registered", "supported_names", "unsupported"]
